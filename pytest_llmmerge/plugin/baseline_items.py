"""The baseline items: `baseline::provenance`, `baseline::<case>[<variant>-<backend>]` per suite
case and `baseline::perplexity[merged-<backend>]`, comparing the candidate with a release's
baseline (`--llm-baseline DIR`); with `--llm-baseline-save` alone, `baseline::perplexity`
scores the corpus for the baseline being written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .. import baseline_compare
from ..backends import SCORING_BACKENDS
from ..backends.base import ScoreRequest, TokenLogprobs
from ..baseline_compare import DOC_TOP_K, Judgement
from ..parity import corpus_texts
from ..runner import Pending
from ..variants import BuildFailed
from ..worker import DeadlineExceeded, WorkerError

if TYPE_CHECKING:
    from ..backends.base import Generation
    from .case_items import CaseItem
    from .run import LlmMergeRun

PREFIX = "baseline"


def scorer_key(variant: str, backend: str) -> tuple[str, str]:
    """The worker that scores a variant's outputs: its own backend, or HF where that cannot score."""
    return variant, backend if backend in SCORING_BACKENDS else "hf"


def output_top_ids(run: LlmMergeRun, variant: str, backend: str, generation: Generation) -> list[list[int]]:
    """The top-k ids at every output position of `generation` (after the prompt and the outputs
    before it), scored teacher-forced on the variant; empty when the prompt's ids are unknown."""
    if not generation.prompt_ids or not generation.token_ids:
        return []
    ids = generation.prompt_ids + generation.token_ids
    settings = run.settings
    scored = run.the_runner.score(scorer_key(variant, backend), [ScoreRequest(token_ids=ids, top_k=settings.top_k)],
                                  settings.call_timeout_s)[0]
    start = len(generation.prompt_ids) - 1
    return [[int(i) for i, _ in row] for row in scored.top[start:start + len(generation.token_ids)]]


