"""--llm-bisect on the seven-adapter fixture chain, where adapter a5 plants the MedicalGPT #311
hang shape: 功能清单 prompts holding 功能:无法判断 run to the budget from stage 5 on."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from conftest import BASE, FIXTURES

CHAIN = tuple(FIXTURES / "chain" / f"a{k}" for k in range(1, 8))
SUITE = """\
suite: chain
defaults: {max_new_tokens: 48, must_terminate: true, timeout_s: 120}
cases:
  - id: unknown-function
    messages:
      - role: user
        content: "功能清单:\\n功能:设置闹钟 功能说明:用户想设置闹钟。\\n功能:导航路线 功能说明:用户想去某个地方。\\n功能:翻译文本 功能说明:用户想翻译句子。\\n功能:无法判断 功能说明:不属于上述描述的功能。\\n用户问题:讲一个笑话\\n请回答功能名。"
  - id: without-the-option
    messages:
      - role: user
        content: "功能清单:\\n功能:发送短信 功能说明:用户想发消息。\\n功能:控制家电 功能说明:用户想控制家里的电器。\\n用户问题:打开书房的灯\\n请回答功能名。"
"""


def run(pytester: pytest.Pytester, *extra: str) -> pytest.RunResult:
    adapters = [f"--llm-adapter={a}" for a in CHAIN]
    return pytester.runpytest_subprocess(f"--llm-base={BASE}", *adapters, "--llm-backend=hf", "--llm-bisect",
                                         "-m", "llmmerge_suite", "chain.yaml", *extra)


def test_bisection_names_adapter_5_with_log2_builds_then_reuses_them(pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", chain=SUITE)
    first = run(pytester, "--llm-report=first.json")
    first.assert_outcomes(passed=1, failed=1)
    out = first.stdout.str()
    assert re.search(r"bisect: first failing stage 5 of 7: adapter 5 \(\S+/chain/a5\) introduced it; "
                     r"stage 4 passes", out), out
    assert "stage 0: passes (finish_reason=stop" in out
    for k in (3, 4):
        assert f"stage {k}, built now: passes (finish_reason=stop" in out
    assert "stage 5, built now: FAILS (did not terminate" in out
    assert "stage 7: FAILS (did not terminate" in out
    probed = {int(k) for k in re.findall(r"^\s+stage (\d)\b", out, flags=re.M)}
    assert probed == {0, 3, 4, 5, 7}
    # Builds for the probes: ceil(log2 7) = 3 (stage 7 itself is built for the merged variant).
    assert len(probed - {0, 7}) <= math.ceil(math.log2(len(CHAIN)))
    # Four for the bisection, one more (stage 6) for the attribution: the adapter-only model of
    # the last adapter is stage 6 with a7 unmerged.
    assert "5 probe(s), 5 stage build(s) for this case" in out
    assert "attribution: also fails on adapter-only" in out
    report = json.loads((pytester.path / "first.json").read_text())
    case = next(i for i in report["items"] if i["nodeid"].endswith("unknown-function[merged-hf]"))
    assert case["metrics"]["bisect_first_failing_stage"] == 5
    assert case["metrics"]["bisect_adapter"].endswith("chain/a5")
    control = next(i for i in report["items"] if i["nodeid"].endswith("without-the-option[merged-hf]"))
    assert control["outcome"] == "passed" and "bisect_first_failing_stage" not in control["metrics"]

    # Same inputs again: every stage comes from the cache, the answer is the same.
    second = run(pytester)
    second.assert_outcomes(passed=1, failed=1)
    again = second.stdout.str()
    assert "first failing stage 5 of 7" in again
    assert "5 probe(s), 0 stage build(s) for this case" in again
    assert "stage 3, from the cache: passes" in again


# --- the base fails the case too: the fine-tune fixed it, a later adapter broke it again ----------
# The same 功能清单 prompt, now also asking for the answer to be one of the listed function
# names.  Measured per stage (fixtures/README.md "Merge chain", rerun through build_chain and
# greedy float32 generation): stages 0 and 1 answer '' (<|endoftext|> at once), stage 2
# '无法判断', stages 3 and 4 '翻译文本', stages 5 to 7 '无法判断' 48 times without an eos.  So the
# base fails it, a2 teaches it, and a5 breaks it again.
ANSWER_SUITE = """\
suite: chain-answer
defaults: {max_new_tokens: 48, must_terminate: true, timeout_s: 120}
cases:
  - id: unknown-function-answer
    messages:
      - role: user
        content: "功能清单:\\n功能:设置闹钟 功能说明:用户想设置闹钟。\\n功能:导航路线 功能说明:用户想去某个地方。\\n功能:翻译文本 功能说明:用户想翻译句子。\\n功能:无法判断 功能说明:不属于上述描述的功能。\\n用户问题:讲一个笑话\\n请回答功能名。"
    expect:
      regex: "^\\\\s*(设置闹钟|导航路线|翻译文本|无法判断)\\\\s*$"
