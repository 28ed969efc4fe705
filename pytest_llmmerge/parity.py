"""Parity of model variants through the run's workers: merged vs adapter-only, merged vs base, HF vs vLLM.

Every comparison is calibrated (calibration.py): a float32 truth, a noise model computed the
way the candidate is, and the candidate, scored on the same texts.  The numbers come from
:mod:`metrics` and :mod:`calibration`; this module decides what to ask the workers and words
the verdict: measured value, noise, factor, limit, the worst document, who is to blame, and for
a stage that drifted the layers that lost most of their fine-tuning delta.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from . import calibration, metrics
from .backends.base import Generation, GenRequest, ScoreRequest, TokenLogprobs
from .suite import default_suite

# Top-k of the adapter-only side used for KL; the rest of the mass is one bucket.
KL_TOP_K = 64
GREEDY_BUDGET = 32
_DOC_CUT = 60


Key = tuple[str, str]  # (variant, backend), as the Runner names workers


class Scorer(Protocol):
    """What a comparison needs from the run: scores (cached per model) and greedy generations."""

    def score(self, key: Key, requests: Sequence[ScoreRequest], deadline_s: float) -> list[TokenLogprobs]: ...

    def generate_all(self, key: Key, requests: Sequence[GenRequest], deadline_s: float) -> list[Generation]: ...


@dataclass(frozen=True)
class Sides:
    """The three models of a calibrated comparison (see calibration.py) and what to call them."""

    truth: Key  # the model the candidate claims to be, by transformers in float32
    noise: Key  # the same model computed as the candidate is (its dtype, its backend), minus what is tested
    candidate: Key
    truth_name: str = "float32 adapter-only"
    noise_name: str = "adapter-only"
    candidate_name: str = "merged"
    dtype: str = ""


def default_corpus() -> list[str]:
    text = resources.files("pytest_llmmerge").joinpath("default_corpus.txt").read_text(encoding="utf-8")
    return split_documents(text)


def split_documents(text: str) -> list[str]:
    return [d.strip() for d in text.split("\n\n") if d.strip()]


def corpus_texts(suite_corpora: Iterable[str], corpus_file: Path | None) -> list[str]:
    """Suites' own texts first, then the general corpus (the --llm-corpus file or the built-in)."""
    general = split_documents(corpus_file.read_text(encoding="utf-8")) if corpus_file else default_corpus()
    return list(dict.fromkeys([*suite_corpora, *general]))


def greedy_prompts() -> list[GenRequest]:
    """Prompts for the greedy comparison: the default suite's (generic, chat and raw)."""
    return [GenRequest(prompt=c.prompt, messages=c.messages, max_new_tokens=GREEDY_BUDGET)
            for c in default_suite().cases]


@dataclass
class ParityReport:
    metrics: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    skipped: str | None = None  # why the comparison cannot be made in this run

    @property
    def ok(self) -> bool:
        return not self.failures

    def lines(self) -> list[str]:
        return [f"- {f}" for f in self.failures] + self.details



def _finite(report: ParityReport, **figures: float) -> bool:
    """A NaN compares false with every tolerance: name it as the failure instead of passing it."""
    bad = [f"{name} = {value}" for name, value in figures.items() if not math.isfinite(value)]
    if bad:
        report.failures.append(f"{', '.join(bad)}: the model's log-probabilities hold NaN or Inf, so nothing can be "
                               "compared (weights::finite names the tensors)")
    return not bad


def _doc(text: str) -> str:
    return repr(text if len(text) <= _DOC_CUT else text[:_DOC_CUT] + "...")


@dataclass(frozen=True)
class Scored:
    """Truth, noise model and candidate scored on the same texts (the latter two probed at the
    truth's top-k ids, so KL from the truth can be computed for both)."""

    truth: list[TokenLogprobs]
    noise: list[TokenLogprobs]
    candidate: list[TokenLogprobs]


def score_sides(runner: Scorer, sides: Sides, texts: Sequence[str], deadline_s: float) -> Scored:
    truth = runner.score(sides.truth, [ScoreRequest(text=t, top_k=KL_TOP_K) for t in texts], deadline_s)
    probes = [ScoreRequest(text=t, probe_ids=tuple(tuple(i for i, _ in row) for row in p.top))
              for t, p in zip(texts, truth)]
    return Scored(truth, runner.score(sides.noise, probes, deadline_s), runner.score(sides.candidate, probes, deadline_s))


