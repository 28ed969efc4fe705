"""The bisection search itself (the chain probes are real in test_chain_bisect.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pytest_llmmerge.bisection import SEARCH_ASSUMPTION, Probe, bisect_stages, search_order


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


def test_lines_name_the_stage_its_adapter_and_each_probe() -> None:
    adapters = [Path(f"chain/a{i}") for i in range(1, 8)]
    found = bisect_stages(7, probes_for(5, []), last=Probe(7, True, "did not terminate"))
    lines = found.lines(adapters, {3: True, 5: False, 4: True})
    assert lines[0] == "bisect: first failing stage 5 of 7: adapter 5 (chain/a5) introduced it; stage 4 passes"
    assert "  stage 3, built now: passes (finish_reason=stop)" in lines
    assert "  stage 5, from the cache: FAILS (did not terminate)" in lines
    assert lines[-1].startswith("  5 probe(s), 2 stage build(s) for this case")


def test_without_a_known_failure_the_last_stage_is_probed() -> None:
    calls: list[int] = []
    with pytest.raises(ValueError, match="stage 3 passes: nothing to bisect"):
        bisect_stages(3, probes_for(9, calls))
    assert calls == [0, 3]


# --- the base fails the case: a passing stage is searched for, then bisected after -----------------

def window(fixed: int | None, broken: int, calls: list[int]):  # type: ignore[no-untyped-def]
    """Stages fixed..broken-1 pass, every other stage fails; fixed None: every stage fails."""
    def probe(k: int) -> Probe:
        calls.append(k)
        passes = fixed is not None and fixed <= k < broken
        return Probe(k, not passes, "finish_reason=stop" if passes else "no match")
    return probe


def patterns(n: int) -> list[tuple[int | None, int]]:
    """(fix stage, break stage) for every chain of n adapters whose last stage fails: the base
    passing (fix 0), fixed at any stage 1..n-1 and broken at any later one, or never fixed."""
    return [(fix, brk) for fix in range(n) for brk in range(fix + 1, n + 1)] + [(None, n)]


@pytest.mark.parametrize("n", range(1, 9))
def test_every_fix_and_break_pattern_is_named_each_stage_probed_once(n: int) -> None:
    for fix, brk in patterns(n):
        calls: list[int] = []
        found = bisect_stages(n, window(fix, brk, calls), last=Probe(n, True, "no match"))
        case = (n, fix, brk, calls)
        assert len(set(calls)) == len(calls) and n not in calls, case  # each stage at most once
        assert calls[0] == 0, case
        assert {p.stage for p in found.probes} == set(calls) | {n}, case  # every probe is listed
        if fix is None:
            assert found.never_fixed and found.first_bad == 0 and found.last_good is None, case
            assert calls == [0, *search_order(n)], case  # only probing every stage can show it
            continue
        assert not found.never_fixed and (found.first_bad, found.last_good) == (brk, brk - 1), case
        if fix == 0:  # the base passes: plain bisection, as before
            assert found.fixed_by is None and len(calls) - 1 <= math.ceil(math.log2(n)), case
            continue
        assert found.fixed_by is not None and fix <= found.fixed_by < brk, case
        lo, hi = found.fixed_between() or (0, 0)
        assert lo <= fix <= hi == found.fixed_by, case  # the adapter that fixed it is in the range named
        searched = search_order(n).index(found.fixed_by) + 1
        assert searched < 2 * n / (brk - fix), case  # the stated bound for a run of brk - fix passing stages
        bisected = len(calls) - 1 - searched
        assert bisected <= math.ceil(math.log2(n - found.fixed_by)), case


@pytest.mark.parametrize("n", range(2, 17))
def test_stage_1_passing_costs_log2_n_probes(n: int) -> None:
    for brk in range(2, n + 1):
        calls: list[int] = []
        found = bisect_stages(n, window(1, brk, calls), last=Probe(n, True, "no match"))
        assert calls[:2] == [0, 1] and found.fixed_by == 1 and found.first_bad == brk
        assert len(calls) <= 2 + math.ceil(math.log2(n - 1)), (n, brk, calls)


def test_search_order_is_stage_1_then_coarse_to_fine_midpoints() -> None:
    assert search_order(8) == [1, 4, 2, 6, 3, 5, 7]
    assert search_order(7) == [1, 3, 5, 2, 4, 6]
    assert search_order(1) == [] and search_order(2) == [1]
    for n in range(1, 40):
        assert sorted(search_order(n)) == list(range(1, n))


def test_seven_stage_chain_fixed_at_2_broken_at_5() -> None:
    """The fixture chain's shape: the base and stage 1 fail, stages 2-4 pass, 5-7 fail."""
    calls: list[int] = []
    found = bisect_stages(7, window(2, 5, calls), last=Probe(7, True, "did not terminate"))
    assert calls == [0, 1, 3, 5, 4]
    assert (found.first_bad, found.last_good, found.fixed_by, found.fixed_between()) == (5, 4, 3, (2, 3))
    lines = found.lines([Path(f"chain/a{i}") for i in range(1, 8)], {1: True, 3: True, 4: True, 5: True})
    assert lines[0] == ("bisect: first failing stage 5 of 7 after a passing one: adapter 5 (chain/a5) broke it "
                        "again; stage 4 is the last passing stage")
    assert lines[1] == "  the base (stage 0) fails this case (no match); one of adapters 2..3 fixed it (stage 3 passes)"
    assert "  stage 1, built now: FAILS (no match)" in lines
    assert "  stage 3, built now: passes (finish_reason=stop)" in lines
    assert lines[-1] == f"  6 probe(s), 4 stage build(s) for this case; {SEARCH_ASSUMPTION}"


def test_never_fixed_says_so_after_probing_every_stage() -> None:
    calls: list[int] = []
    found = bisect_stages(4, window(None, 4, calls), last=Probe(4, True, "no match"))
    assert calls == [0, 1, 2, 3] and found.never_fixed
    lines = found.lines([Path(f"a{i}") for i in range(1, 5)], {})
    assert lines[0] == ("bisect: no stage of the chain passes this case: the fine-tune never fixed it "
                        "(every stage 0..4 probed fails; the base: no match)")
    assert lines[-1] == "  5 probe(s), 0 stage build(s) for this case; every stage was probed"
