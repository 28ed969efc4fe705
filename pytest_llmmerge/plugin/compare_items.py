"""The comparison items: `parity::stage<k>[<backend>]`, `parity::merged-vs-reference[<backend>]`
and `agreement::hf-vs-vllm[<variant>]`; each compares two models, calibrated on the noise of
the candidate's dtype and backend, and fails with the comparison's lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .. import parity
from ..backends import SCORING_BACKENDS
from ..checkpoint import Checkpoint
from ..parity import Sides
from ..variants import BuildFailed
from ..worker import DeadlineExceeded, WorkerError

if TYPE_CHECKING:
    from .run import LlmMergeRun

class _Comparisons(pytest.Collector):
    def __init__(self, *, run: LlmMergeRun, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run = run


class ParityChecks(_Comparisons):
    """`parity::stage<k>[<backend>]` per merge stage and `parity::merged-vs-reference[<backend>]`."""

    def collect(self) -> list[ParityItem]:
        settings = self.run.settings
        backends = [b for b in settings.backends if b in SCORING_BACKENDS]
        items: list[ParityItem] = []
        for backend in backends:
            for k in range(1, len(settings.adapters) + 1):
                items.append(ParityItem.from_parent(self, name=f"stage{k}[{backend}]", kind="stage", stage=k,
                                                    backend=backend, run=self.run))
            if settings.base is not None:
                items.append(ParityItem.from_parent(self, name=f"merged-vs-reference[{backend}]",
                                                    kind="reference", stage=0, backend=backend, run=self.run))
        return items


class ParityFailed(Exception):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(lines)
        self.lines = lines


class ComparisonItem(pytest.Item):
    """An item that compares two models and fails with a ParityReport's lines."""

    def __init__(self, *, run: LlmMergeRun, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run = run

    prefix = ""  # the collector's name: parity, agreement

    def failure_head(self) -> str:
        raise NotImplementedError

    blamed = ""  # who a failure blames, for the reports' metrics.attribution

    def conclude(self, report: Any) -> None:
        self.user_properties += list(report.metrics.items())
        if not report.ok:
            if self.blamed:
                self.user_properties.append(("attribution", self.blamed))
            raise ParityFailed(report.lines())

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, BuildFailed):
            return str(excinfo.value)
        if isinstance(excinfo.value, DeadlineExceeded):
            per = self.run.settings.call_timeout_s
            return (f"{self.failure_head()}\n  {excinfo.value} (--llm-call-timeout: {per:g} s per text or prompt; "
                    "raise it if the model is only slow, a hang is what this deadline is for)")
        if isinstance(excinfo.value, WorkerError):
            tail = "\n".join("    " + line for line in excinfo.value.log_tail.splitlines())
            return f"{self.failure_head()}\n  {excinfo.value}" + (f"\n  worker log (last lines):\n{tail}" if tail else "")
        if isinstance(excinfo.value, ParityFailed):
            return "\n".join([self.failure_head()] + ["  " + line for line in excinfo.value.lines])
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"{self.prefix}::{self.name}"


def stage_sides(stage: int | None, backend: str, dtype: str) -> Any:
    """Truth, noise model and candidate of merge stage k (None: the merged candidate)."""
    merged, adapter = ("merged", "adapter") if stage is None else (f"stage{stage}", f"stage{stage}-adapter")
    return Sides(truth=(f"{adapter}@float32", "hf"), noise=(f"{adapter}@as-{merged}", backend),
                 candidate=(merged, backend), noise_name=f"adapter-only ({dtype}, {backend})",
                 candidate_name=f"merged ({dtype}, {backend})", dtype=dtype)


