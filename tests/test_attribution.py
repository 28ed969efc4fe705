"""A suite case failing on the merged model says who is to blame: it is rerun on the fine-tune
unmerged (in the merged model's dtype) and, when that fails too, on the base.  Real fixture
models, HF backend."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import ADAPTERS, BASE, MERGED

# The fixture chain's second adapter answers 功能清单 prompts with a function name, 无法判断
# when none fits; the base never learned that task.
SUITE = """
defaults: {max_new_tokens: 24, timeout_s: 120}
cases:
  - id: stops
    prompt: "Repeat: apple river stone\\nAnswer:"
  - id: says-unknown
    must_terminate: false
    messages:
      - role: user
        content: "功能清单:\\n功能:查询天气 功能说明:用户想知道天气。\\n功能:无法判断 功能说明:不属于上述描述的功能。\\n用户问题:讲一个笑话\\n请回答功能名。"
    expect: {not_contains: ["无法判断"]}
  - id: impossible
    must_terminate: false
    prompt: "Repeat: apple river stone\\nAnswer:"
    expect: {contains: ["this text no model of the fixtures writes"]}
"""


def run(pytester: pytest.Pytester, model: Path, tmp_path: Path) -> tuple[pytest.RunResult, dict[str, dict]]:
    (pytester.path / "suite.yaml").write_text(SUITE, encoding="utf-8")
    report = tmp_path / "report.json"
    result = pytester.runpytest_subprocess(
        f"--llm-model={model}", f"--llm-base={BASE}", *(f"--llm-adapter={a}" for a in ADAPTERS), "--llm-backend=hf",
        "-m", "llmmerge_suite", "-k", "merged", f"--llm-report={report}", "-p", "no:cacheprovider", "suite.yaml")
    items = {i["nodeid"].split("::")[-1]: i for i in json.loads(report.read_text())["items"] if i["kind"] == "suite"}
    return result, items


def test_each_failure_names_the_merge_the_fine_tune_or_the_base(pytester: pytest.Pytester,
                                                                 broken: Callable[[str], Path], tmp_path: Path) -> None:
    # The merged model lost its eos ids: the merge broke termination, the fine-tune did not.
    result, items = run(pytester, broken("eos_removed"), tmp_path)
    output = result.stdout.str()
    assert items["stops[merged-hf]"]["outcome"] == "failed", output
    assert items["stops[merged-hf]"]["metrics"]["attribution"] == "merge", output
    result.stdout.fnmatch_lines(["*attribution: passes on adapter-only (float32, hf: finish_reason=stop*): "
                                 "the merge broke it, not the fine-tune"])
    # The fine-tune taught the model to say 无法判断, which the base never says.
    assert items["says-unknown[merged-hf]"]["metrics"]["attribution"] == "fine-tune", output
    result.stdout.fnmatch_lines(["*attribution: also fails on adapter-only*: not the merge",
                                 "*the base passes*the fine-tune broke it"])
    # Nobody writes that text: the base already fails the case.
    assert items["impossible[merged-hf]"]["metrics"]["attribution"] == "base", output
    assert items["impossible[merged-hf]"]["outcome"] == "failed", output  # the user's own case stays red
    result.stdout.fnmatch_lines(["*the base already fails this case and the fine-tune, unmerged, does not pass it either*"])


def _never_stopping(source: Path, out: Path) -> Path:
    """A copy of `source` whose eos ids name a token the fixtures never write: no answer ends."""
    import shutil

    shutil.copytree(source, out)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((out / name).read_text())
        config["eos_token_id"] = 1000
        (out / name).write_text(json.dumps(config))
    return out


def _greeting(pytester: pytest.Pytester, model: Path, base: Path, report: Path) -> tuple[pytest.RunResult, dict]:
    result = pytester.runpytest_subprocess(
        f"--llm-model={model}", f"--llm-base={base}", *(f"--llm-adapter={a}" for a in ADAPTERS), "--llm-backend=hf",
        "-m", "llmmerge_suite", "-k", "chat-greeting", f"--llm-report={report}", "-p", "no:cacheprovider")
    items = {i["nodeid"]: i for i in json.loads(report.read_text())["items"]}
    return result, items["default-suite::chat-greeting[merged-hf]"]


def test_built_in_case_the_base_fails_too_is_xfailed_not_failed(pytester: pytest.Pytester, tmp_path: Path,
                                                                 broken: Callable[[str], Path]) -> None:
    # The merge broke termination on a base that stops: the built-in case fails, blaming the merge.
    result, greeting = _greeting(pytester, broken("eos_removed"), BASE, tmp_path / "broken.json")
    output = result.stdout.str()
    assert (greeting["outcome"], greeting["metrics"]["attribution"]) == ("failed", "merge"), output
    # A base that never stops: the built-in suite's termination cases cannot hold for this model
    # family, and the merge did not change that; a gate that failed here would fail every release.
    base = _never_stopping(BASE, tmp_path / "base")
    result, greeting = _greeting(pytester, _never_stopping(MERGED, tmp_path / "merged"), base,
                                 tmp_path / "report.json")
    output = result.stdout.str()
    assert greeting["outcome"] == "xfailed", output
    assert greeting["metrics"]["attribution"] == "base", output
    assert greeting["message"].startswith("xfail: built-in case 'chat-greeting'"), output
    assert "the base and the adapter-only model fail it too" in greeting["message"], output
    assert result.ret == 0, output
    result.assert_outcomes(xfailed=1)


TIPPING_SUITE = """
defaults: {max_new_tokens: 12, timeout_s: 120, must_terminate: false}
cases:
  - id: tipping
    prompt: "Repeat: apple river stone\\nAnswer:"
    expect: {not_contains: ["loop loop loop"]}
"""


@pytest.mark.parametrize("base_fails", [False, True], ids=["base-passes", "base-fails"])
def test_a_case_that_flips_with_rounding_is_not_blamed_on_the_merge(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, base_fails: bool) -> None:
    """bf16 release: the case fails on the merge and passes on the bf16 adapter-only model, but
    the exact (float32) adapter-only model fails it too: rounding decides, not the merge."""
    import shutil

    (pytester.path / "suite.yaml").write_text(TIPPING_SUITE, encoding="utf-8")
    shutil.copy(Path(__file__).parent / "tipping_backend.py", pytester.path)
    monkeypatch.setenv("LLMMERGE_TEST_TIPPING", os.pathsep.join([str(MERGED)] + ([str(BASE)] if base_fails else [])))
    report = tmp_path / "report.json"
    result = pytester.runpytest_subprocess(
        f"--llm-model={MERGED}", f"--llm-base={BASE}", *(f"--llm-adapter={a}" for a in ADAPTERS),
        "--llm-backend=tipping_backend:TippingHF", "--llm-dtype=bfloat16", "-m", "llmmerge_suite", "-k", "merged",
        f"--llm-report={report}", "-p", "no:cacheprovider", "suite.yaml")
    output = result.stdout.str()
    (item,) = [i for i in json.loads(report.read_text())["items"] if i["kind"] == "suite"]
    assert item["outcome"] == "failed", output  # the user's own case stays red either way
    assert item["metrics"]["attribution"] == ("base" if base_fails else "fine-tune"), output
    result.stdout.fnmatch_lines(["*attribution: also fails on the exact adapter-only model (float32, *while it "
                                 "passes in bfloat16*depends on rounding alone: not the merge"])
