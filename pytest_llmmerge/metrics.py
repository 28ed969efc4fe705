"""Parity metrics over scored sequences and greedy outputs; pure Python, no torch.

Conventions follow the anchors' tests: perplexity as exp of the mean negative log-likelihood
over every scored token; KL(P || Q) per token from P's top-k plus one bucket for the rest of
the mass (exact when k is the vocabulary, a lower bound otherwise, and close for the peaked
distributions of language models); greedy agreement as equal outputs, or, at the first
divergence, each side's token among the other's top-k (the rule vLLM's tests use).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .backends.base import TokenLogprobs


def nll(scores: Sequence[TokenLogprobs]) -> tuple[float, int]:
    """(total negative log-likelihood in nats, number of scored tokens)."""
    return -sum(sum(s.logprobs) for s in scores), sum(len(s.logprobs) for s in scores)


def perplexity(scores: Sequence[TokenLogprobs]) -> float:
    total, count = nll(scores)
    return math.exp(total / count) if count else float("nan")


def bits_per_byte(scores: Sequence[TokenLogprobs]) -> float:
    """Tokenizer-independent: comparable between models whose tokenizers differ."""
    total, _ = nll(scores)
    n_bytes = sum(s.n_bytes for s in scores)
    return total / (math.log(2) * n_bytes) if n_bytes else float("nan")


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / abs(a) if a else float("inf")


def _log1mexp_sum(logprobs: Sequence[float]) -> float:
    """log(1 - sum(exp(lp))), clamped: the log-mass outside the given tokens."""
    rest = 1.0 - sum(math.exp(lp) for lp in logprobs)
    return math.log(max(rest, 1e-12))


def kl_per_token(p: TokenLogprobs, q: TokenLogprobs) -> list[float]:
    """KL(P || Q) after every prefix, from P's top-k (`p.top`) and Q's logprobs at those ids
    (`q.probe`, requested with probe_ids = P's top ids), plus one bucket for the rest."""
    if len(p.top) != len(q.probe):
        raise ValueError(f"P has {len(p.top)} top-k rows but Q has {len(q.probe)} probe rows")
    out = []
    for p_top, q_lps in zip(p.top, q.probe):
        p_lps = [lp for _, lp in p_top]
        kl = sum(math.exp(lp_p) * (lp_p - lp_q) for lp_p, lp_q in zip(p_lps, q_lps))
        p_rest, q_rest = _log1mexp_sum(p_lps), _log1mexp_sum(q_lps)
        kl += math.exp(p_rest) * (p_rest - q_rest)
        out.append(max(kl, 0.0))
    return out


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token, None when equal (a prefix of the other differs at its end)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@dataclass(frozen=True)
class GreedyVerdict:
    equal: bool
    position: int | None = None
    token_a: int | None = None
    token_b: int | None = None
    a_in_b_top: bool = True
    b_in_a_top: bool = True

    @property
    def ok(self) -> bool:
        return self.equal or (self.a_in_b_top and self.b_in_a_top)


def greedy_verdict(a_ids: Sequence[int], b_ids: Sequence[int], a_next_top: Sequence[int] | None,
                   b_next_top: Sequence[int] | None) -> GreedyVerdict:
    """Judge two greedy outputs; `*_next_top` are each side's top-k ids at the first divergence."""
    position = first_divergence(a_ids, b_ids)
    if position is None:
        return GreedyVerdict(equal=True)
    token_a = a_ids[position] if position < len(a_ids) else None
    token_b = b_ids[position] if position < len(b_ids) else None
    return GreedyVerdict(
        equal=False, position=position, token_a=token_a, token_b=token_b,
        a_in_b_top=token_a is None or (b_next_top is not None and token_a in b_next_top),
        b_in_a_top=token_b is None or (a_next_top is not None and token_b in a_next_top))
