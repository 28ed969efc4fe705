"""The pytest wiring, tested through real pytest runs (pytester, in subprocesses)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from breakage import BREAKAGES
from conftest import BASE, MERGED, REPO
from pytest_llmmerge.checks import checks_of
from pytest_llmmerge.option_specs import OPTIONS

HEAVY = ("torch", "transformers", "peft", "vllm", "safetensors")
FILE_CHECKS = (*checks_of("integrity"), *checks_of("weights"))
N_CHECKS = len(FILE_CHECKS)
N_BASE_CHECKS = sum(c.needs_base for c in FILE_CHECKS)
# Paths are passed as --opt=PATH: pytest picks its rootdir from path-like arguments, and the
# value of an unknown-at-that-time option given as a separate word would count as one.
# The integrity and weight items alone: without a suite the built-in default suite would also run.
ONLY = ("-m", "llmmerge_integrity or llmmerge_weights")


def test_help_lists_every_option_in_one_group_without_importing_torch(tmp_path: Path) -> None:
    code = ("import sys, pytest\n"
            "pytest.main(['--help'])\n"
            f"print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path).stdout
    group = out[out.index("LLM merge gating (pytest-llmmerge)"):]
    for spec in OPTIONS:
        assert spec.flag in group
        assert f"{spec.ini} (" in out  # the ini twin is listed in the ini section
    assert "HEAVY []" in out


def test_no_items_without_model(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_plain(): pass")
    result = pytester.runpytest_subprocess("-v")
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("*integrity::*")


def test_healthy_model_with_base_passes_every_item(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        "import sys\n"
        "def pytest_sessionfinish(session):\n"
        f"    heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "    print('HEAVY', heavy)\n")
    result = pytester.runpytest_subprocess(f"--llm-model={MERGED}", f"--llm-base={BASE}", "-v", "-s", "-rA", *ONLY)
    result.assert_outcomes(passed=N_CHECKS)
    result.stdout.fnmatch_lines(["llmmerge model: *merged", "*integrity::config PASSED*",
                                 "*integrity::weights_vs_base PASSED*", "*weights::finite*",
                                 "[[]llmmerge[]] weights: reading model-00003-of-00003.safetensors (3/3, 13 tensors, *",
                                 "PASSED*", "*HEAVY []", "PASSED weights::change_vs_base"])
    # Progress goes on lines of its own: an item's name is never written twice.
    assert result.stdout.str().count("weights::finite") == 2  # its -v line and the -rA summary


def test_items_run_even_when_a_test_path_holds_no_tests(pytester: pytest.Pytester) -> None:
    (pytester.path / "suites").mkdir()
    result = pytester.runpytest_subprocess(f"--llm-model={MERGED}", f"--llm-base={BASE}", "suites", *ONLY)
    result.assert_outcomes(passed=N_CHECKS)
    assert result.ret == 0


def test_without_base_base_checks_are_skipped(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(f"--llm-model={MERGED}", "-rs", *ONLY)
    result.assert_outcomes(passed=N_CHECKS - N_BASE_CHECKS, skipped=N_BASE_CHECKS)
    result.stdout.fnmatch_lines(["*needs --llm-base*"])


def test_ini_twins(pytester: pytest.Pytester) -> None:
    pytester.makeini(f"[pytest]\nllm_model = {MERGED}\nllm_base = {BASE}\n")
    pytester.runpytest_subprocess(*ONLY).assert_outcomes(passed=N_CHECKS)


def test_env_variables(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMMERGE_MODEL", str(MERGED))
    monkeypatch.setenv("LLMMERGE_BASE", str(BASE))
    pytester.runpytest_subprocess(*ONLY).assert_outcomes(passed=N_CHECKS)


def test_cli_beats_env_beats_ini(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                 broken: Callable[[str], Path]) -> None:
    bad = broken("no_generation_config")
    pytester.makeini(f"[pytest]\nllm_model = {bad}\nllm_base = {BASE}\n")
    pytester.runpytest_subprocess(*ONLY).assert_outcomes(passed=N_CHECKS - 2, failed=2, warnings=2)
    monkeypatch.setenv("LLMMERGE_MODEL", str(MERGED))
    pytester.runpytest_subprocess(*ONLY).assert_outcomes(passed=N_CHECKS)
    monkeypatch.setenv("LLMMERGE_MODEL", str(bad))
    pytester.runpytest_subprocess(f"--llm-model={MERGED}", *ONLY).assert_outcomes(passed=N_CHECKS)


def test_keyword_selection_applies_to_generated_items(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(f"--llm-model={MERGED}", f"--llm-base={BASE}",
                                           "-k", "generation_config", *ONLY)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*2 passed, * deselected*"])


@pytest.mark.parametrize("args,message", [
    (["--llm-model=does/not/exist"], "*--llm-model: *does/not/exist does not exist*"),
    (["--llm-model=empty"], "*--llm-model: *empty is empty*"),
    ([f"--llm-model={MERGED}", f"--llm-adapter={MERGED}"], "*--llm-adapter needs --llm-base*"),
])
def test_bad_paths_are_usage_errors(pytester: pytest.Pytester, args: list[str], message: str) -> None:
    (pytester.path / "empty").mkdir()
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_bad_env_bool_is_a_usage_error_naming_the_variable(pytester: pytest.Pytester,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMMERGE_ALLOW_PICKLE", "maybe")
    result = pytester.runpytest_subprocess(f"--llm-model={MERGED}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*environment variable LLMMERGE_ALLOW_PICKLE: 'maybe' is not a boolean*"])


@pytest.mark.parametrize("name", sorted(n for n, (_, codes, _) in BREAKAGES.items() if codes))
def test_breakage_fails_its_items_with_code_and_file(pytester: pytest.Pytester, name: str,
                                                     broken: Callable[[str], Path]) -> None:
    model = broken(name)
    _, codes, _ = BREAKAGES[name]
    failing = sorted(c.name for c in FILE_CHECKS if set(c.codes) & codes)
    result = pytester.runpytest_subprocess(f"--llm-model={model}", f"--llm-base={BASE}", "-rfs", *ONLY)
    output = result.stdout.str()
    assert "INTERNALERROR" not in output + result.stderr.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    failed = sorted(line.split("::")[1].split()[0] for line in output.splitlines() if line.startswith("FAILED "))
    assert failed == failing
    for code in codes:
        assert f"  {code} " in output
    assert f"failed on {model}" in output


def test_warning_findings_pass_with_a_visible_warning(pytester: pytest.Pytester,
                                                      broken: Callable[[str], Path]) -> None:
    model = broken("orphan_shard")
    result = pytester.runpytest_subprocess(f"--llm-model={model}", f"--llm-base={BASE}", *ONLY)
    result.assert_outcomes(passed=N_CHECKS, warnings=1)
    result.stdout.fnmatch_lines(["*IntegrityWarning: WGT003 warning: model-00001-of-00009.safetensors*"])


def test_warning_findings_pass_in_a_strict_repository(pytester: pytest.Pytester,
                                                      broken: Callable[[str], Path]) -> None:
    """filterwarnings = error (ini) and -W error (command line) must not turn a warning finding
    into a failure: a gate that fails healthy releases in strict repositories is switched off."""
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    model = broken("orphan_shard")
    result = pytester.runpytest_subprocess("-W", "error", f"--llm-model={model}", f"--llm-base={BASE}", *ONLY)
    result.assert_outcomes(passed=N_CHECKS, warnings=1)
    result.stdout.fnmatch_lines(["*IntegrityWarning: WGT003 warning: model-00001-of-00009.safetensors*"])


def test_progress_is_live_quiet_under_q_and_never_captured(pytester: pytest.Pytester,
                                                          broken: Callable[[str], Path]) -> None:
    model = broken("nan_in_weights")  # a failing item: its report would show captured output
    shown = pytester.runpytest_subprocess(f"--llm-model={model}", "-m", "llmmerge_weights", "-rf")
    output = shown.stdout.str()
    assert "[llmmerge] weights: reading model-00003-of-00003.safetensors" in output
    assert "Captured stdout" not in output
    quiet = pytester.runpytest_subprocess(f"--llm-model={model}", "-m", "llmmerge_weights", "-q")
    quiet.assert_outcomes(failed=1, passed=2, skipped=1)
    assert "[llmmerge]" not in quiet.stdout.str()


def test_generated_items_get_an_outer_timeout_only_where_the_user_set_none(pytester: pytest.Pytester) -> None:
    """pytest-timeout as the last guard of an unattended gate, never overriding the user's own."""
    pytester.makeconftest("""
import pytest

@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    for item in items:
        marks = [m.args[0] for m in item.iter_markers("timeout")]
        print(f"TIMEOUT {item.nodeid} {marks}")
""")
    args = (f"--llm-model={MERGED}", f"--llm-base={BASE}", "--llm-load-timeout=100", "-s", "--co",
            "-m", "llmmerge_integrity or llmmerge_suite", "-p", "no:cacheprovider")
    guarded = pytester.runpytest_subprocess(*args).stdout.str()
    assert "TIMEOUT integrity::config [3600.0]" in guarded
    assert re.search(r"TIMEOUT default-suite::\S+ \[3700\.0\]", guarded), guarded
    for user in (("--timeout=5",), ("-o", "timeout=7")):
        assert "TIMEOUT integrity::config []" in pytester.runpytest_subprocess(*args, *user).stdout.str()


HIDE_VLLM = '''
import importlib.util

_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *args: None if name.split(".")[0] == "vllm" else _find_spec(name, *args)
'''


def test_served_backend_without_vllm_skips_with_the_install_command(pytester: pytest.Pytester) -> None:
    """Where vllm does not import, the vllm-serve items skip with the reason and the install
    command, as the offline backend's do, and the rest of the run goes on."""
    pytester.makeconftest(HIDE_VLLM)  # beside the suite, so it is loaded before any item runs
    shutil.copy(REPO / "example_suites" / "chat.yaml", pytester.path)
    result = pytester.runpytest_subprocess(f"--llm-model={MERGED}", "--llm-backend=hf,vllm-serve", "-m",
                                           "llmmerge_suite", "-k", "greeting and not zh", "chat.yaml", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(
        ["SKIPPED*backend 'vllm-serve' needs the vllm package: pip install 'pytest-llmmerge[[]vllm*"])