class BaselineChecks(pytest.Collector):
    """The baseline items, for the suite case items this run collected."""

    def __init__(self, *, run: LlmMergeRun, cases: Sequence[CaseItem], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run = run
        self.cases = cases

    def collect(self) -> list[pytest.Item]:
        settings = self.run.settings
        items: list[pytest.Item] = []
        if settings.baseline is not None:
            items.append(ProvenanceItem.from_parent(self, name="provenance", run=self.run,
                                                    case_ids=[c.nodeid for c in self.cases]))
            names = [f"{c.case.id}[{c.variant}-{c.backend}]" for c in self.cases]
            for case, name in zip(self.cases, names):
                # Two suites may name a case alike: their suite tells them apart.
                unique = name if names.count(name) == 1 else f"{case.path.stem}/{name}"
                items.append(BaselineCaseItem.from_parent(self, name=unique, case_item=case, run=self.run))
        if settings.baseline is not None or settings.baseline_save is not None:
            items += [PerplexityItem.from_parent(self, name=f"perplexity[merged-{backend}]", backend=backend,
                                                 run=self.run)
                      for backend in settings.backends if backend in SCORING_BACKENDS]
        return items


class BaselineFailed(Exception):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(lines)
        self.lines = lines


class BaselineItem(pytest.Item):
    def __init__(self, *, run: LlmMergeRun, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run = run
        self.add_marker("llmmerge")
        self.add_marker("llmmerge_baseline")

    worker_key: tuple[str, str] | None = None  # the model it follows in the item order
    worker_keys: tuple[tuple[str, str], ...] = ()

    def conclude(self, judged: Judgement, head: str) -> None:
        self.user_properties += list(judged.figures.items())
        if judged.ok:
            return
        lines = [head] + [f"  - {f}" for f in judged.failures] + [f"  {d}" for d in judged.details]
        differences = self.run.baseline_differences()
        if differences:
            lines.append(f"  provenance differences since the baseline ({self.run.settings.baseline}), which may "
                         "explain it:")
            lines += [f"    {d}" for d in differences]
        raise BaselineFailed(lines)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        error = excinfo.value
        if isinstance(error, BaselineFailed):
            return "\n".join(error.lines)
        if isinstance(error, (BuildFailed, DeadlineExceeded)):
            return f"{PREFIX}::{self.name}: {error}"
        if isinstance(error, WorkerError):
            tail = "\n".join("    " + line for line in error.log_tail.splitlines())
            return f"{PREFIX}::{self.name}: {error}" + (f"\n  worker log (last lines):\n{tail}" if tail else "")
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"{PREFIX}::{self.name}"


class ProvenanceItem(BaselineItem):
    """What differs from the baseline's run, and which cases are new or gone; fails only with
    --llm-baseline-strict."""

    def __init__(self, *, case_ids: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.case_ids = list(case_ids)

    def runtest(self) -> None:
        saved = self.run.the_baseline
        differences = self.run.baseline_differences(suites=True)
        new, gone = baseline_compare.new_and_gone(list(saved["cases"]), self.case_ids)
        judged = Judgement(figures={"provenance_differences": differences, "new_cases": new, "gone_cases": gone})
        lines = [f"provenance: {d}" for d in differences] + [f"gone since the baseline: {c}" for c in gone]
        if self.run.settings.baseline_strict:
            judged.failures += lines
        else:
            judged.details += lines
        judged.details += [f"new since the baseline: {c}" for c in new]
        self.user_properties += list(judged.figures.items())
        if not judged.ok:
            raise BaselineFailed([f"baseline provenance differs ({self.run.settings.baseline}, "
                                  "--llm-baseline-strict):"] + [f"  - {f}" for f in judged.failures])


class BaselineCaseItem(BaselineItem):
    """One suite case on one variant and backend against the baseline's output."""

    def __init__(self, *, case_item: CaseItem, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.case_item = case_item
        self.variant, self.backend = case_item.variant, case_item.backend
        self.worker_key = case_item.worker_key
        self.worker_keys = (self.worker_key, scorer_key(self.variant, self.backend))
        self.user_properties += [("variant", self.variant), ("backend", self.backend)]

    def runtest(self) -> None:
        run, case = self.run, self.case_item
        run.skip_unavailable(self.backend)
        saved = run.the_baseline["cases"].get(case.nodeid)
        if saved is None:
            pytest.skip(f"new since the baseline: {case.nodeid} is not in {run.settings.baseline}; its suite item "
                        "runs it")
        if self.variant not in run.the_chain.available():
            pytest.skip(f"variant {self.variant!r} is not available in this run")
        generation = run.generations.get(case.nodeid)
        if generation is None:  # its case item ran in another process, or was deselected
            generation = run.the_runner.generate(case.worker_key, Pending(f"{self.nodeid}", case.request(),
                                                                          case.case.timeout_s))
        settings = run.settings
        top_k = min(settings.top_k, int(saved.get("top_k") or settings.top_k))

        def top_now_at(position: int) -> list[int]:
            ids = generation.prompt_ids + generation.token_ids[:position]
            scored = run.the_runner.score(scorer_key(self.variant, self.backend),
                                          [ScoreRequest(token_ids=ids, top_k=top_k)], settings.call_timeout_s)
            return [int(i) for i, _ in scored[0].top[-1]]

        judged = baseline_compare.judge_case(saved, generation.token_ids, generation.text, generation.finish_reason,
                                             generation.stop_token_id, growth=settings.baseline_growth, top_k=top_k,
                                             top_now_at=top_now_at)
        self.conclude(judged, f"case {case.case.id!r} on {self.variant}-{self.backend} differs from the baseline:")


class PerplexityItem(BaselineItem):
    """The merged model's per-document log-likelihood on the corpus: recorded for a baseline
    being saved, and judged against a loaded baseline with parity's calibrated rule."""

    def __init__(self, *, backend: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.backend = backend
        self.worker_key = ("merged", backend)
        self.user_properties += [("variant", "merged"), ("backend", backend)]
        baseline_given = self.run.settings.baseline is not None
        self.worker_keys = (("merged", backend),) + ((("merged@float32", "hf"),) if baseline_given else ())

    def runtest(self) -> None:
        run, settings = self.run, self.run.settings
        run.skip_unavailable(self.backend)
        runner, deadline, key = run.the_runner, settings.call_timeout_s, ("merged", self.backend)
        texts = corpus_texts(run.corpora, settings.corpus)
        scored = runner.score(key, [ScoreRequest(text=t, top_k=DOC_TOP_K) for t in texts], deadline)
        documents = [baseline_compare.document_record(t, s) for t, s in zip(texts, scored)]
        if settings.baseline_save is not None:
            self.user_properties.append(("documents", documents))
        if settings.baseline is None:
            return
        saved = run.the_baseline["documents"].get(f"merged-{self.backend}")
        if not saved:
            pytest.skip(f"the baseline holds no perplexity for merged-{self.backend} (saved without that backend)")
        by_key = {r["key"]: r for r in saved}
        shared = [t for t in texts if baseline_compare.document_key(t) in by_key]
        if not shared:
            pytest.skip("no corpus document of this run is in the baseline (the corpus changed: see "
                        "baseline::provenance)")
        records = [by_key[baseline_compare.document_key(t)] for t in shared]

        def probes(rows: Sequence[Sequence[int]], n_ids: int) -> tuple[tuple[int, ...], ...]:
            padded = [tuple(r) for r in rows][:n_ids]
            return tuple(padded + [()] * (n_ids - len(padded)))

        now = runner.score(key, [ScoreRequest(text=t) for t in shared], deadline)
        now_probed = runner.score(key, [ScoreRequest(text=t, probe_ids=probes(baseline_compare.probe_ids(r),
                                                                                len(n.token_ids)))
                                        for t, r, n in zip(shared, records, now)], deadline)
        truth = runner.score(("merged@float32", "hf"), [ScoreRequest(text=t, top_k=DOC_TOP_K) for t in shared],
                             deadline)
        truth_probed = runner.score(key, [ScoreRequest(text=t, probe_ids=probes(
            [[i for i, _ in row] for row in tr.top[:len(r["top"])]], len(n.token_ids)))
            for t, r, n, tr in zip(shared, records, now, truth)], deadline)
        judged = baseline_compare.judge_perplexity(
            records, shared, now, [_head(p, len(r["top"])) for p, r in zip(now_probed, records)], truth,
            [_head(p, len(r["top"])) for p, r in zip(truth_probed, records)], factor=settings.noise_factor,
            kl_max=settings.kl_max, ppl_rtol=settings.ppl_rtol)
        judged.figures["documents_compared"] = f"{len(shared)}/{len(texts)}"
        self.conclude(judged, f"perplexity of merged-{self.backend} differs from the baseline's:")


def _head(scored: TokenLogprobs, rows: int) -> TokenLogprobs:
    """A scored sequence with only its first `rows` probe rows (the baseline's stored positions)."""
    return replace(scored, probe=scored.probe[:rows])