def _tokenized_alike(report: ParityReport, sides: Sides, texts: Sequence[str], scored: Scored) -> bool:
    for text, t, c in zip(texts, scored.truth, scored.candidate):
        if t.token_ids != c.token_ids:
            report.failures.append(
                f"the {sides.candidate_name} model tokenizes {_doc(text)} into {len(c.token_ids)} tokens, the "
                f"{sides.truth_name} model into {len(t.token_ids)}: their tokenizers differ, so per-token figures "
                "cannot be compared (integrity::tokenizer_vs_base names the files)")
            return False
    return True


def judge_scores(report: ParityReport, sides: Sides, texts: Sequence[str], scored: Scored, settings: Any,
                 blame: str) -> None:
    """Mean KL from the truth and the log-perplexity shift, each against its calibrated limit."""
    truth, noisy, cand = scored.truth, scored.noise, scored.candidate
    kls = [metrics.kl_per_token(p, q) for p, q in zip(truth, cand)]
    kl_c = calibration.mean_kl(kls)
    kl_n = calibration.mean_kl([metrics.kl_per_token(p, q) for p, q in zip(truth, noisy)])
    shift = calibration.log_ppl_shift(truth, cand)
    ppl_t, ppl_c = metrics.perplexity(truth), metrics.perplexity(cand)
    report.metrics.update(ppl_truth=ppl_t, ppl_candidate=ppl_c, ppl_rel_diff=metrics.relative_difference(ppl_t, ppl_c),
                          log_ppl_shift=shift, tokens=sum(len(s.logprobs) for s in truth), dtype=sides.dtype)
    if not _finite(report, ppl_truth=ppl_t, ppl_candidate=ppl_c, kl_mean=kl_c, kl_noise=kl_n):
        return
    factor = settings.noise_factor
    kl = calibration.calibrated(f"mean per-token KL({sides.truth_name} || {sides.candidate_name})", kl_c, kl_n,
                                factor=factor, floor=calibration.KL_FLOOR, explicit=settings.kl_max,
                                option="--llm-kl-max")
    ppl = calibration.calibrated(
        "|log-perplexity shift|", abs(shift), calibration.log_ppl_noise(truth, noisy), factor=factor,
        floor=calibration.LOG_PPL_FLOOR, explicit=None if settings.ppl_rtol is None else math.log1p(settings.ppl_rtol),
        option="--llm-ppl-rtol (as ln(1 + rtol))")
    report.metrics.update(kl.figures("kl_mean"), **ppl.figures("log_ppl"))
    report.metrics["kl_per_document"] = [{"document": text[:_DOC_CUT], "kl": calibration.mean_kl([k])}
                                         for text, k in zip(texts, kls)]
    noise_line = f"the {sides.noise_name} model is {kl_n:.3g} nats from the {sides.truth_name} model"
    if not kl.ok:
        worst = max(range(len(texts)), key=lambda i: sum(kls[i]) / max(1, len(kls[i])))
        report.failures.append(f"{kl.describe()}; {noise_line}; worst document {_doc(texts[worst])} "
                               f"({sum(kls[worst]) / max(1, len(kls[worst])):.3g}). To blame: {blame}")
    if not ppl.ok:
        direction = "higher" if shift > 0 else "lower"
        report.failures.append(f"perplexity {ppl_c:.4f} vs {ppl_t:.4f} of the {sides.truth_name} model "
                               f"({math.expm1(shift):+.2%}, {direction}: a drop is as suspicious as a rise): "
                               f"{ppl.describe()}. To blame: {blame}")


def compare_stage(runner: Scorer, sides: Sides, texts: Sequence[str], prompts: Sequence[GenRequest],
                  settings: Any, deadline_s: float, *, blame: str) -> ParityReport:
    """A merged stage vs its fine-tune unmerged: KL and perplexity shift against the float32
    truth, calibrated on the noise model; greedy outputs against the noise model (same dtype
    and backend: the vLLM rule, top-k containment at the first divergence)."""
    report = ParityReport()
    scored = score_sides(runner, sides, texts, deadline_s)
    if not _tokenized_alike(report, sides, texts, scored):
        return report
    judge_scores(report, sides, texts, scored, settings, blame)
    compare_greedy(runner, sides.noise, sides.candidate, prompts, report,
                   names=(sides.noise_name, sides.candidate_name), top_k=settings.top_k, deadline_s=deadline_s)
    return report


