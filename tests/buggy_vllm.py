"""The real vLLM backend, minus one safeguard: LoRA prompt-logprob scoring batched.

vLLM 0.32 raises on prompt logprobs for a batch of several prompts with LoRA enabled and its
engine then never finishes another request (DESIGN.md). The product scores one prompt per
call there; this subclass does not, to reproduce the real engine hang in a test.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pytest_llmmerge.backends.vllm import VLLMBackend


class BatchedLoraScoring(VLLMBackend):
    def _batches(self, windows: list[Any]) -> Iterator[list[Any]]:
        yield list(windows)
