"""A suite case failing on the merged model says who is to blame: it is rerun on the fine-tune
unmerged (in the merged model's dtype) and, when that fails too, on the base.  Real fixture
models, HF backend."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import ADAPTERS, BASE

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
    result.stdout.fnmatch_lines(["*attribution: also fails on adapter-only*the fine-tune, not the merge",
                                 "*the base passes*the fine-tune broke it"])
    # Nobody writes that text: the base already fails the case.
    assert items["impossible[merged-hf]"]["metrics"]["attribution"] == "base", output
    result.stdout.fnmatch_lines(["*the base already fails this case and the fine-tune did not fix it"])
