"""The pytest collectors and items pytest-llmmerge adds: checks, suite cases, parity, agreement.

Each item asks the core for a verdict (integrity/weights/audit checks, suite expectations,
parity reports) and turns it into a pass, a skip with the reason, or a failure that shows what
a person needs to act on.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .plugin_state import (
    CORPORA_KEY,
    SCORING_BACKENDS,
    SETTINGS_KEY,
    SUITE_ERRORS_KEY,
    get_chain,
    get_runner,
    integrity_context,
    progress_writer,
    skip_unavailable,
)

if TYPE_CHECKING:
    from .backends.base import Generation
    from .suite import Case, Suite


class IntegrityFailed(Exception):
    def __init__(self, findings: list[Any], model: Path) -> None:
        super().__init__(findings)
        self.findings = findings
        self.model = model


class IntegrityChecks(pytest.Collector):
    """The `integrity::<check>` items (files and headers), `weights::<check>` (tensor data) and,
    with --llm-audit-merge, `audit::<check>`: one collector per group."""

    def __init__(self, *, group: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.group = group

    def collect(self) -> list[pytest.Item]:
        return [IntegrityItem.from_parent(self, name=check.name, check=check) for check in _checks(self.group)]


def _checks(group: str) -> tuple[Any, ...]:
    from .checks import checks_of

    return checks_of(group)


class IntegrityItem(pytest.Item):
    """One check of the checkpoint's files, tensors or merge, failing with its findings."""

    def __init__(self, *, check: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.check = check
        self.check_name = check.name
        self.worker_keys: tuple[tuple[str, str], ...] = ()  # reads files only, needs no model
        self.add_marker("llmmerge")
        self.add_marker(f"llmmerge_{check.group}")

    def runtest(self) -> None:
        from .checks.base import IntegrityWarning, run_check

        settings = self.config.stash[SETTINGS_KEY]
        context = integrity_context(self.config, settings)
        outcome = run_check(self.check, context)
        self.user_properties.extend((f.code, f.render()) for f in outcome.findings)
        self.user_properties.extend(_check_figures(self.check, context))
        if outcome.skipped is not None:
            pytest.skip(outcome.skipped)
        with warnings.catch_warnings():
            # A warning finding passes its item whatever the user's filterwarnings (strict
            # repositories set "error"); pytest's own recorder still shows it in the summary.
            warnings.simplefilter("always", IntegrityWarning)
            for finding in outcome.warnings:
                warnings.warn(IntegrityWarning(f"{finding.render()} ({context.model.path / finding.file})"),
                              stacklevel=1)
        if outcome.errors:
            raise IntegrityFailed(outcome.errors, context.model.path)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        from .variants import BuildFailed

        if isinstance(excinfo.value, BuildFailed):
            return f"{self.check.group} check {self.check_name!r}: {excinfo.value}"
        if isinstance(excinfo.value, IntegrityFailed):
            lines = [f"{self.check.group} check {self.check_name!r} failed on {excinfo.value.model}:"]
            for finding in excinfo.value.findings:
                lines.append(f"  {finding.code} {finding.file}: {finding.message}")
            return "\n".join(lines)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"{self.check.group}::{self.check_name}"


def _check_figures(check: Any, context: Any) -> list[tuple[str, Any]]:
    """Tables a check computed, as user properties (they reach JUnit XML and the report)."""
    return check.figures(context) if check.figures is not None else []


def _case_items(parent: pytest.Collector, suite: Suite) -> Iterator[CaseItem]:
    settings = parent.config.stash[SETTINGS_KEY]
    for case in suite.cases:
        for variant in case.variants:
            # A case without `backends` runs on every backend of the run; one with them, on those.
            for backend in (b for b in settings.backends if not case.backends or b in case.backends):
                yield CaseItem.from_parent(parent, name=f"{case.id}[{variant}-{backend}]", case=case,
                                           variant=variant, backend=backend)


class SuiteFile(pytest.File):
    """A YAML suite; a bad one is reported as a usage error naming the file and JSON path."""

    def collect(self) -> Iterator[CaseItem]:
        from .suite import SuiteError, load_suite

        try:
            suite = load_suite(self.path)
        except SuiteError as exc:
            self.config.stash[SUITE_ERRORS_KEY].append(str(exc))
            return iter(())
        self.config.stash[CORPORA_KEY].extend(suite.corpus)
        return _case_items(self, suite)


class DefaultSuite(pytest.Collector):
    """The built-in suite, run when --llm-model is given and no suite is."""

    def __init__(self, *, suite: Suite, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.suite = suite

    def collect(self) -> list[CaseItem]:
        return list(_case_items(self, self.suite))


class CaseFailed(Exception):
    def __init__(self, reasons: list[str], generation: Generation | None = None, partial: str | None = None,
                 log_tail: str = "") -> None:
        super().__init__(reasons)
        self.reasons = reasons
        self.generation = generation
        self.partial = partial
        self.log_tail = log_tail
        self.bisect: list[str] = []  # with --llm-bisect: the first failing stage of the chain
        self.attribution: list[str] = []  # merged model failing: does the unmerged fine-tune fail too?


def _cut(text: str, limit: int) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f" ... ({len(text)} characters)"


class CaseItem(pytest.Item):
    """One suite case on one model variant and backend: generate, then check the output."""

    def __init__(self, *, case: Case, variant: str, backend: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.case = case
        self.variant = variant
        self.backend = backend
        self.worker_key = (variant, backend)
        self.worker_keys = (self.worker_key,)
        self.user_properties += [("variant", variant), ("backend", backend)]
        self.add_marker("llmmerge")
        self.add_marker("llmmerge_suite")
        for tag in case.tags:
            self.add_marker(pytest.mark.llmmerge_tag(tag))

    def request(self) -> Any:
        from .backends.base import GenRequest

        return GenRequest(prompt=self.case.prompt, messages=self.case.messages, max_new_tokens=self.case.max_new_tokens)

    def runtest(self) -> None:
        from .expectations import evaluate
        from .runner import Pending
        from .worker import DeadlineExceeded, WorkerError

        skip_unavailable(self.backend)
        if self.variant not in get_chain(self.config).available():
            pytest.skip(f"variant {self.variant!r} is not available in this run: the adapter-only and "
                        "reference variants need --llm-base (and --llm-adapter)")
        runner = get_runner(self.config)
        upcoming = [Pending(i.nodeid, i.request(), i.case.timeout_s) for i in self._upcoming()]
        try:
            generation = runner.generate(self.worker_key, Pending(self.nodeid, self.request(), self.case.timeout_s),
                                         upcoming)
        except DeadlineExceeded as exc:
            failure = CaseFailed([str(exc)], partial=exc.partial[0] if exc.partial else "")
        except WorkerError as exc:
            failure = CaseFailed([str(exc)], log_tail=exc.log_tail)
        else:
            self.user_properties += [("finish_reason", generation.finish_reason),
                                     ("new_tokens", len(generation.token_ids)),
                                     ("seconds", round(generation.seconds, 4))]
            reasons = evaluate(self.case, generation)
            if not reasons:
                return
            failure = CaseFailed(reasons, generation)
        settings = self.config.stash[SETTINGS_KEY]
        chain = get_chain(self.config)
        verdict = None
        if self.variant == "merged" and chain.n and chain.base is not None:
            verdict, failure.attribution = self._attribute()
        if verdict == "base" and isinstance(self.parent, DefaultSuite):
            # The built-in suite asks only what every healthy chat model does; a base that does
            # not do it shows the case does not fit this model, not that the release regressed.
            pytest.xfail(f"built-in case {self.case.id!r}: {failure.reasons[0]}; the base and the adapter-only "
                         "model fail it too, so it says nothing about this merge")
        if settings.bisect and self.variant == "merged" and chain.n:
            failure.bisect = self._bisect(failure.reasons[0])
        raise failure from None

    def _run_on(self, variant: str, backend: str | None = None) -> tuple[bool, str]:
        """(fails, what it did) for this case on another variant, same deadline (and backend,
        unless another is named)."""
        from .expectations import evaluate
        from .runner import Pending
        from .worker import WorkerError

        backend = backend or self.backend
        try:
            generation = get_runner(self.config).generate(
                (variant, backend), Pending(f"{self.nodeid}@{variant}-{backend}", self.request(), self.case.timeout_s))
        except WorkerError as exc:  # a missed deadline fails the case there too
            return True, str(exc).splitlines()[0]
        reasons = evaluate(self.case, generation)
        count = len(generation.token_ids)
        return bool(reasons), (reasons[0] if reasons else f"finish_reason={generation.finish_reason}, "
                               f"{count} token{'' if count == 1 else 's'}")

    def _workers_still_needed(self) -> set[Any]:
        """The workers this item and the items after it use: the rest may be closed, so that a
        probe of another variant holds one extra model at a time."""
        items = self.session.items
        later = items[items.index(self) + 1:] if self in items else []
        return {key for i in later for key in getattr(i, "worker_keys", ())} | {self.worker_key}

    def _attribute(self) -> tuple[str | None, list[str]]:
        """Run the case on the fine-tune unmerged, in the merged model's dtype and, when that
        passes, computed exactly (float32, HF: the parity truth); when the fine-tune fails too, on
        the base.  (merge | fine-tune | base, or None when it could not tell; the lines the
        failure prints.)

        A greedy output at a tipping point (a loop or not) can flip with rounding alone: the
        merge is blamed only when the fine-tune passes both in the candidate's dtype and exactly.
        """
        from .plugin_state import compute_dtype

        chain, settings = get_chain(self.config), self.config.stash[SETTINGS_KEY]
        keep = self._workers_still_needed()
        dtype = compute_dtype(chain.resolve("merged"), settings)
        say = progress_writer(self.config) or (lambda message: None)
        try:
            say(f"attribution {self.name}: the same case on the adapter-only model ({dtype})")
            adapter_fails, adapter_did = self._run_on("adapter@as-merged")
            where = f"adapter-only ({dtype}, {self.backend}: {adapter_did})"
            if not adapter_fails and dtype != "float32":
                # The same engine in float32; vLLM's exact side is HF's, as in parity.
                exact = "hf" if self.backend == "vllm" else self.backend
                say(f"attribution {self.name}: the same case on the adapter-only model (float32, {exact})")
                exact_fails, exact_did = self._run_on("adapter@float32", exact)
                if exact_fails:
                    adapter_fails = True
                    where = (f"the exact adapter-only model (float32, {exact}: {exact_did}), while it passes in "
                             f"{dtype} ({adapter_did}): whether this output passes depends on rounding alone")
                else:
                    where += f" and in float32 ({exact_did})"
            if not adapter_fails:
                verdict, lines = "merge", [f"attribution: passes on {where}: the merge broke it, not the fine-tune"]
            else:
                say(f"attribution {self.name}: the same case on the base")
                base_fails, base_did = self._run_on("reference")
                lines = [f"attribution: also fails on {where}: not the merge"]
                if base_fails:
                    verdict = "base"
                    lines.append(f"and on the base ({base_did}): the base already fails this case and the "
                                 "fine-tune did not fix it")
                else:
                    verdict = "fine-tune"
                    lines.append(f"the base passes ({base_did}): the fine-tune broke it")
        except Exception as exc:  # a variant that cannot load must not hide the case's own failure
            return None, [f"attribution could not finish: {type(exc).__name__}: {exc}"]
        finally:
            get_runner(self.config).keep_only(keep)
        self.user_properties += [("attribution", verdict), ("attribution_detail", "; ".join(lines))]
        return verdict, lines[:1] + ["  " + line for line in lines[1:]]

    def _bisect(self, reason: str) -> list[str]:
        """Probe the chain's stages with this case to name the adapter that broke it."""
        from .bisection import Probe, bisect_stages

        runner, chain = get_runner(self.config), get_chain(self.config)
        say = progress_writer(self.config) or (lambda message: None)
        keep = self._workers_still_needed()

        def probe(k: int) -> Probe:
            try:
                failed, did = self._run_on("reference" if k == 0 else f"stage{k}")
            finally:
                runner.keep_only(keep)  # one stage's model at a time
            say(f"bisect {self.name}: stage {k} {'fails' if failed else 'passes'}")
            return Probe(k, failed, did)

        try:
            found = bisect_stages(chain.n, probe, last=Probe(chain.n, True, reason))
        except Exception as exc:  # a build or load that fails must not hide the case's own failure
            return [f"bisect could not finish: {type(exc).__name__}: {exc}"]
        self.user_properties += [("bisect_first_failing_stage", found.first_bad),
                                 ("bisect_adapter", str(chain.adapters[found.first_bad - 1]) if found.first_bad
                                  else None)]
        return found.lines(chain.adapters, chain.built_now)

    def _upcoming(self) -> list[CaseItem]:
        items = self.session.items
        index = items.index(self)
        return [i for i in items[index + 1:] if isinstance(i, CaseItem) and i.worker_key == self.worker_key]

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        from .variants import BuildFailed

        error = excinfo.value
        if isinstance(error, BuildFailed):
            return f"case {self.case.id!r} on {self.variant}-{self.backend}: {error}"
        if not isinstance(error, CaseFailed):
            return super().repr_failure(excinfo, style=style)
        case = self.case
        prompt = case.prompt if case.prompt is not None else " | ".join(f"{r}: {c}" for r, c in case.messages or ())
        lines = [f"case {case.id!r} on {self.variant}-{self.backend} failed:"]
        lines += [f"  - {reason}" for reason in error.reasons]
        lines.append(f"  prompt: {_cut(prompt, 300)}")
        if error.generation is not None:
            g = error.generation
            lines.append(f"  output ({len(g.token_ids)} tokens, finish_reason={g.finish_reason}, "
                         f"stop token={g.stop_token_id}, budget={case.max_new_tokens}): {_cut(g.text, 500)}")
        if error.partial is not None:
            lines.append(f"  produced so far: {_cut(error.partial, 500)}")
        if error.log_tail:
            lines.append("  worker log (last lines):\n" + "\n".join("    " + line for line in error.log_tail.splitlines()))
        if case.note:
            lines.append(f"  why this case exists: {case.note}")
        lines += ["  " + line for line in error.attribution]
        lines += ["  " + line for line in error.bisect]
        return "\n".join(lines)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        line = self.case.line - 1 if self.case.line is not None else None  # pytest counts from 0
        return self.path, line, f"{self.case.id}[{self.variant}-{self.backend}]"


class ParityChecks(pytest.Collector):
    """`parity::stage<k>[<backend>]` per merge stage and `parity::merged-vs-reference[<backend>]`."""

    def collect(self) -> list[ParityItem]:
        settings = self.config.stash[SETTINGS_KEY]
        backends = [b for b in settings.backends if b in SCORING_BACKENDS]
        items: list[ParityItem] = []
        for backend in backends:
            for k in range(1, len(settings.adapters) + 1):
                items.append(ParityItem.from_parent(self, name=f"stage{k}[{backend}]", kind="stage", stage=k,
                                                    backend=backend))
            if settings.base is not None:
                items.append(ParityItem.from_parent(self, name=f"merged-vs-reference[{backend}]",
                                                    kind="reference", stage=0, backend=backend))
        return items


class ParityFailed(Exception):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(lines)
        self.lines = lines


class ComparisonItem(pytest.Item):
    """An item that compares two models and fails with a ParityReport's lines."""

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
        from .variants import BuildFailed
        from .worker import DeadlineExceeded, WorkerError

        if isinstance(excinfo.value, BuildFailed):
            return str(excinfo.value)
        if isinstance(excinfo.value, DeadlineExceeded):
            per = self.config.stash[SETTINGS_KEY].call_timeout_s
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
    from .parity import Sides

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
        adapters = self.config.stash[SETTINGS_KEY].adapters
        sides = stage_sides(stage if kind == "stage" else None, backend, "")
        self.variants = (f"stage{stage}-adapter", f"stage{stage}") if kind == "stage" else ("reference", "merged")
        keys = [sides.truth, sides.noise, sides.candidate] if kind == "stage" or adapters else [sides.candidate]
        self.worker_keys = tuple(keys) + ((("reference", backend),) if kind == "reference" else ())
        self.add_marker("llmmerge")
        self.add_marker("llmmerge_parity")

    def runtest(self) -> None:
        from . import parity
        from .plugin_state import compute_dtype

        skip_unavailable(self.backend)
        settings = self.config.stash[SETTINGS_KEY]
        runner = get_runner(self.config)
        chain = get_chain(self.config)
        deadline = settings.call_timeout_s
        self.user_properties += [("variant", self.variants[1]), ("backend", self.backend)]
        self.blamed = "merge"
        corpora: list[str] = self.config.stash[CORPORA_KEY]
        merged = f"stage{self.stage}" if self.kind == "stage" else "merged"
        dtype = compute_dtype(chain.resolve(merged), settings)
        sides = stage_sides(self.stage if self.kind == "stage" else None, self.backend, dtype)
        if self.kind == "stage":
            report = parity.compare_stage(runner, sides, parity.corpus_texts(corpora, settings.corpus),
                                          parity.greedy_prompts(), settings, deadline,
                                          blame=self._blame(chain, self.stage, dtype))
            if not report.ok:
                report.add_drift(chain, self.stage)
        else:
            report = parity.compare_reference(runner, sides if chain.n else None, ("reference", self.backend),
                                              parity.corpus_texts((), settings.corpus), settings, deadline,
                                              blame=self._blame(chain, chain.n, dtype) if chain.n else "")
        if report.skipped:
            pytest.skip(report.skipped)
        self.conclude(report)

    def _blame(self, chain: Any, stage: int, dtype: str) -> str:
        given = (stage == chain.n and chain.candidate is not None) or stage <= len(chain.given_stages)
        built = not given
        who = (f"stage {stage} was built by this plugin (--llm-merge-dtype {chain.merge_dtype})" if built else
               f"stage {stage} is {'your --llm-model' if stage == chain.n else 'your --llm-stage'}")
        return (f"the merge of adapter {stage} ({chain.adapters[stage - 1]}), not the fine-tune: the same "
                f"fine-tune unmerged, computed in {dtype} on {self.backend}, stays within the noise; {who}")

    def failure_head(self) -> str:
        return f"parity {self.name} failed ({' vs '.join(self.variants)}):"


class AgreementChecks(pytest.Collector):
    """`agreement::hf-vs-vllm[<variant>]`: the two engines agree on the same checkpoint."""

    def collect(self) -> list[AgreementItem]:
        settings = self.config.stash[SETTINGS_KEY]
        if not {"hf", "vllm"} <= set(settings.backends):
            return []
        return [AgreementItem.from_parent(self, name=f"hf-vs-vllm[{variant}]", variant=variant)
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
        from . import parity
        from .checkpoint import Checkpoint
        from .plugin_state import compute_dtype

        skip_unavailable("vllm")
        settings = self.config.stash[SETTINGS_KEY]
        runner = get_runner(self.config)
        spec = get_chain(self.config).resolve(self.variant)
        self.user_properties += [("variant", self.variant), ("backend", "hf-vs-vllm")]
        self.blamed = "serving"
        dtype = compute_dtype(spec, settings)
        sides = parity.Sides(truth=self.worker_keys[0], noise=self.worker_keys[1], candidate=self.worker_keys[2],
                             truth_name="float32 HF", noise_name=f"HF ({dtype})", candidate_name=f"vLLM ({dtype})",
                             dtype=dtype)
        corpora: list[str] = self.config.stash[CORPORA_KEY]
        report = parity.compare_backends(runner, sides, parity.corpus_texts(corpora, settings.corpus),
                                         parity.greedy_prompts(), Checkpoint(spec.path), settings,
                                         settings.call_timeout_s)
        self.conclude(report)

    def failure_head(self) -> str:
        return f"agreement {self.name} failed (HF transformers vs vLLM on the same checkpoint):"
