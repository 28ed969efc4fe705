"""The bisection search itself (the chain probes are real in test_chain_bisect.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pytest_llmmerge.bisection import Probe, bisect_stages


def probes_for(first_bad: int, calls: list[int]):  # type: ignore[no-untyped-def]
    def probe(k: int) -> Probe:
        calls.append(k)
        return Probe(k, k >= first_bad, "did not terminate" if k >= first_bad else "finish_reason=stop")
    return probe


@pytest.mark.parametrize("n", [1, 2, 6, 7, 8, 16])
def test_finds_every_first_bad_stage_in_about_log2_n_probes(n: int) -> None:
    for first_bad in range(1, n + 1):
        calls: list[int] = []
        found = bisect_stages(n, probes_for(first_bad, calls), last=Probe(n, True, "did not terminate"))
        assert found.first_bad == first_bad
        assert calls[0] == 0  # the base is checked first
        built = [k for k in calls if k not in (0, n)]
        assert len(built) <= math.ceil(math.log2(n)), (n, first_bad, calls)
        assert len(set(calls)) == len(calls)  # no stage probed twice


def test_base_failing_too_names_no_adapter() -> None:
    calls: list[int] = []
    found = bisect_stages(7, probes_for(0, calls), last=Probe(7, True, "x"))
    assert found.first_bad == 0 and calls == [0]
    assert "the base (stage 0) fails this case too" in found.lines([Path(f"a{i}") for i in range(1, 8)], {})[0]


def test_lines_name_the_stage_its_adapter_and_each_probe() -> None:
    adapters = [Path(f"chain/a{i}") for i in range(1, 8)]
    found = bisect_stages(7, probes_for(5, []), last=Probe(7, True, "did not terminate"))
    lines = found.lines(adapters, {3: True, 5: False, 4: True})
    assert lines[0] == "bisect: first failing stage 5 of 7: adapter 5 (chain/a5) introduced it; stage 4 passes"
    assert "  stage 3, built now: passes (finish_reason=stop)" in lines
    assert "  stage 5, from the cache: FAILS (did not terminate)" in lines
    assert lines[-1].startswith("  5 probe(s), 2 stage build(s) this run")


def test_without_a_known_failure_the_last_stage_is_probed() -> None:
    calls: list[int] = []
    with pytest.raises(ValueError, match="stage 3 passes: nothing to bisect"):
        bisect_stages(3, probes_for(9, calls))
    assert calls == [0, 3]
