"""Parity of two model variants through their workers: merged vs adapter-only, merged vs base.

The numbers come from :mod:`metrics`; this module decides what to ask the workers, applies the
tolerances of the run's settings and words the verdict (with the worst document and, for a
stage that drifted, the layers that lost most of their fine-tuning delta).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from . import metrics
from .backends.base import Generation, GenRequest, ScoreRequest, TokenLogprobs

# Top-k of the adapter-only side used for KL; the rest of the mass is one bucket.
KL_TOP_K = 64
GREEDY_BUDGET = 32
_DOC_CUT = 60


class Caller(Protocol):
    label: str

    def call(self, op: str, payload: Any, deadline_s: float) -> Any: ...

    def generate(self, requests: Sequence[GenRequest], deadline_s: float) -> list[Generation]: ...


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
    from .suite import default_suite

    return [GenRequest(prompt=c.prompt, messages=c.messages, max_new_tokens=GREEDY_BUDGET)
            for c in default_suite().cases]


@dataclass
class ParityReport:
    metrics: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def lines(self) -> list[str]:
        return [f"- {f}" for f in self.failures] + self.details

    def add_drift(self, chain: Any, stage: int) -> None:
        """Name the tensors that lost most of adapter k's update (the merge-precision audit)."""
        from .audit import AuditError, audit
        from .checkpoint import Checkpoint

        try:
            result = audit(Checkpoint(chain.stage(stage)), Checkpoint(chain.stage(stage - 1)),
                           (chain.adapters[stage - 1],))
        except AuditError as exc:
            self.details.append(f"no per-layer audit: {exc}")
            return
        worst = sorted(result.layers, key=lambda layer: -layer.error)[:5]
        if worst:
            self.metrics["worst_layers"] = [(layer.tensor, layer.error) for layer in worst]
            self.details.append("layers that lost most of the fine-tuning delta "
                                "(||W_merged - (W_before + dW_fp32)|| / ||dW||):")
            self.details += [f"    {layer.tensor}: {layer.error:.3g}" for layer in worst]


def _finite(report: ParityReport, **figures: float) -> bool:
    """A NaN compares false with every tolerance: name it as the failure instead of passing it."""
    bad = [f"{name} = {value}" for name, value in figures.items() if not math.isfinite(value)]
    if bad:
        report.failures.append(f"{', '.join(bad)}: the model's log-probabilities hold NaN or Inf, so nothing can be "
                               "compared (weights::finite names the tensors)")
    return not bad


def _doc(text: str) -> str:
    return repr(text if len(text) <= _DOC_CUT else text[:_DOC_CUT] + "...")


def compare_stage(adapter: Caller, merged: Caller, texts: Sequence[str], prompts: Sequence[GenRequest],
                  settings: Any, deadline_s: float) -> ParityReport:
    """Merged vs adapter-only: perplexity within rtol, mean KL under the max, greedy agreement."""
    report = ParityReport()
    p_scores: list[TokenLogprobs] = adapter.call("score", [ScoreRequest(text=t, top_k=KL_TOP_K) for t in texts],
                                                 deadline_s)
    q_scores: list[TokenLogprobs] = merged.call(
        "score", [ScoreRequest(text=t, probe_ids=tuple(tuple(i for i, _ in row) for row in p.top))
                  for t, p in zip(texts, p_scores)], deadline_s)
    ppl_a, ppl_m = metrics.perplexity(p_scores), metrics.perplexity(q_scores)
    rel = metrics.relative_difference(ppl_a, ppl_m)
    kls = [metrics.kl_per_token(p, q) for p, q in zip(p_scores, q_scores)]
    mean_kl = sum(sum(k) for k in kls) / max(1, sum(len(k) for k in kls))
    report.metrics.update(ppl_adapter=ppl_a, ppl_merged=ppl_m, ppl_rel_diff=rel, kl_mean=mean_kl,
                          tokens=sum(len(s.logprobs) for s in p_scores))
    if not _finite(report, ppl_adapter=ppl_a, ppl_merged=ppl_m, kl_mean=mean_kl):
        return report
    doc_rel = [metrics.relative_difference(metrics.perplexity([p]), metrics.perplexity([q]))
               for p, q in zip(p_scores, q_scores)]
    doc_kl = [sum(k) / max(1, len(k)) for k in kls]
    if rel > settings.ppl_rtol:
        worst = max(range(len(texts)), key=doc_rel.__getitem__)
        report.failures.append(f"perplexity merged {ppl_m:.4f} vs adapter-only {ppl_a:.4f}: relative difference "
                               f"{rel:.3%} > llm_ppl_rtol {settings.ppl_rtol:.3%}; worst document "
                               f"{_doc(texts[worst])} ({doc_rel[worst]:.3%})")
    if mean_kl > settings.kl_max:
        worst = max(range(len(texts)), key=doc_kl.__getitem__)
        report.failures.append(f"mean per-token KL(adapter-only || merged) {mean_kl:.3g} nats > llm_kl_max "
                               f"{settings.kl_max:.3g}; worst document {_doc(texts[worst])} ({doc_kl[worst]:.3g})")
    report.failures += _greedy_failures(adapter, merged, prompts, settings, deadline_s, report)
    return report


def _divergence(a: Caller, b: Caller, ga: Generation, gb: Generation, position: int, top_k: int,
                deadline_s: float) -> metrics.GreedyVerdict:
    """Judge a greedy divergence: each side's top-k after the common prefix, from both models."""
    prefix = ScoreRequest(token_ids=ga.prompt_ids + ga.token_ids[:position], top_k=top_k)
    top_a = [i for i, _ in a.call("score", [prefix], deadline_s)[0].top[-1]]
    top_b = [i for i, _ in b.call("score", [prefix], deadline_s)[0].top[-1]]
    return metrics.greedy_verdict(ga.token_ids, gb.token_ids, top_a, top_b)


