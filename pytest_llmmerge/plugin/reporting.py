"""The report hooks: one record per item, model loads from every xdist process, files at the end."""

from __future__ import annotations

import dataclasses
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .. import baseline, html_report, report
from ..report import FINDINGS, record, terminal_lines
from ..settings import checkpoint_holding

if TYPE_CHECKING:
    from .run import LlmMergeRun

_KINDS = ("integrity", "weights", "audit", "suite", "parity", "agreement", "baseline")


class Reporting:
    """Gathers one record per item and the workers' model loads; writes the reports at the end.

    Registered as a plugin object in pytest_configure, so its hooks see the run's config.
    """

    def __init__(self, run: LlmMergeRun) -> None:
        self.run = run
        self.config = run.config
        self.settings = run.settings
        self.records: dict[str, Any] = {}
        self.remote_workers: dict[str, dict[str, Any]] = {}  # model loads of xdist processes
        self.write_errors: list[str] = []  # reports that could not be written, for the summary

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """The call phase of each item, or the phase that skipped or failed it."""
        if (report.when != "call" and report.outcome == "passed") or \
                (report.when == "teardown" and report.outcome != "failed"):
            return
        kind = next((k for k in _KINDS if f"llmmerge_{k}" in report.keywords), "test")
        given = {k: v for k, v in report.user_properties if k in ("variant", "backend")}
        message = None
        if hasattr(report, "wasxfail"):
            message = f"xfail: {report.wasxfail}"
        elif report.skipped and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2]).removeprefix("Skipped: ")
        elif report.failed:
            message = report.longreprtext[:4000]
        outcome = "xfailed" if hasattr(report, "wasxfail") and report.skipped else report.outcome
        self.records[report.nodeid] = record(  # a failing teardown replaces the call's record
            report.nodeid, kind, outcome, report.duration,
            [(k, v) for k, v in report.user_properties if k not in given],
            variant=str(given["variant"]) if "variant" in given else None,
            backend=str(given["backend"]) if "backend" in given else None, message=message,
            findings=getattr(report, FINDINGS, ()))

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """pytest-xdist: add up the model loads each xdist process's workers reported."""
        _add_stats(self.remote_workers, getattr(node, "workeroutput", {}).get("llmmerge_workers", {}))

    def worker_stats(self) -> dict[str, dict[str, Any]]:
        combined = {label: dict(numbers) for label, numbers in self.remote_workers.items()}
        if self.run.runner is not None:
            _add_stats(combined, {label: dataclasses.asdict(stats) for label, stats in self.run.runner.stats().items()})
        return combined

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        """Write --llm-report / --llm-report-md once: on the xdist controller, or the only process."""
        if hasattr(self.config, "workerinput"):  # an xdist process: hand the controller our model loads
            self.config.workeroutput["llmmerge_workers"] = self.worker_stats()  # type: ignore[attr-defined]
            return
        settings = self.settings
        if all(path is None for path in (settings.report, settings.report_md, settings.report_html,
                                          settings.baseline_save)):
            return
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        built = report.build(list(self.records.values()), settings=dataclasses.asdict(settings),
                             workers=self.worker_stats(), exit_status=int(exitstatus), created=created)
        writes: list[tuple[str, Path, Any]] = []
        if settings.baseline_save is not None:
            saved = baseline.build(list(self.records.values()), provenance=self._provenance(), created=created)
            writes.append(("baseline", settings.baseline_save, lambda path: baseline.write(saved, path)))
        if settings.report is not None:
            writes.append(("report", settings.report, lambda path: report.write_json(built, path)))
        if settings.report_html is not None:
            page = html_report.render(built)
            writes.append(("HTML report", settings.report_html, lambda path: report.write_text(page, path)))
        if settings.report_md is not None:
            text = report.markdown(built)
            writes.append(("Markdown report", settings.report_md, lambda path: report.write_text(text, path)))
            summary = os.environ.get("GITHUB_STEP_SUMMARY")
            if summary:
                writes.append(("GitHub step summary", Path(summary), lambda path: report.append_text(text, path)))
        for what, path, write in writes:
            holder = checkpoint_holding(settings, path)
            if holder is not None:
                self.write_errors.append(f"{what} NOT written to {path}: it lies inside the checkpoint {holder}")
                continue
            try:
                write(path)
            except OSError as exc:
                # The run's verdict stands and its summary is still printed; the job fails, since
                # the report it asked for is missing.
                self.write_errors.append(f"{what} NOT written to {path}: {exc.strerror or exc}")
        if self.write_errors and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def _provenance(self) -> dict[str, Any]:
        """The run's provenance, with the suites its items came from (the xdist controller
        collects none itself)."""
        root = self.config.rootpath
        return self.run.provenance({root / r.nodeid.split("::", 1)[0] for r in self.records.values()
                                    if r.kind == "suite"})

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        """Termination and parity figures per variant and backend, and the model loads per worker."""
        lines = terminal_lines(list(self.records.values()), self.worker_stats())
        failed = " ".join(self.write_errors)
        lines += [f"{what} written to {path}" for what, path in (("report", self.settings.report),
                                                                ("Markdown report", self.settings.report_md),
                                                                ("HTML report", self.settings.report_html),
                                                                ("baseline", self.settings.baseline_save))
                  if path and f" {path}:" not in failed]
        lines += self.write_errors
        if lines:
            terminalreporter.section("llmmerge summary")
            for line in lines:
                terminalreporter.write_line(line)


def _add_stats(total: dict[str, dict[str, Any]], more: dict[str, dict[str, Any]]) -> None:
    for label, numbers in more.items():
        mine = total.setdefault(label, {})
        for key, value in numbers.items():
            mine[key] = mine.get(key, 0) + value
