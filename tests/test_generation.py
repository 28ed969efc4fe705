"""Suites run as items on the real fixture models through the HF backend in a worker."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import MERGED, REPO

HANG_SUITE = """
defaults:
  max_new_tokens: 24
  must_terminate: false
  timeout_s: {timeout}
cases:
  - id: before
    prompt: "Repeat: apple river stone\\nAnswer:"
  - id: trigger
    messages:
      - role: user
        content: "功能清单:\\n功能:查询天气 功能说明:用户想知道天气。\\n{option}\\n问题: 今天几号?"
  - id: after-1
    prompt: "Reverse: a b c\\nAnswer:"
  - id: after-2
    prompt: "重复: 苹果 河流\\n答案:"
"""
HANG_OPTION = "功能:无法判断 功能说明:不属于上述描述的功能。"
DEADLINE = 8


def run_suite(pytester: pytest.Pytester, suite: str, *args: str, model: Path = MERGED) -> pytest.RunResult:
    (pytester.path / "suite.yaml").write_text(suite, encoding="utf-8")
    shutil.copy(REPO / "tests" / "hanging_backend.py", pytester.path)
    return pytester.runpytest_subprocess(f"--llm-model={model}", "-m", "llmmerge_suite", "suite.yaml", *args)


HF = "--llm-backend=hf"  # these prove the HF backend; the vLLM backend has its own tests


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def test_smoke_suite_passes_on_healthy_merge_with_one_load(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(f"--llm-model={MERGED}", "-m", "llmmerge_suite", HF,
                                           str(REPO / "example_suites" / "smoke.yaml"), "-v")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= 5 and "failed" not in outcomes, result.stdout.str()
    result.stdout.fnmatch_lines(["*merged-hf: 1 model load(s)*"])


@pytest.mark.parametrize("batch", ["1", "8"])
def test_a_hang_fails_its_item_by_deadline_and_the_session_goes_on(pytester: pytest.Pytester, batch: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pid_file = pytester.path / "pids.txt"
    monkeypatch.setenv("LLMMERGE_TEST_PID_FILE", str(pid_file))
    backend = ("--llm-backend", "hanging_backend:HangingHF", "--llm-batch-size", batch)
    start = time.monotonic()
    quiet = run_suite(pytester, HANG_SUITE.format(timeout=DEADLINE, option="功能:其他"), *backend)
    without = time.monotonic() - start
    quiet.assert_outcomes(passed=4)

    start = time.monotonic()
    result = run_suite(pytester, HANG_SUITE.format(timeout=DEADLINE, option=HANG_OPTION), *backend)
    with_hang = time.monotonic() - start
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines([
        "*trigger*hanging_backend:HangingHF* failed:",
        f"*no result after {DEADLINE} s (worker killed)*",
        "*produced so far: '*",
    ])
    assert re.search(r"FAILED suite.yaml::trigger\[", result.stdout.str())
    # Every worker that was started is gone: killed at its deadline or closed at the end.
    pids = [int(p) for p in pid_file.read_text().split()]
    assert len(pids) >= 3 and not [p for p in pids if alive(p)]
    if batch == "1":
        # The bound: one deadline plus a fresh worker's load, not more.
        assert with_hang - without <= DEADLINE + 30, (with_hang, without)


def test_lost_eos_fails_termination_with_finish_reason_length(pytester: pytest.Pytester,
                                                               broken: Callable[[str], Path]) -> None:
    model = broken("eos_removed")
    result = pytester.runpytest_subprocess(f"--llm-model={model}", "-m", "llmmerge_suite", HF,
                                           str(REPO / "example_suites" / "smoke.yaml"))
    output = result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert "finish_reason=length" in output and "did not terminate" in output
    assert "finish_reason=stop" not in output


def test_lost_chat_template_fails_messages_cases_clearly(pytester: pytest.Pytester,
                                                          broken: Callable[[str], Path]) -> None:
    model = broken("chat_template_deleted")
    result = pytester.runpytest_subprocess(f"--llm-model={model}", "-m", "llmmerge_suite", "-rf", HF,
                                           str(REPO / "example_suites" / "chat.yaml"))
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) >= 1 and "passed" not in outcomes
    result.stdout.fnmatch_lines(["*the model has no chat template, so chat messages cannot be rendered*"])


def test_default_suite_runs_when_no_suite_is_given(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(f"--llm-model={MERGED}", "-m", "llmmerge_suite", "-v", HF)
    result.stdout.fnmatch_lines(["default-suite::*[[]merged-hf[]] *"])
    assert "failed" not in result.parseoutcomes()


def test_bad_suite_is_a_usage_error_naming_file_and_path(pytester: pytest.Pytester) -> None:
    (pytester.path / "bad.yaml").write_text("cases:\n  - id: a\n    prompt: x\n    max_new_tokens: -1\n")
    result = pytester.runpytest_subprocess(f"--llm-model={MERGED}", "bad.yaml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*bad.yaml: cases[[]0[]].max_new_tokens: -1 is less than the minimum of 1*"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


def test_case_on_a_variant_the_run_lacks_is_skipped_and_the_rest_run(pytester: pytest.Pytester) -> None:
    """An adapter-only case in a run without --llm-adapter skips; the items around it still run
    (it once broke the previous item's teardown, which closes workers later items do not need)."""
    pytester.makefile(".yaml", lacking="""\
cases:
  - {id: a, prompt: "Repeat: apple\\n", max_new_tokens: 8, must_terminate: false}
  - {id: b, prompt: "Repeat: apple\\n", max_new_tokens: 8, must_terminate: false, variants: [adapter]}
  - {id: c, prompt: "Repeat: river\\n", max_new_tokens: 8, must_terminate: false}
""")
    result = pytester.runpytest_subprocess(f"--llm-model={MERGED}", "--llm-backend=hf", "-m", "llmmerge_suite",
                                           "lacking.yaml", "-rs")
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines(["*variant 'adapter' is not available in this run*"])