def _greedy_failures(a: Caller, b: Caller, prompts: Sequence[GenRequest], settings: Any, deadline_s: float,
                     report: ParityReport) -> list[str]:
    outs_a, outs_b = a.generate(prompts, deadline_s), b.generate(prompts, deadline_s)
    failures, equal = [], 0
    for request, ga, gb in zip(prompts, outs_a, outs_b):
        position = metrics.first_divergence(ga.token_ids, gb.token_ids)
        if position is None:
            equal += 1
            continue
        verdict = _divergence(a, b, ga, gb, position, settings.top_k, deadline_s)
        if not verdict.ok:
            shown = request.prompt if request.prompt is not None else str(request.messages)
            failures.append(f"greedy outputs diverge at token {position} for {_doc(shown)}: adapter-only "
                            f"{verdict.token_a} vs merged {verdict.token_b}, not in each other's top "
                            f"{settings.top_k} (adapter-only {ga.text!r}, merged {gb.text!r})")
    report.metrics["greedy_equal"] = f"{equal}/{len(prompts)}"
    return failures


def compare_reference(reference: Caller, merged: Caller, texts: Sequence[str], settings: Any,
                      deadline_s: float) -> ParityReport:
    """Merged vs base on general text: a ratio far above 1 means the merge produced gibberish."""
    report = ParityReport()
    ref: list[TokenLogprobs] = reference.call("score", [ScoreRequest(text=t) for t in texts], deadline_s)
    mine: list[TokenLogprobs] = merged.call("score", [ScoreRequest(text=t) for t in texts], deadline_s)
    same_tokens = all(r.token_ids == m.token_ids for r, m in zip(ref, mine))
    if same_tokens:
        name, a, b = "perplexity", metrics.perplexity(ref), metrics.perplexity(mine)
    else:  # another tokenizer: only bits per byte are comparable
        name, a, b = "bits per byte", metrics.bits_per_byte(ref), metrics.bits_per_byte(mine)
    ratio = b / a if a else math.inf
    report.metrics.update(measure=name, reference=a, merged=b, ratio=ratio)
    if not _finite(report, reference=a, merged=b):
        return report
    if ratio > settings.max_ppl_ratio:
        per_doc = [(m_ / r_ if r_ else math.inf) for r_, m_ in zip(
            (metrics.perplexity([r]) for r in ref), (metrics.perplexity([m]) for m in mine))]
        worst = max(range(len(texts)), key=per_doc.__getitem__)
        report.failures.append(f"{name} merged {b:.4g} vs reference {a:.4g}: ratio {ratio:.3f} > llm_max_ppl_ratio "
                               f"{settings.max_ppl_ratio}; worst document {_doc(texts[worst])} "
                               f"(ratio {per_doc[worst]:.3g})")
    return report


def _token_name(ckpt: Any, token_id: int | None) -> str:
    if token_id is None:
        return "none"
    names = {v: k for k, v in ckpt.token_ids.items()}
    return f"{token_id} ({names[token_id]})" if token_id in names else str(token_id)


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


def compare_backends(hf: Caller, vllm: Caller, texts: Sequence[str], prompts: Sequence[GenRequest], ckpt: Any,
                     settings: Any, deadline_s: float) -> ParityReport:
    """The same checkpoint on HF transformers and on vLLM: perplexity, greedy outputs, termination."""
    report = ParityReport()
    hf_scores: list[TokenLogprobs] = hf.call("score", [ScoreRequest(text=t) for t in texts], deadline_s)
    vllm_scores: list[TokenLogprobs] = vllm.call("score", [ScoreRequest(text=t) for t in texts], deadline_s)
    ppl_hf, ppl_vllm = metrics.perplexity(hf_scores), metrics.perplexity(vllm_scores)
    rel = metrics.relative_difference(ppl_hf, ppl_vllm)
    report.metrics.update(ppl_hf=ppl_hf, ppl_vllm=ppl_vllm, ppl_rel_diff=rel)
    if not _finite(report, ppl_hf=ppl_hf, ppl_vllm=ppl_vllm):
        return report
    if rel > settings.ppl_rtol:
        report.failures.append(f"perplexity HF {ppl_hf:.4f} vs vLLM {ppl_vllm:.4f}: relative difference {rel:.3%} "
                               f"> llm_ppl_rtol {settings.ppl_rtol:.3%}")
    outs_hf, outs_vllm = hf.generate(prompts, deadline_s), vllm.generate(prompts, deadline_s)
    equal = agree = 0
    for request, gh, gv in zip(prompts, outs_hf, outs_vllm):
        shown = _doc(request.prompt if request.prompt is not None else str(request.messages))
        if gh.finish_reason != gv.finish_reason:
            report.failures.append(_termination_failure(shown, gh, gv, ckpt))
            continue
        agree += 1
        position = metrics.first_divergence(gh.token_ids, gv.token_ids)
        if position is None:
            equal += 1
            continue
        verdict = _divergence(hf, vllm, gh, gv, position, settings.top_k, deadline_s)
        if not verdict.ok:
            report.failures.append(f"greedy outputs diverge at token {position} for {shown}: HF {verdict.token_a} "
                                   f"vs vLLM {verdict.token_b}, not in each other's top {settings.top_k} "
                                   f"(HF {gh.text!r}, vLLM {gv.text!r})")
    report.metrics.update(greedy_equal=f"{equal}/{len(prompts)}", termination_agrees=f"{agree}/{len(prompts)}")
    return report
