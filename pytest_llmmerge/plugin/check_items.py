"""The `integrity::`, `weights::` and `audit::` items: one per check, failing with its findings."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ..checks import checks_of
from ..checks.base import Check, IntegrityWarning, run_check
from ..variants import BuildFailed

if TYPE_CHECKING:
    from .run import LlmMergeRun


class CheckFailed(Exception):
    def __init__(self, findings: list[Any], model: Path, summary: str | None = None) -> None:
        super().__init__(findings)
        self.findings = findings
        self.model = model
        self.summary = summary


class CheckGroup(pytest.Collector):
    """One group of checks (integrity: files and headers; weights: tensor data; audit: the
    merge diagnosis, with a base and adapters), one item per check of the registry."""

    def __init__(self, *, group: str, run: LlmMergeRun, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.group = group
        self.run = run

    def collect(self) -> list[pytest.Item]:
        return [CheckItem.from_parent(self, name=check.name, check=check, run=self.run)
                for check in checks_of(self.group)]


class CheckItem(pytest.Item):
    """One check of the checkpoint's files, tensors or merge, failing with its findings."""

    def __init__(self, *, check: Check, run: LlmMergeRun, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.check = check
        self.run = run
        self.worker_keys: tuple[tuple[str, str], ...] = ()  # reads files only, needs no model
        self.findings: list[dict[str, str]] = []
        self.add_marker("llmmerge")
        self.add_marker(f"llmmerge_{check.group}")

    def runtest(self) -> None:
        context = self.run.check_context()
        outcome = run_check(self.check, context)
        self.user_properties.extend((f.code, f.render()) for f in outcome.findings)
        self.findings = [dataclasses.asdict(f) for f in outcome.findings]  # onto the report: see LlmMergeRun
        if self.check.figures is not None:  # tables the check computed: JUnit XML and the reports
            self.user_properties.extend(self.check.figures(context))
        summary = self.check.summary(context) if self.check.summary is not None else None
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
            raise CheckFailed(outcome.errors, context.model.path, summary)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, BuildFailed):
            return f"{self.check.group} check {self.check.name!r}: {excinfo.value}"
        if isinstance(excinfo.value, CheckFailed):
            lines = [f"{self.check.group} check {self.check.name!r} failed on {excinfo.value.model}:"]
            if excinfo.value.summary:
                lines.append(f"  verdict: {excinfo.value.summary}")
            for finding in excinfo.value.findings:
                lines.append(f"  {finding.code} {finding.file}: {finding.message}")
            return "\n".join(lines)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"{self.check.group}::{self.check.name}"

