"""The JSON and Markdown reports, JUnit properties, the terminal summary, and pytest-xdist runs."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import BASE, MERGED
from pytest_llmmerge import report
from pytest_llmmerge.checks import checks_of

SUITE = """\
suite: gate
defaults: {max_new_tokens: 24, timeout_s: 120}
cases:
  - id: stops
    prompt: "Repeat: apple river stone\\n"
    must_terminate: true
  - id: chat
    messages: [{role: user, content: Hello}]
    must_terminate: true
  - id: impossible
    prompt: "Repeat: apple\\n"
    expect: {contains: "this text is never produced"}
"""


def run(pytester: pytest.Pytester, model: Path, *extra: str) -> pytest.RunResult:
    pytester.makefile(".yaml", gate=SUITE)
    return pytester.runpytest_subprocess(f"--llm-model={model}", f"--llm-base={BASE}", "--llm-backend=hf",
                                         "-p", "no:cacheprovider", "gate.yaml", *extra)


def outcomes(data: dict[str, object]) -> dict[str, str]:
    return {i["nodeid"]: i["outcome"] for i in data["items"]}  # type: ignore[attr-defined, index]


def test_reports_junit_and_summary(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                   broken: Callable[[str], Path]) -> None:
    model = broken("nan_in_weights")
    step_summary = pytester.path / "step-summary.md"
    step_summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step_summary))
    # No adapter given: merged-vs-reference runs only with an absolute forgetting limit.
    result = run(pytester, model, "--llm-report=out/report.json", "--llm-report-md=out/report.md",
                 "--junitxml=out/junit.xml", "--llm-max-ppl-ratio=1.5")
    assert result.ret == pytest.ExitCode.TESTS_FAILED

    data = json.loads((pytester.path / "out" / "report.json").read_text())
    report.validate(data)
    items = {i["nodeid"]: i for i in data["items"]}
    assert data["summary"]["failed"] == 3 and data["summary"]["exit_status"] == 1
    assert items["weights::finite"]["outcome"] == "failed"
    (finding,) = items["weights::finite"]["findings"]
    assert finding["code"] == "WGT013" and finding["severity"] == "error" and "NaN" in finding["message"]
    case = items["gate.yaml::stops[merged-hf]"]
    assert (case["kind"], case["variant"], case["backend"]) == ("suite", "merged", "hf")
    assert case["metrics"]["finish_reason"] == "stop" and case["metrics"]["new_tokens"] > 0
    assert items["gate.yaml::impossible[merged-hf]"]["outcome"] == "failed"
    assert "this text is never produced" in items["gate.yaml::impossible[merged-hf]"]["message"]
    # NaN logits make every token's log-probability NaN: parity names that instead of passing
    # (a NaN compares false with every tolerance), and the figures stay in the report as strings.
    parity = items["parity::merged-vs-reference[hf]"]
    assert parity["kind"] == "parity" and parity["outcome"] == "failed"
    assert parity["metrics"]["merged"] == "nan" and "hold NaN or Inf" in parity["message"]
    assert data["workers"]["merged-hf"]["loads"] == 1 and data["summary"]["model_loads"] == 2
    assert {"torch", "transformers", "peft", "pytest-llmmerge"} <= set(data["versions"])

    markdown = (pytester.path / "out" / "report.md").read_text()
    assert "## pytest-llmmerge: ❌ gated: do not ship" in markdown
    # The NaN model "stops" at once: argmax of NaN logits is token 0, the eos. Only
    # weights::finite and parity show what is wrong.
    assert "### Suite cases on `merged` with `hf` (3/3 stopped at eos)" in markdown
    assert "| `weights::finite` | ❌ failed | WGT013" in markdown
    assert step_summary.read_text() == "earlier step\n" + markdown

    junit = ET.parse(pytester.path / "out" / "junit.xml").getroot()
    props = {(case.get("name"), p.get("name")): p.get("value") for case in junit.iter("testcase")
             for p in case.iter("property")}
    assert props[("stops[merged-hf]", "finish_reason")] == "stop"
    assert props[("merged-vs-reference[hf]", "merged")] == "nan"
    assert "WGT013" in {name for _, name in props}
    assert report.FINDINGS not in {name for _, name in props}  # findings reach the JSON on the report instead

    result.stdout.fnmatch_lines(["*= llmmerge summary =*", "suite cases * passed failed  stopped at eos *",
                                 "merged-hf * 2 * 1 * 3/3 *", "parity::merged-vs-reference[[]hf[]] * failed *",
                                 "worker merged-hf: 1 model load(s)*", "report written to *report.json"])


def test_xdist_gives_the_same_outcomes_as_a_serial_run(pytester: pytest.Pytester) -> None:
    serial = run(pytester, MERGED, "--llm-report=serial.json")
    parallel = run(pytester, MERGED, "--llm-report=parallel.json", "-n", "2")
    assert serial.ret == parallel.ret == pytest.ExitCode.TESTS_FAILED  # the impossible case
    a = json.loads((pytester.path / "serial.json").read_text())
    b = json.loads((pytester.path / "parallel.json").read_text())
    assert outcomes(a) == outcomes(b)
    # One item per integrity and weights check, plus the suite's.
    assert len(outcomes(a)) == len(checks_of("integrity")) + len(checks_of("weights")) + 3 + 1
    # Each xdist process loads what its own items need; the controller adds up their loads.
    # Only the merged model: merged-vs-reference skips without an adapter or a forgetting limit.
    assert b["summary"]["model_loads"] >= a["summary"]["model_loads"] == 1
    finish = {i["nodeid"]: i["metrics"].get("finish_reason") for i in a["items"]}
    assert finish == {i["nodeid"]: i["metrics"].get("finish_reason") for i in b["items"]}


def test_a_report_that_cannot_be_written_keeps_the_verdict_and_the_summary(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk or a bad path at the very end must not turn a run into a traceback: every
    item keeps its outcome, the summary is printed, the lost file is named and the job fails."""
    (pytester.path / "a-file").write_text("a file, not a directory")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(pytester.path))  # a directory: appending fails
    result = pytester.runpytest_subprocess(f"--llm-model={MERGED}", f"--llm-base={BASE}", "-p", "no:cacheprovider",
                                           "-m", "llmmerge_integrity", "--llm-report=a-file/report.json",
                                           "--llm-report-md=report.md")
    output = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in output and "INTERNALERROR" not in output
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert result.parseoutcomes().get("failed", 0) == 0 and result.parseoutcomes()["passed"] > 5
    result.stdout.fnmatch_lines(["*llmmerge summary*", "*report NOT written to *a-file/report.json:*",
                                 "*GitHub step summary NOT written to*"])
    result.stdout.fnmatch_lines(["*Markdown report written to *report.md"])
    assert (pytester.path / "report.md").is_file()
    assert not list(pytester.path.glob(".*.tmp"))


def test_the_step_summary_is_never_appended_to_a_fifo_or_device(tmp_path: Path) -> None:
    """GITHUB_STEP_SUMMARY pointing at a FIFO hung the end of the run (an open for append blocks)."""
    import os

    from pytest_llmmerge.report import append_text

    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError, match="is not a regular file"):
        append_text("x", tmp_path / "fifo")
    append_text("a", tmp_path / "new.md")
    append_text("b", tmp_path / "new.md")
    assert (tmp_path / "new.md").read_text() == "ab"
