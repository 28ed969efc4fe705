"""The contract between the plugin and a model backend (HF transformers, vLLM, or a user's).

Plain dataclasses only: these cross the process boundary between the plugin and its worker,
so they must pickle and must not import torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenRequest:
    """One prompt.  `messages` are rendered with the model's own chat template by the backend."""

    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a request has exactly one of prompt and messages")


@dataclass(frozen=True)
class Generation:
    """What the model produced for one request (greedy)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    stop_token_id: int | None
    seconds: float
    prompt_text: str = ""
    prompt_tokens: int = 0


@dataclass(frozen=True)
class TokenLogprobs:
    """Per-token log-probabilities of a scored text (the first token has none)."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    top: tuple[tuple[tuple[int, float], ...], ...] = field(default=())


# Called by a backend while it generates, with the text produced so far for each request, so
# that a request killed at its deadline can still show what it had produced.
ProgressFn = Callable[[list[str]], None]


class Backend(Protocol):
    """A loaded model.  Backends are created inside a worker process, never in pytest's."""

    name: str

    def generate(self, requests: Sequence[GenRequest], on_progress: ProgressFn | None = None) -> list[Generation]: ...

    def close(self) -> None: ...