def _divergence(runner: Scorer, a: Key, b: Key, ga: Generation, position: int, top_k: int,
                deadline_s: float) -> tuple[list[int], list[int]]:
    """Each side's top-k after the common prefix of a greedy divergence."""
    prefix = ScoreRequest(token_ids=ga.prompt_ids + ga.token_ids[:position], top_k=top_k)
    return ([i for i, _ in runner.score(a, [prefix], deadline_s)[0].top[-1]],
            [i for i, _ in runner.score(b, [prefix], deadline_s)[0].top[-1]])


def compare_greedy(runner: Scorer, a: Key, b: Key, prompts: Sequence[GenRequest], report: ParityReport, *,
                   names: tuple[str, str], top_k: int, deadline_s: float, ckpt: Any = None) -> None:
    """Greedy outputs of `a` and `b` on `prompts`, judged the same way whichever side is which:
    where the paths part, each side's token must be in the other's top k (a near tie there is
    rounding noise).  With `ckpt` (two engines on one checkpoint) stopping at different tokens
    fails too, named with the checkpoint's tokens, and agreement on termination is counted."""
    outs_a, outs_b = runner.generate_all(a, prompts, deadline_s), runner.generate_all(b, prompts, deadline_s)
    equal = agree = 0
    for request, ga, gb in zip(prompts, outs_a, outs_b):
        shown = _doc(_request_text(request))
        if ckpt is not None:
            if stop_sets_differ(ga, gb):
                report.failures.append(_termination_failure(shown, ga, gb, ckpt))
                continue
            # Otherwise any difference starts where the paths part, and whether two different
            # paths end within the budget says nothing more.
            agree += ga.finish_reason == gb.finish_reason
        position = metrics.first_divergence(ga.token_ids, gb.token_ids)
        if position is None:
            equal += 1
            continue
        top_a, top_b = _divergence(runner, a, b, ga, position, top_k, deadline_s)
        verdict = metrics.greedy_verdict(ga.token_ids, gb.token_ids, top_a, top_b)
        if not verdict.ok:
            report.failures.append(f"greedy outputs diverge at token {position} for {shown}: {names[0]} "
                                   f"{verdict.token_a} vs {names[1]} {verdict.token_b}, not in each other's top "
                                   f"{top_k} ({names[0]} {ga.text!r}, {names[1]} {gb.text!r})")
    report.metrics["greedy_equal"] = f"{equal}/{len(prompts)}"
    if ckpt is not None:
        report.metrics["termination_agrees"] = f"{agree}/{len(prompts)}"


def compare_reference(runner: Scorer, sides: Sides | None, reference: Key, texts: Sequence[str], settings: Any,
                      deadline_s: float, *, blame: str) -> ParityReport:
    """The merged model's drift from the base on general text, judged against the unmerged
    fine-tune's own drift (calibrated as parity is); an absolute forgetting limit only when the
    user sets --llm-max-ppl-ratio.  A fine-tune that made general text worse is reported as a
    property of the fine-tune, not failed as a merge error."""
    report = ParityReport()
    if sides is None and settings.max_ppl_ratio is None:
        report.skipped = ("needs --llm-adapter to tell the merge's drift from the fine-tune's, or "
                          "--llm-max-ppl-ratio for an absolute forgetting limit")
        return report
    candidate = sides.candidate if sides is not None else ("merged", reference[1])
    ref = runner.score(reference, [ScoreRequest(text=t) for t in texts], deadline_s)
    mine = runner.score(candidate, [ScoreRequest(text=t) for t in texts], deadline_s)
    name, a, b = _drift_measure(ref, mine)
    ratio = b / a if a else math.inf
    report.metrics.update(measure=name, reference=a, merged=b, ratio=ratio)
    if not _finite(report, reference=a, merged=b):
        return report
    fine_tune_ratio = None
    if sides is not None:
        scored = score_sides(runner, sides, texts, deadline_s)
        _, a_t, b_t = _drift_measure(ref, scored.truth)
        fine_tune_ratio = b_t / a_t if a_t else math.inf
        report.metrics["fine_tune_ratio"] = fine_tune_ratio
        report.details.append(f"general-text {name}: base {a:.4g}, fine-tune unmerged (float32) {b_t:.4g} "
                              f"(x{fine_tune_ratio:.3g}: the fine-tune's own drift), merged {b:.4g} (x{ratio:.3g})")
        if _tokenized_alike(report, sides, texts, scored):
            judge_scores(report, sides, texts, scored, settings, blame)
    if settings.max_ppl_ratio is not None and ratio > settings.max_ppl_ratio:
        owner = ("the fine-tune: the unmerged adapter is already at "
                 f"x{fine_tune_ratio:.3g}") if fine_tune_ratio is not None and fine_tune_ratio > settings.max_ppl_ratio \
            else "the merge" if fine_tune_ratio is not None else "the merged model (no adapter given to tell more)"
        report.failures.append(f"{name} merged {b:.4g} vs reference {a:.4g}: ratio {ratio:.3f} > --llm-max-ppl-ratio "
                               f"{settings.max_ppl_ratio}. To blame: {owner}")
    return report


