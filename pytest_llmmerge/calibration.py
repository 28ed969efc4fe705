"""Tolerances calibrated on the noise that numerics alone make, measured in the same run.

Every comparison has three sides scored on the same texts:

- the **truth**: the model the candidate claims to be, computed by transformers in float32
  (for parity, the fine-tune applied unmerged through peft; for agreement, the checkpoint itself);
- the **noise model**: the same truth computed the way the candidate is computed (its dtype, its
  backend) but without what is under test (no merge; for agreement, HF instead of vLLM);
- the **candidate**.

The noise model's divergence from the truth is what arithmetic alone does to this checkpoint in
this dtype on this backend; the candidate is judged against ``max(floor, factor x noise)``.  On
SmolLM2-135M in bf16 the noise is a mean per-token KL of ~2e-3 nats, healthy bf16 merges sit at
1.0-1.1 x that, and wrong merges at 60-500 x (benchmarks/parity_margins.py).

The factor: KL is quadratic in a small perturbation of the logits, so a KL limit of F x noise
tolerates a perturbation sqrt(F) times as large as the numerics' own.  F = 10 lets a healthy
checkpoint's logits move 3.2 x as far as the dtype moves them (a merge rounded to bf16 storage
on top of bf16 compute is ~1.05 x), while every wrong merge we built moves them 8-23 x.  The
log-perplexity shift gets the same F on "the noise model's shift plus two standard errors":
a shift is a sum of biases, one per rounding source (compute, storage, the merge's own), that
may cancel in the noise model and add up in the candidate; measured healthy candidates sit at
0.3-0.9 x of shift + 2 SE, so sqrt(F) would leave too little room.  Floors keep float32 runs,
where the noise is ~0, at the tolerances PEFT's and vLLM's own tests use (KL 1e-3 nats; 1 %
perplexity).  Explicit options (`--llm-kl-max`, `--llm-ppl-rtol`) replace the calibrated limit.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from .backends.base import TokenLogprobs

DEFAULT_NOISE_FACTOR = 10.0
KL_FLOOR = 1e-3  # nats per token
LOG_PPL_FLOOR = math.log1p(0.01)  # a 1 % perplexity change


@dataclass(frozen=True)
class Judged:
    """One figure judged against its limit: measured, the noise it is calibrated on, the verdict."""

    name: str
    measured: float  # >= 0: a distance (KL, |shift|)
    limit: float
    noise: float | None  # None when an explicit option set the limit
    factor: float
    floor: float
    option: str  # the option that sets this limit explicitly

    @property
    def ok(self) -> bool:
        return self.measured <= self.limit

    @property
    def ratio(self) -> float:
        """measured / limit: below 1 passes."""
        return self.measured / self.limit if self.limit > 0 else math.inf

    def rule(self) -> str:
        if self.noise is None:
            return f"{self.option} {self.limit:.3g}"
        return f"max(floor {self.floor:.3g}, {self.factor:.3g} x noise {self.noise:.3g})"

    def describe(self) -> str:
        word = "<=" if self.ok else ">"
        return f"{self.name} {self.measured:.3g} {word} limit {self.limit:.3g} = {self.rule()} (ratio {self.ratio:.2f})"

    def figures(self, prefix: str) -> dict[str, float | None]:
        return {f"{prefix}": self.measured, f"{prefix}_noise": self.noise, f"{prefix}_limit": self.limit,
                f"{prefix}_ratio": self.ratio}


def calibrated(name: str, measured: float, noise: float, *, factor: float, floor: float, explicit: float | None,
               option: str) -> Judged:
    """`measured` judged against `explicit` when the user gave one, else max(floor, factor x noise)."""
    if explicit is not None:
        return Judged(name, measured, explicit, None, factor, floor, option)
    return Judged(name, measured, max(floor, factor * noise), noise, factor, floor, option)


def _deltas(truth: Sequence[TokenLogprobs], other: Sequence[TokenLogprobs]) -> list[float]:
    """log p_other - log p_truth of every scored token."""
    return [b - a for t, o in zip(truth, other) for a, b in zip(t.logprobs, o.logprobs)]


def log_ppl_shift(truth: Sequence[TokenLogprobs], other: Sequence[TokenLogprobs]) -> float:
    """ln ppl(other) - ln ppl(truth): positive when `other` finds the text less likely."""
    deltas = _deltas(truth, other)
    return -statistics.fmean(deltas) if deltas else 0.0


def log_ppl_noise(truth: Sequence[TokenLogprobs], noisy: Sequence[TokenLogprobs]) -> float:
    """How far numerics alone may shift log-perplexity: the noise model's own shift plus two
    standard errors of it.  The shift alone can cancel out by chance (measured: 0.001 for the
    bf16 noise model, 0.006 for a healthy bf16 merge on the same text); the standard error says
    how far it could as well have landed."""
    deltas = _deltas(truth, noisy)
    if len(deltas) < 2:
        return 0.0
    return abs(statistics.fmean(deltas)) + 2 * statistics.pstdev(deltas) / math.sqrt(len(deltas))


def mean_kl(kls: Sequence[Sequence[float]]) -> float:
    count = sum(len(k) for k in kls)
    return sum(sum(k) for k in kls) / count if count else 0.0
