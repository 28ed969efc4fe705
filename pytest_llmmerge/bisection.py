"""Find the stage of a merge chain at which a suite case starts failing, by bisection.

The field shape (MedicalGPT #311): seven LoRAs merged one after another, and with six merged,
prompts holding one phrase hang.  Given that the case fails on the last stage, stages are
probed by halving the interval between the last known good stage (the base, stage 0, checked
first) and the first known bad one, so a chain of n adapters costs about log2(n) probes, each
one build (cached, see variants.Chain) and one generation.  A probe fails when the case's
expectations fail, or when it misses its deadline or kills its worker: a hang is a failure.

Bisection assumes a stage that fails keeps failing at later stages; every probe is listed in
the result, so a chain where that does not hold shows it.

A task-specific case usually fails on the base too: that is why the task was fine-tuned.  The
adapters teach it, and a later merge breaks it again.  When the base fails, a passing stage is
searched for first, and the bisection then runs between it and the last stage.  That search
assumes the stages that pass form one run (fixed at some stage, broken again at a later one)
and that the first adapter usually teaches the task: stage 1 is probed first, then midpoints
from coarse to fine (n/2, then n/4 and 3n/4, then the eighths, ...).  A run of w passing stages
is then found within 2n/w probes; a single passing stage may take all n - 1, and only probing
every stage can show that none passes (the fine-tune never fixed the case).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

CLASSIC_ASSUMPTION = "assumes a failing stage keeps failing later in the chain"
# Said wherever a result rests on the search for a passing stage (docstring above, README).
SEARCH_ASSUMPTION = ("assumes the passing stages form one run, the base failing and the first adapter usually "
                     "teaching the case: searched stage 1 first, then midpoints n/2, n/4, 3n/4, ... (a run of "
                     "w passing stages is found within 2n/w probes), then bisected after the passing stage found")


@dataclass(frozen=True)
class Probe:
    stage: int
    failed: bool
    detail: str  # the first reason it failed, or how it ended when it passed


@dataclass(frozen=True)
class Bisection:
    n: int
    # The first failing stage after the last passing one: its adapter broke the case (again).
    # 0 when no stage passes.
    first_bad: int
    probes: tuple[Probe, ...]
    # The passing stage just before first_bad; None when no stage passes.
    last_good: int | None = None
    # The base failing: the passing stage the search found (the fine-tune fixed the case at that
    # stage or at one of the stages before it that were not probed); None when the base passes.
    fixed_by: int | None = None

    @property
    def never_fixed(self) -> bool:
        """No stage passes: the base fails the case and no adapter of the chain fixed it."""
        return self.last_good is None

    def fixed_between(self) -> tuple[int, int] | None:
        """(lo, hi): the adapter that fixed the case is one of adapters lo..hi (the stages between
        the last failing probe below fixed_by and fixed_by were not probed)."""
        if self.fixed_by is None:
            return None
        failing_below = [p.stage for p in self.probes if p.failed and p.stage < self.fixed_by]
        return max(failing_below) + 1, self.fixed_by

    def lines(self, adapters: Sequence[Path], built_now: dict[int, bool]) -> list[str]:
        """What a person reads under the failing item."""
        k = self.first_bad
        assumption = CLASSIC_ASSUMPTION
        if self.never_fixed:
            head = [(f"bisect: no stage of the chain passes this case: the fine-tune never fixed it (every stage "
                    f"0..{self.n} probed fails; the base: {self._detail(0)})")]
            assumption = "every stage was probed"
        elif self.fixed_by is None:
            head = [(f"bisect: first failing stage {k} of {self.n}: adapter {k} ({adapters[k - 1]}) introduced it; "
                    f"stage {self.last_good} passes")]
        else:
            lo, hi = self.fixed_between() or (self.fixed_by, self.fixed_by)
            by = f"adapter {hi}" if lo == hi else f"one of adapters {lo}..{hi}"
            head = [(f"bisect: first failing stage {k} of {self.n} after a passing one: adapter {k} ({adapters[k - 1]}) "
                    f"broke it again; stage {self.last_good} is the last passing stage"),
                    (f"  the base (stage 0) fails this case ({self._detail(0)}); {by} fixed it "
                    f"(stage {self.fixed_by} passes)")]
            assumption = SEARCH_ASSUMPTION
        lines = head
        for probe in sorted(self.probes, key=lambda p: p.stage):
            new = built_now.get(probe.stage)
            source = "" if new is None or probe.stage in (0, self.n) else ", built now" if new else ", from the cache"
            verdict = "FAILS" if probe.failed else "passes"
            lines.append(f"  stage {probe.stage}{source}: {verdict} ({probe.detail})")
        builds = [k for k, new in built_now.items() if new]
        lines.append(f"  {len(self.probes)} probe(s), {len(builds)} stage build(s) for this case; {assumption}")
        return lines

    def _detail(self, stage: int) -> str:
        return next(p.detail for p in self.probes if p.stage == stage)


def search_order(n: int) -> list[int]:
    """The order in which stages 1..n-1 are probed for a passing one when the base fails.

    Stage 1 first: a case the fine-tune is about is usually taught by the first adapter.  Then
    coarse to fine, level l holding the odd multiples of n/2^l (rounded down): by the end of
    level l the probed stages are at most ceil(n/2^l) apart, so any run of w >= n/2^l passing
    stages holds one of them, found within 2^l < 2n/w probes.  The last level reaches every stage.
    """
    order = [1] if n > 1 else []
    level = 1
    while 2 ** (level - 1) < n:
        for j in range(1, 2 ** level, 2):
            stage = j * n // 2 ** level
            if 0 < stage < n and stage not in order:
                order.append(stage)
        level += 1
    return order


def bisect_stages(n: int, probe: Callable[[int], Probe], *, last: Probe | None = None) -> Bisection:
    """Where the case starts failing in stages 0..n, given that stage n fails (`last`, when known).

    Stage 0 (the base) is probed first.  When it passes: the first failing stage in 1..n, by
    bisection.  When it fails: a passing stage among 1..n-1 in `search_order`, then the first
    failing stage after it, by bisection; no passing stage means the fine-tune never fixed the
    case.  Each stage is probed at most once.
    """
    probes: dict[int, Probe] = {}
    if last is not None:
        probes[n] = last
    probes[0] = probe(0)
    if n not in probes:
        probes[n] = probe(n)
        if not probes[n].failed:
            raise ValueError(f"stage {n} passes: nothing to bisect")
    fixed_by = None
    if probes[0].failed:
        fixed_by = _find_passing(n, probe, probes)
        if fixed_by is None:
            return Bisection(n, 0, tuple(probes.values()))
    good = 0 if fixed_by is None else fixed_by
    # The search may already have found failing stages after the passing one: the nearest bounds it.
    bad = min(k for k, p in probes.items() if p.failed and k > good)
    while bad - good > 1:
        mid = (good + bad) // 2
        probes[mid] = probe(mid)
        good, bad = (good, mid) if probes[mid].failed else (mid, bad)
    return Bisection(n, bad, tuple(probes.values()), last_good=good, fixed_by=fixed_by)


def _find_passing(n: int, probe: Callable[[int], Probe], probes: dict[int, Probe]) -> int | None:
    """The first stage of `search_order(n)` that passes, recording every probe in `probes`."""
    for stage in search_order(n):
        probes[stage] = probe(stage)
        if not probes[stage].failed:
            return stage
    return None
