"""A real HF backend whose answers to one case sit at a tipping point: they end in a loop on the
models a test names (the merged model, the base) and whenever computed in float32, as greedy
outputs of a bf16 release can flip with rounding alone.  Used with
`--llm-backend tipping_backend:TippingHF`; the attribution's plumbing is what it tests."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytest_llmmerge.backends.base import Generation, GenRequest, ProgressFn
from pytest_llmmerge.backends.hf import HFBackend

LOOP = " loop loop loop loop loop loop"


class TippingHF(HFBackend):
    def __init__(self, model_path: str, *, dtype: str = "auto", adapters: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(model_path, dtype=dtype, adapters=adapters, **kwargs)
        tipping = {Path(p).resolve() for p in os.environ.get("LLMMERGE_TEST_TIPPING", "").split(os.pathsep) if p}
        self._tips = dtype == "float32" or (not adapters and Path(model_path).resolve() in tipping)

    def generate(self, requests: Sequence[GenRequest], on_progress: ProgressFn | None = None) -> list[Generation]:
        generations = super().generate(requests, on_progress)
        return [dataclasses.replace(g, text=g.text + LOOP) if self._tips else g for g in generations]
