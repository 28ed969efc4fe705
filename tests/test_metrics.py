"""Parity metrics on hand-made numbers: known answers for perplexity, bits per byte, KL, greedy."""

from __future__ import annotations

import math

import pytest

from pytest_llmmerge.backends.base import TokenLogprobs
from pytest_llmmerge.metrics import (bits_per_byte, first_divergence, greedy_verdict, kl_per_token, perplexity,
                                     relative_difference)


def test_perplexity_and_bits_per_byte() -> None:
    scores = [TokenLogprobs((1, 2, 3), (math.log(0.5), math.log(0.25)), n_bytes=4)]
    assert perplexity(scores) == pytest.approx(math.sqrt(8))
    assert bits_per_byte(scores) == pytest.approx(3 / 4)  # 1 + 2 bits over 4 bytes
    assert relative_difference(100.0, 101.0) == pytest.approx(0.01)


def test_kl_is_zero_for_equal_distributions_and_exact_with_the_full_vocabulary() -> None:
    p = [0.7, 0.2, 0.1]
    q = [0.5, 0.3, 0.2]
    full_p = TokenLogprobs((0,), (), top=(tuple((i, math.log(v)) for i, v in enumerate(p)),))
    probe_q = TokenLogprobs((0,), (), probe=(tuple(math.log(v) for v in q),))
    probe_p = TokenLogprobs((0,), (), probe=(tuple(math.log(v) for v in p),))
    exact = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert kl_per_token(full_p, probe_q) == [pytest.approx(exact)]
    assert kl_per_token(full_p, probe_p) == [pytest.approx(0.0, abs=1e-9)]


def test_kl_from_top_k_with_a_rest_bucket_is_a_lower_bound() -> None:
    p, q = [0.6, 0.3, 0.05, 0.05], [0.3, 0.4, 0.2, 0.1]
    exact = sum(a * math.log(a / b) for a, b in zip(p, q))
    top2 = TokenLogprobs((0,), (), top=(((0, math.log(0.6)), (1, math.log(0.3))),))
    probe = TokenLogprobs((0,), (), probe=((math.log(0.3), math.log(0.4)),))
    (bound,) = kl_per_token(top2, probe)
    assert 0 < bound <= exact


def test_greedy_rules() -> None:
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2
    assert greedy_verdict([1, 2, 3], [1, 2, 3], None, None).ok
    # Diverging, but each side's token is in the other's top-k: accepted (vLLM's rule).
    assert greedy_verdict([1, 2, 9], [1, 2, 8], a_next_top=[9, 8], b_next_top=[8, 9]).ok
    refused = greedy_verdict([1, 2, 9], [1, 2, 8], a_next_top=[9, 7], b_next_top=[8, 9])
    assert not refused.ok and refused.position == 2 and (refused.token_a, refused.token_b) == (9, 8)


class Scripted:
    """A run that returns fixed scores per model: only for the decision logic of compare_reference."""

    def __init__(self, scores: dict[str, list[TokenLogprobs]]) -> None:
        self.scores = scores

    def score(self, key: tuple[str, str], requests: object, deadline_s: float) -> list[TokenLogprobs]:
        return self.scores[key[0]]

    def generate_all(self, key: object, requests: object, deadline_s: float) -> list[object]:
        raise AssertionError("not used")


def test_reference_comparison_uses_bits_per_byte_when_tokenizers_differ() -> None:
    from types import SimpleNamespace

    from pytest_llmmerge.parity import compare_reference

    settings = SimpleNamespace(max_ppl_ratio=1.5)
    ref = [TokenLogprobs((1, 2, 3, 4), (-1.0, -1.0, -1.0), n_bytes=10)]
    # Another tokenizer: half as many tokens, each twice as costly -> same bits per byte.
    other = [TokenLogprobs((7, 8), (-3.0,), n_bytes=10)]
    same = compare_reference(Scripted({"reference": ref, "merged": other}), None, ("reference", "hf"), ["text"],
                             settings, 1.0, blame="")
    assert same.metrics["measure"] == "bits per byte" and same.ok
    worse = [TokenLogprobs((7, 8), (-9.0,), n_bytes=10)]
    report = compare_reference(Scripted({"reference": ref, "merged": worse}), None, ("reference", "hf"), ["text"],
                               settings, 1.0, blame="")
    assert not report.ok and "bits per byte merged" in report.failures[0]


def test_reference_comparison_without_adapters_or_limit_is_skipped_not_passed() -> None:
    from types import SimpleNamespace

    from pytest_llmmerge.parity import compare_reference

    report = compare_reference(Scripted({}), None, ("reference", "hf"), ["text"], SimpleNamespace(max_ppl_ratio=None),
                               1.0, blame="")
    assert report.skipped is not None and "--llm-max-ppl-ratio" in report.skipped