def _drift_measure(ref: Sequence[TokenLogprobs], other: Sequence[TokenLogprobs]) -> tuple[str, float, float]:
    """Perplexity when both tokenize alike, else bits per byte (comparable across tokenizers)."""
    if all(r.token_ids == m.token_ids for r, m in zip(ref, other)):
        return "perplexity", metrics.perplexity(ref), metrics.perplexity(other)
    return "bits per byte", metrics.bits_per_byte(ref), metrics.bits_per_byte(other)


def _request_text(request: GenRequest) -> str:
    """A prompt as a reader wants it in a failure: raw text, or the chat turns as `role: text`."""
    if request.prompt is not None:
        return request.prompt
    return " | ".join(f"{role}: {content}" for role, content in request.messages or ())


def _token_name(ckpt: Any, token_id: int | None) -> str:
    if token_id is None:
        return "none"
    names = {v: k for k, v in ckpt.token_ids.items()}
    return f"{token_id} ({names[token_id]})" if token_id in names else str(token_id)


def stop_sets_differ(a: Generation, b: Generation) -> bool:
    """One engine stopped and the other wrote the same tokens through that stop token and went
    on: they stop at different token sets, whatever the numerics.  When the paths part before
    the stop token, the difference is a greedy divergence, not a termination one."""
    if a.finish_reason == b.finish_reason:
        return False
    stopped = a if a.finish_reason == "stop" else b
    position = metrics.first_divergence(a.token_ids, b.token_ids)
    return position is None or position >= len(stopped.token_ids)


def _termination_failure(shown: str, hf: Generation, vllm: Generation, ckpt: Any) -> str:
    """Explain why one engine stopped and the other did not, and name the fix."""
    eos = sorted(ckpt.generation_eos_ids() or [])
    tokenizer_eos = ckpt.tokenizer_eos()
    stopper, runner_name, stopped = ("vLLM", "HF generate", vllm) if vllm.finish_reason == "stop" else \
        ("HF generate", "vLLM", hf)
    token = stopped.stop_token_id
    text = (f"termination differs for {shown}: {stopper} stopped at token {_token_name(ckpt, token)} after "
            f"{len(stopped.token_ids)} tokens, {runner_name} ran to the budget")
    if stopper == "vLLM" and tokenizer_eos is not None and tokenizer_eos[1] == token and token not in eos:
        text += (f". Token {token} is the tokenizer's eos but generation_config.json's eos_token_id {eos} lacks "
                 f"it: vLLM stops at the tokenizer's eos and at every generation_config eos id, HF generate only "
                 f"at the latter. Fix: add {token} to eos_token_id in generation_config.json")
    return text


def compare_backends(runner: Scorer, sides: Sides, texts: Sequence[str], prompts: Sequence[GenRequest], ckpt: Any,
                     settings: Any, deadline_s: float) -> ParityReport:
    """The same checkpoint on HF transformers (the noise model) and on vLLM (the candidate),
    both judged from the checkpoint computed by transformers in float32; then greedy outputs
    and termination, HF vs vLLM."""
    report = ParityReport()
    scored = score_sides(runner, sides, texts, deadline_s)
    if _tokenized_alike(report, sides, texts, scored):
        judge_scores(report, sides, texts, scored, settings,
                     blame="serving: vLLM computes this checkpoint differently from transformers beyond what "
                           f"{sides.dtype} arithmetic explains (not the merge: both run the same files)")
    compare_greedy(runner, sides.noise, sides.candidate, prompts, report, names=("HF", "vLLM"),
                   top_k=settings.top_k, deadline_s=deadline_s, ckpt=ckpt)
    return report
