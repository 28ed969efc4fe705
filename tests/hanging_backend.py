"""A real HF backend that really hangs, inside the worker, on prompts holding a trigger phrase.

The hang is an endless sleep in the middle of generation (after a few tokens), in the child
process: nothing in pytest's process checks a flag, so only the worker's deadline and kill
can end it.  Used with `--llm-backend hanging_backend:HangingHF`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytest_llmmerge.backends.base import Generation, GenRequest, ProgressFn
from pytest_llmmerge.backends.hf import HFBackend

# The phrase of the field report (shibing624/MedicalGPT #311): prompts listing it hung.
TRIGGER = os.environ.get("LLMMERGE_TEST_HANG_TRIGGER", "功能:无法判断")


class HangingHF(HFBackend):
    def __init__(self, model_path: str, **kwargs: Any) -> None:
        super().__init__(model_path, **kwargs)
        self._hang = False
        pid_file = os.environ.get("LLMMERGE_TEST_PID_FILE")
        if pid_file:  # lets a test check afterwards that no worker outlived the run
            with Path(pid_file).open("a") as fh:
                fh.write(f"{os.getpid()}\n")

    def generate(self, requests: Sequence[GenRequest], on_progress: ProgressFn | None = None) -> list[Generation]:
        texts = [(r.prompt or "") + "".join(c for _, c in r.messages or ()) for r in requests]
        self._hang = any(TRIGGER in text for text in texts)
        return super().generate(requests, on_progress)

    def on_step(self, new_tokens: Any) -> None:
        if self._hang and new_tokens.shape[1] >= 1:  # after the first token: answers here are short
            hang_file = os.environ.get("LLMMERGE_TEST_HANG_FILE")
            if hang_file:  # lets a test act while the worker is inside the hang
                Path(hang_file).write_text(str(os.getpid()))
            while True:
                time.sleep(0.5)
