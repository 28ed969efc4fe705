"""The fixtures users write their own tests with, on the real fixture chain."""

from __future__ import annotations

import pytest

from conftest import ADAPTERS, BASE, MERGED

USER_TESTS = '''
def test_merged_answers_and_stops(llm_merged):
    out = llm_merged.backend("hf").generate("Repeat: apple river\\nAnswer:", max_new_tokens=16)
    assert out.finish_reason == "stop" and "apple river" in out.text

def test_merge_kept_the_adapter_skill(llm_adapter, llm_merged):
    prompt = "Add: 3 4\\nAnswer:"
    assert llm_adapter.backend().generate(prompt).token_ids == llm_merged.backend().generate(prompt).token_ids

def test_base_lacks_the_skill(llm_reference):
    assert "7" not in llm_reference.backend().generate("Add: 3 4\\nAnswer:").text

def test_every_variant_scores(llm_variant):
    (scores,) = llm_variant.backend().score(["Repeat: moon\\nAnswer: moon"])
    assert len(scores.logprobs) == len(scores.token_ids) - 1 and all(lp <= 0 for lp in scores.logprobs)
'''


def test_fixtures_give_every_variant(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess(f"--llm-model={MERGED}", f"--llm-base={BASE}",
                                           f"--llm-adapter={ADAPTERS[0]}", f"--llm-adapter={ADAPTERS[1]}",
                                           "-m", "not llmmerge", "-rA")
    result.assert_outcomes(passed=6)
    # The -rA summary: -v lines may be split by live progress lines (model loads).
    result.stdout.fnmatch_lines(["PASSED *test_every_variant_scores[[]reference[]]",
                                 "PASSED *test_every_variant_scores[[]adapter[]]",
                                 "PASSED *test_every_variant_scores[[]merged[]]"])


def test_fixtures_skip_with_a_reason_when_the_variant_is_missing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess(f"--llm-model={MERGED}", "-m", "not llmmerge", "-rs")
    result.assert_outcomes(passed=2, skipped=2)
    result.stdout.fnmatch_lines(["*variant 'adapter' is not available in this run*"])