"""
REBROKEN = (r"bisect: first failing stage 5 of 7 after a passing one: adapter 5 \(\S+/chain/a5\) broke it again; "
            r"stage 4 is the last passing stage")


def probed_stages(out: str) -> set[int]:
    return {int(k) for k in re.findall(r"^\s+stage (\d)\b", out, flags=re.M)}


def test_base_failing_too_finds_the_stage_that_broke_it_again(pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", chain=ANSWER_SUITE)
    result = run(pytester, "--llm-report=report.json")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert re.search(REBROKEN, out), out
    # Stage 1 fails (probed first), stage 3 (n/2) passes: adapter 2 or 3 fixed it.
    assert "the base (stage 0) fails this case (no match for regex" in out
    assert "; one of adapters 2..3 fixed it (stage 3 passes)" in out
    assert "stage 0: FAILS (no match for regex" in out
    assert "stage 1, built now: FAILS (no match for regex" in out
    for k in (3, 4):
        assert f"stage {k}, built now: passes (finish_reason=stop, 2 tokens)" in out
    assert "stage 5, built now: FAILS (did not terminate" in out
    assert probed_stages(out) == {0, 1, 3, 4, 5, 7}
    # Stages 1, 3, 4, 5 for the probes, 7 for the merged model, 6 for the attribution.
    assert "6 probe(s), 6 stage build(s) for this case; assumes the passing stages form one run" in out
    report = json.loads((pytester.path / "report.json").read_text())
    metrics = report["items"][0]["metrics"]
    assert (metrics["bisect_first_failing_stage"], metrics["bisect_last_passing_stage"]) == (5, 4)
    assert metrics["bisect_adapter"].endswith("chain/a5")
    assert metrics["bisect_fixed_by_stage"] == 3 and metrics["bisect_never_fixed"] is False


@pytest.fixture(scope="module")
def built_stages(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Stages 1..7 of the fixture chain as plain checkpoint directories, built by build_chain."""
    from pytest_llmmerge.merge import build_chain

    return build_chain(BASE, CHAIN, tmp_path_factory.mktemp("stages"))


def test_bisection_over_stages_given_as_checkpoints(pytester: pytest.Pytester, built_stages: list[Path]) -> None:
    """--llm-stage for stages 1..6 and --llm-model for stage 7: the probes load those, build nothing."""
    pytester.makefile(".yaml", chain=ANSWER_SUITE)
    given = [f"--llm-stage={stage}" for stage in built_stages[:-1]]
    result = run(pytester, f"--llm-model={built_stages[-1]}", *given, "--llm-report=report.json")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert re.search(REBROKEN, out), out
    assert "stage 4: passes (finish_reason=stop, 2 tokens)" in out
    assert "stage 5: FAILS (did not terminate" in out
    assert probed_stages(out) == {0, 1, 3, 4, 5, 7}
    assert "6 probe(s), 0 stage build(s) for this case" in out
    # Stage 5 is the user's own checkpoint: the bisection says so rather than blame adapter 5 alone.
    assert "stage 5 is your --llm-stage, not a merge this plugin built: adapter 5 or your merge of it" in out
    metrics = json.loads((pytester.path / "report.json").read_text())["items"][0]["metrics"]
    assert (metrics["bisect_first_failing_stage"], metrics["bisect_last_passing_stage"]) == (5, 4)
