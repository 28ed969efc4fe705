"""The contract between the plugin and a model backend (HF transformers, vLLM, or a user's).

Plain dataclasses only: these cross the process boundary between the plugin and its worker,
so they must pickle and must not import torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length"]
# The token budget of a request that names none: suite cases and users' own tests alike.
DEFAULT_MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class GenRequest:
    """One prompt.  `messages` are rendered with the model's own chat template by the backend."""

    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

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
    prompt_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ScoreRequest:
    """A text (or token ids) to score with teacher forcing.

    `top_k` asks for the k most likely next tokens after every prefix; `probe_ids[i]` asks for
    the log-probabilities of given tokens after prefix i (used to compare two models on the
    same candidate tokens, e.g. for KL from one side's top-k).
    """

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    top_k: int = 0
    probe_ids: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        if (self.text is None) == (self.token_ids is None):
            raise ValueError("a score request has exactly one of text and token_ids")


@dataclass(frozen=True)
class TokenLogprobs:
    """Scores of one sequence of n tokens.

    `logprobs[i]` is log p(token i+1 | tokens 0..i), so there are n-1 of them (the first
    token has no context).  `top[i]` and `probe[i]` describe the distribution after tokens
    0..i, for i = 0..n-1, including the one after the last token (for next-token checks).
    """

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    top: tuple[tuple[tuple[int, float], ...], ...] = ()
    probe: tuple[tuple[float, ...], ...] = ()
    n_bytes: int = 0


class BackendError(RuntimeError):
    """A request the backend cannot serve; the message says why in the user's terms."""


def render_prompt(tokenizer: Any, request: GenRequest) -> tuple[str, bool]:
    """(prompt text, whether to add the tokenizer's special tokens), the same for every backend.

    Raw prompts get the tokenizer's special tokens; chat messages go through the model's own
    chat template, which writes the special tokens it wants (e.g. BOS) itself.
    """
    if request.messages is None:
        assert request.prompt is not None
        return request.prompt, True
    if not getattr(tokenizer, "chat_template", None):
        raise BackendError("the model has no chat template, so chat messages cannot be rendered "
                           "(was chat_template.jinja or tokenizer_config.json's chat_template lost on save?)")
    messages = [{"role": role, "content": content} for role, content in request.messages]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)), False


# Called by a backend while it generates, with the text produced so far for each request, so
# that a request killed at its deadline can still show what it had produced.
ProgressFn = Callable[[list[str]], None]


class Backend(Protocol):
    """A loaded model.  Backends are created inside a worker process, never in pytest's."""

    name: str

    def generate(self, requests: Sequence[GenRequest], on_progress: ProgressFn | None = None) -> list[Generation]: ...

    def score(self, requests: Sequence[ScoreRequest]) -> list[TokenLogprobs]: ...

    def close(self) -> None: ...
