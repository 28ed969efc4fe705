"""What users' own tests get from the fixtures: a model variant, and a client per backend.

    def test_answers_stop(llm_merged):
        out = llm_merged.backend("hf").generate("Repeat: a b\\nAnswer:", max_new_tokens=16)
        assert out.finish_reason == "stop"

The client talks to the same worker the plugin's items use (loaded once per session, every
call under a deadline).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .backends.base import DEFAULT_MAX_NEW_TOKENS, Generation, GenRequest, ScoreRequest, TokenLogprobs
from .runner import Runner
from .variants import ModelSpec

DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ModelClient:
    runner: Runner
    variant: str
    backend_name: str
    timeout_s: float = DEFAULT_TIMEOUT_S

    def generate(self, prompt: str | GenRequest, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Generation:
        """Greedy generation of one prompt; a str is raw text, a GenRequest may carry chat messages."""
        return self.generate_many([prompt], max_new_tokens=max_new_tokens)[0]

    def generate_many(self, prompts: Sequence[str | GenRequest], *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[Generation]:
        """Greedy generation of several prompts in one batch."""
        requests = [p if isinstance(p, GenRequest) else GenRequest(prompt=p, max_new_tokens=max_new_tokens)
                    for p in prompts]
        return self.runner.generate_all((self.variant, self.backend_name), requests, self.timeout_s)

    def score(self, texts: Sequence[str | ScoreRequest]) -> list[TokenLogprobs]:
        requests = [t if isinstance(t, ScoreRequest) else ScoreRequest(text=t) for t in texts]
        return self.runner.score((self.variant, self.backend_name), requests, self.timeout_s)


@dataclass(frozen=True)
class VariantHandle:
    """One model variant (reference, adapter or merged) of the run."""

    name: str
    spec: ModelSpec
    runner: Runner

    @property
    def path(self) -> Path:
        return self.spec.path

    @property
    def adapters(self) -> tuple[Path, ...]:
        return self.spec.adapters

    def backend(self, name: str = "hf", *, timeout_s: float = DEFAULT_TIMEOUT_S) -> ModelClient:
        return ModelClient(self.runner, self.name, name, timeout_s)