class ParityItem(ComparisonItem):
    """Merged vs adapter-only at one stage (KL, perplexity, greedy), or merged vs reference,
    each calibrated on the noise of the candidate's dtype and backend."""

    prefix = "parity"

    def __init__(self, *, kind: str, stage: int, backend: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kind = kind
        self.stage = stage
        self.backend = backend
        adapters = self.run.settings.adapters
        sides = stage_sides(stage if kind == "stage" else None, backend, "")
        self.variants = (f"stage{stage}-adapter", f"stage{stage}") if kind == "stage" else ("reference", "merged")
        keys = [sides.truth, sides.noise, sides.candidate] if kind == "stage" or adapters else [sides.candidate]
        self.worker_keys = tuple(keys) + ((("reference", backend),) if kind == "reference" else ())
        self.add_marker("llmmerge")
        self.add_marker("llmmerge_parity")

    def runtest(self) -> None:
        self.run.skip_unavailable(self.backend)
        settings, runner, chain = self.run.settings, self.run.the_runner, self.run.the_chain
        deadline = settings.call_timeout_s
        self.user_properties += [("variant", self.variants[1]), ("backend", self.backend)]
        self.blamed = "merge"
        corpora = self.run.corpora
        merged = f"stage{self.stage}" if self.kind == "stage" else "merged"
        dtype = self.run.compute_dtype(chain.resolve(merged))
        sides = stage_sides(self.stage if self.kind == "stage" else None, self.backend, dtype)
        if self.kind == "stage":
            report = parity.compare_stage(runner, sides, parity.corpus_texts(corpora, settings.corpus),
                                          parity.greedy_prompts(), settings, deadline,
                                          blame=self._blame(chain, self.stage, dtype))
            if not report.ok:  # what the merge did to the weights: the diagnosis of this stage
                self._add_verdict(report, self.stage)
        else:
            report = parity.compare_reference(runner, sides if chain.n else None, ("reference", self.backend),
                                              parity.corpus_texts((), settings.corpus), settings, deadline,
                                              blame=self._blame(chain, chain.n, dtype) if chain.n else "")
            if not report.ok and chain.n:
                self._add_verdict(report, None)
        if report.skipped:
            pytest.skip(report.skipped)
        self.conclude(report)

    def _add_verdict(self, report: Any, stage: int | None) -> None:
        """The merge diagnosis (of stage k, or None: of the whole merge) under the failure and in
        the figures."""
        verdict = self.run.merge_verdict(stage)
        report.details.append(verdict)
        report.metrics["merge_diagnosis"] = verdict

    def _blame(self, chain: Any, stage: int, dtype: str) -> str:
        given = (stage == chain.n and chain.candidate is not None) or stage <= len(chain.given_stages)
        built = not given
        who = (f"stage {stage} was built by this plugin (--llm-merge-dtype {chain.merge_dtype})" if built else
               f"stage {stage} is {'your --llm-model' if stage == chain.n else 'your --llm-stage'}")
        return (f"the merge of adapter {stage} ({chain.adapters[stage - 1]}), not the fine-tune: the same "
                f"fine-tune unmerged, computed in {dtype} on {self.backend}, stays within the noise; {who}")

    def failure_head(self) -> str:
        return f"parity {self.name} failed ({' vs '.join(self.variants)}):"


class AgreementChecks(_Comparisons):
    """`agreement::hf-vs-vllm[<variant>]`: the two engines agree on the same checkpoint."""

    def collect(self) -> list[AgreementItem]:
        if not {"hf", "vllm"} <= set(self.run.settings.backends):
            return []
        return [AgreementItem.from_parent(self, name=f"hf-vs-vllm[{variant}]", variant=variant, run=self.run)
                for variant in ("merged",)]


class AgreementItem(ComparisonItem):
    """HF vs vLLM on one variant: greedy outputs, termination and perplexity."""

    prefix = "agreement"

    def __init__(self, *, variant: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.variant = variant
        self.worker_keys = ((f"{variant}@float32", "hf"), (variant, "hf"), (variant, "vllm"))
        self.add_marker("llmmerge")
        self.add_marker("llmmerge_agreement")

    def runtest(self) -> None:
        self.run.skip_unavailable("vllm")
        settings, runner = self.run.settings, self.run.the_runner
        spec = self.run.the_chain.resolve(self.variant)
        self.user_properties += [("variant", self.variant), ("backend", "hf-vs-vllm")]
        self.blamed = "serving"
        dtype = self.run.compute_dtype(spec)
        sides = parity.Sides(truth=self.worker_keys[0], noise=self.worker_keys[1], candidate=self.worker_keys[2],
                             truth_name="float32 HF", noise_name=f"HF ({dtype})", candidate_name=f"vLLM ({dtype})",
                             dtype=dtype)
        report = parity.compare_backends(runner, sides, parity.corpus_texts(self.run.corpora, settings.corpus),
                                         parity.greedy_prompts(), Checkpoint(spec.path), settings,
                                         settings.call_timeout_s)
        self.conclude(report)

    def failure_head(self) -> str:
        return f"agreement {self.name} failed (HF transformers vs vLLM on the same checkpoint):"
