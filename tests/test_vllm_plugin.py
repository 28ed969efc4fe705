"""The vLLM backend through the plugin: field failures reproduced and caught on the real engine."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import ADAPTERS, BASE, MERGED, REPO

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")


def test_healthy_merge_passes_suites_and_agreement_on_vllm(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(f"--llm-model={MERGED}", "-m", "llmmerge_suite or llmmerge_agreement",
                                           str(REPO / "example_suites" / "smoke.yaml"), "-rA")
    outcomes = result.parseoutcomes()
    assert "failed" not in outcomes and "skipped" not in outcomes, result.stdout.str()
    # The -rA summary: a worker's first item's -v line is split by its live "loading" lines.
    result.stdout.fnmatch_lines(["PASSED *smoke.yaml::repeat-en[[]merged-vllm[]]",
                                 "PASSED *agreement::hf-vs-vllm[[]merged[]]"])


def test_end_of_turn_dropped_never_stops_under_vllm(pytester: pytest.Pytester,
                                                     broken: Callable[[str], Path]) -> None:
    """GLM-4 #297: <|im_end|> only in the base's eos list, dropped by the merge; the tokenizer's
    eos is another token, so vLLM runs every chat answer to its budget."""
    model = broken("end_of_turn_dropped_from_eos")
    result = pytester.runpytest_subprocess(f"--llm-model={model}", "--llm-backend=vllm", "-m", "llmmerge_suite",
                                           str(REPO / "example_suites" / "chat.yaml"))
    output = result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert "merged-vllm] failed" in output or "merged-vllm failed" in output
    assert "did not terminate" in output and "finish_reason=length" in output


def test_tokenizer_eos_missing_from_generation_config_fails_agreement(
        pytester: pytest.Pytester, broken: Callable[[str], Path]) -> None:
    model = broken("tokenizer_eos_dropped_from_eos")
    result = pytester.runpytest_subprocess(f"--llm-model={model}", "-m", "llmmerge_agreement", "-rf")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*termination differs*vLLM stopped at token 0 (<|endoftext|>)*HF generate ran to the budget*",
        "*Fix: add 0 to eos_token_id in generation_config.json*",
    ])


ENGINE_HANG = '''
import pytest

def test_1_batched_lora_scoring_breaks_the_engine(llm_adapter):
    client = llm_adapter.backend("buggy_vllm:BatchedLoraScoring", timeout_s=90)
    client.score(["Repeat: apple river\\nAnswer: apple river", "Add: 3 4\\nAnswer: 7"])

def test_2_the_next_request_hangs(llm_adapter):
    client = llm_adapter.backend("buggy_vllm:BatchedLoraScoring", timeout_s=30)
    client.score(["Repeat: apple\\nAnswer: apple"])

def test_3_the_session_goes_on(llm_adapter):
    out = llm_adapter.backend("vllm", timeout_s=300).generate("Repeat: apple river\\nAnswer:", max_new_tokens=16)
    assert "apple river" in out.text
'''


def test_real_engine_hang_is_caught_by_the_deadline(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_hang=ENGINE_HANG)
    shutil.copy(REPO / "tests" / "buggy_vllm.py", pytester.path)
    result = pytester.runpytest_subprocess(f"--llm-model={MERGED}", f"--llm-base={BASE}",
                                           f"--llm-adapter={ADAPTERS[0]}", "-m", "not llmmerge", "-rf", "-p",
                                           "no:randomly")
    output = result.stdout.str()
    assert "test_3_the_session_goes_on PASSED" in output or result.parseoutcomes().get("passed") == 1, output
    assert "no result after" in output, output
