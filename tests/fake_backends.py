"""Backends without a model, for testing the worker's plumbing only (never a check's evidence)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from pytest_llmmerge.backends.base import Generation, GenRequest, ProgressFn


class Echo:
    """Echoes the prompt; `raise:` prompts raise, `exit:` prompts kill the process, `sleep:N` sleeps."""

    name = "echo"

    def __init__(self, model_path: str, **kwargs: Any) -> None:
        if model_path == "fail-to-load":
            raise RuntimeError("cannot open the checkpoint")
        self.pid = os.getpid()

    def generate(self, requests: Sequence[GenRequest], on_progress: ProgressFn | None = None) -> list[Generation]:
        out = []
        for request in requests:
            prompt = request.prompt or ""
            if prompt.startswith("raise:"):
                raise ValueError(prompt[6:])
            if prompt.startswith("exit:"):
                os._exit(3)
            if prompt.startswith("sleep:"):
                if on_progress is not None:
                    on_progress(["partial words"])
                time.sleep(float(prompt[6:]))
            out.append(Generation(text=f"{self.pid}:{prompt}", token_ids=(1, 2), finish_reason="stop",
                                  stop_token_id=2, seconds=0.0))
        return out

    def close(self) -> None:
        pass
