"""The suite items: `<case>[<variant>-<backend>]` for each case of each YAML suite (or of the
built-in suite), generated on one worker, checked against the case's expectations; a merged
model's failure says whether the merge or the fine-tune broke it, and which stage did.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ..backends.base import GenRequest
from ..bisection import Bisection, Probe, bisect_stages
from ..expectations import evaluate
from ..runner import Pending
from ..suite import SuiteError, load_suite
from ..variants import BuildFailed
from ..worker import DeadlineExceeded, WorkerError
from .baseline_items import output_top_ids

if TYPE_CHECKING:
    from ..backends.base import Generation
    from ..suite import Case, Suite
    from .run import LlmMergeRun


def _case_items(parent: pytest.Collector, suite: Suite, run: LlmMergeRun) -> Iterator[CaseItem]:
    settings = run.settings
    for case in suite.cases:
        for variant in case.variants:
            # A case without `backends` runs on every backend of the run; one with them, on those.
            for backend in (b for b in settings.backends if not case.backends or b in case.backends):
                yield CaseItem.from_parent(parent, name=f"{case.id}[{variant}-{backend}]", case=case,
                                           variant=variant, backend=backend, run=run)


class SuiteFile(pytest.File):
    """A YAML suite; a bad one is reported as a usage error naming the file and JSON path."""

    def __init__(self, *, run: LlmMergeRun, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run = run

    def collect(self) -> Iterator[CaseItem]:
        self.run.suite_files.append(self.path)
        try:
            suite = load_suite(self.path)
        except SuiteError as exc:
            self.run.suite_errors.append(str(exc))
            return iter(())
        self.run.corpora.extend(suite.corpus)
        return _case_items(self, suite, self.run)


class DefaultSuite(pytest.Collector):
    """The built-in suite, run when --llm-model is given and no suite is."""

    def __init__(self, *, suite: Suite, run: LlmMergeRun, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.suite = suite
        self.run = run

    def collect(self) -> list[CaseItem]:
        return list(_case_items(self, self.suite, self.run))


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


def _bisect_metrics(found: Bisection, adapters: Sequence[Path]) -> list[tuple[str, object]]:
    """The report's bisection figures.  Never fixed: no first failing stage after a passing one
    and no adapter to blame, so both are None (not 0, which reads as a stage) and
    `bisect_never_fixed` says why."""
    if found.never_fixed:
        return [("bisect_first_failing_stage", None), ("bisect_adapter", None),
                ("bisect_last_passing_stage", None), ("bisect_fixed_by_stage", None), ("bisect_never_fixed", True)]
    return [("bisect_first_failing_stage", found.first_bad),
            ("bisect_adapter", str(adapters[found.first_bad - 1])),
            ("bisect_last_passing_stage", found.last_good),
            ("bisect_fixed_by_stage", found.fixed_by),
            ("bisect_never_fixed", False)]


class CaseItem(pytest.Item):
    """One suite case on one model variant and backend: generate, then check the output."""

    def __init__(self, *, case: Case, variant: str, backend: str, run: LlmMergeRun, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run = run
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
        return GenRequest(prompt=self.case.prompt, messages=self.case.messages, max_new_tokens=self.case.max_new_tokens)

    def runtest(self) -> None:
        self._probed: dict[tuple[str, str], tuple[bool, str]] = {}
        self._stages_before = dict(self.run.the_chain.built_now) if self.run.chain is not None else {}
        self.run.skip_unavailable(self.backend)
        if self.variant not in self.run.the_chain.available():
            pytest.skip(f"variant {self.variant!r} is not available in this run: the adapter-only and "
                        "reference variants need --llm-base (and --llm-adapter)")
        runner = self.run.the_runner
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
                                     ("stop_token_id", generation.stop_token_id),
                                     ("output_token_ids", list(generation.token_ids)),
                                     ("output_text", generation.text),
                                     ("new_tokens", len(generation.token_ids)),
                                     ("seconds", round(generation.seconds, 4))]
            self.run.generations[self.nodeid] = generation
            if self.run.settings.baseline_save is not None:
                self.user_properties += [("output_top_ids", output_top_ids(self.run, self.variant, self.backend,
                                                                           generation)),
                                         ("top_k", self.run.settings.top_k)]
            reasons = evaluate(self.case, generation)
            if not reasons:
                return
            failure = CaseFailed(reasons, generation)
        settings, chain = self.run.settings, self.run.the_chain
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
        unless another is named); once per variant and backend (the attribution's run on the
        base is the bisection's probe of stage 0)."""
        backend = backend or self.backend
        if (variant, backend) not in self._probed:
            self._probed[(variant, backend)] = self._generate_on(variant, backend)
        return self._probed[(variant, backend)]

    def _generate_on(self, variant: str, backend: str) -> tuple[bool, str]:
        try:
            generation = self.run.the_runner.generate(
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
        later = self.run.later_items(self)
        return {key for i in later for key in getattr(i, "worker_keys", ())} | {self.worker_key}

    def _attribute(self) -> tuple[str | None, list[str]]:
        """Run the case on the fine-tune unmerged, in the merged model's dtype and, when that
        passes, computed exactly (float32, HF: the parity truth); when the fine-tune fails too, on
        the base.  (merge | fine-tune | base, or None when it could not tell; the lines the
        failure prints.)

        A greedy output at a tipping point (a loop or not) can flip with rounding alone: the
        merge is blamed only when the fine-tune passes both in the candidate's dtype and exactly.
        """
        keep = self._workers_still_needed()
        dtype = self.run.compute_dtype(self.run.the_chain.resolve("merged"))
        say = self.run.say
        try:
            say(f"attribution {self.name}: the same case on the adapter-only model ({dtype})")
            adapter_fails, adapter_did = self._run_on("adapter@as-merged")
            where = f"adapter-only ({dtype}, {self.backend}: {adapter_did})"
            if not adapter_fails and dtype != "float32":
                # The same engine in float32; vLLM's exact side is HF's, as in parity.
                exact = "hf" if self.backend in ("vllm", "vllm-serve") else self.backend
                say(f"attribution {self.name}: the same case on the adapter-only model (float32, {exact})")
                exact_fails, exact_did = self._run_on("adapter@float32", exact)
                if exact_fails:
                    adapter_fails = True
                    where = (f"the exact adapter-only model (float32, {exact}: {exact_did}), while it passes in "
                             f"{dtype} ({adapter_did}): whether this output passes depends on rounding alone")
                else:
                    where += f" and in float32 ({exact_did})"
            if not adapter_fails:
                verdict, lines = "merge", [f"attribution: passes on {where}: the merge broke it, not the fine-tune",
                                           self.run.merge_verdict()]
            else:
                say(f"attribution {self.name}: the same case on the base")
                base_fails, base_did = self._run_on("reference")
                lines = [f"attribution: also fails on {where}: not the merge"]
                if base_fails:
                    verdict = "base"
                    # With a chain, a stage in between may pass: that is the bisection's to find.
                    chain_note = "" if self.run.the_chain.n < 2 else \
                        " (an intermediate stage may pass: --llm-bisect finds where it broke again)"
                    lines.append(f"and on the base ({base_did}): the base already fails this case and the "
                                 f"fine-tune, unmerged, does not pass it either{chain_note}")
                else:
                    verdict = "fine-tune"
                    lines.append(f"the base passes ({base_did}): the fine-tune broke it")
        except Exception as exc:  # a variant that cannot load must not hide the case's own failure
            return None, [f"attribution could not finish: {type(exc).__name__}: {exc}"]
        finally:
            self.run.the_runner.keep_only(keep)
        self.user_properties += [("attribution", verdict), ("attribution_detail", "; ".join(lines))]
        return verdict, lines[:1] + ["  " + line for line in lines[1:]]

    def _bisect(self, reason: str) -> list[str]:
        """Probe the chain's stages with this case to name the adapter that broke it."""
        runner, chain = self.run.the_runner, self.run.the_chain
        say = self.run.say
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
        self.user_properties += _bisect_metrics(found, chain.adapters)
        # Built for this case: a stage an earlier item built is, to this case, from the cache.
        built_here = {k: new and k not in self._stages_before for k, new in chain.built_now.items()}
        lines = found.lines(chain.adapters, built_here)
        k = found.first_bad
        given = "your --llm-model" if k == chain.n and chain.candidate is not None else \
            "your --llm-stage" if 0 < k <= len(chain.given_stages) else None
        if given is not None:
            # The stage is the user's own merge: adapter k or the merge of it broke the case.
            lines.insert(1, f"  stage {k} is {given}, not a merge this plugin built: adapter {k} or your merge of it "
                         "broke it (the attribution and the merge diagnosis tell which)")
            self.user_properties.append(("bisect_stage_given", True))
        return lines

    def _upcoming(self) -> list[CaseItem]:
        return [i for i in self.run.later_items(self) if isinstance(i, CaseItem) and i.worker_key == self.worker_key]

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
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
            if case.messages is not None and g.prompt_text:  # the chat template's rendering (the server's, served)
                lines.append(f"  prompt as rendered: {_cut(g.prompt_text, 300)}")
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


