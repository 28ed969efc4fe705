"""Find the first stage of a merge chain at which a suite case fails, by bisection.

The field shape (MedicalGPT #311): seven LoRAs merged one after another, and with six merged,
prompts holding one phrase hang.  Given that the case fails on the last stage, stages are
probed by halving the interval between the last known good stage (the base, stage 0, checked
first) and the first known bad one, so a chain of n adapters costs about log2(n) probes, each
one build (cached, see variants.Chain) and one generation.  A probe fails when the case's
expectations fail, or when it misses its deadline or kills its worker: a hang is a failure.

Bisection assumes a stage that fails keeps failing at later stages; every probe is listed in
the result, so a chain where that does not hold shows it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Probe:
    stage: int
    failed: bool
    detail: str  # the first reason it failed, or how it ended when it passed


@dataclass(frozen=True)
class Bisection:
    n: int
    first_bad: int  # 0: the base fails already, no adapter introduced it
    probes: tuple[Probe, ...]

    def lines(self, adapters: Sequence[Path], built_now: dict[int, bool]) -> list[str]:
        """What a person reads under the failing item."""
        if self.first_bad == 0:
            head = ("bisect: the base (stage 0) fails this case too, so no adapter of the chain introduced it: "
                    f"{self.probes[0].detail}")
        else:
            k = self.first_bad
            head = (f"bisect: first failing stage {k} of {self.n}: adapter {k} ({adapters[k - 1]}) introduced it; "
                    f"stage {k - 1} passes")
        lines = [head]
        for probe in sorted(self.probes, key=lambda p: p.stage):
            new = built_now.get(probe.stage)
            source = "" if new is None or probe.stage in (0, self.n) else ", built now" if new else ", from the cache"
            verdict = "FAILS" if probe.failed else "passes"
            lines.append(f"  stage {probe.stage}{source}: {verdict} ({probe.detail})")
        builds = [k for k, new in built_now.items() if new]
        lines.append(f"  {len(self.probes)} probe(s), {len(builds)} stage build(s) this run; assumes a failing "
                     "stage keeps failing later in the chain")
        return lines


def bisect_stages(n: int, probe: Callable[[int], Probe], *, last: Probe | None = None) -> Bisection:
    """The first stage in 1..n whose probe fails, given that stage n fails (`last`, when known).

    Stage 0 (the base) is probed first: when it fails too, the answer is 0.
    """
    probes: dict[int, Probe] = {}
    if last is not None:
        probes[n] = last
    probes[0] = probe(0)
    if probes[0].failed:
        return Bisection(n, 0, tuple(probes.values()))
    good, bad = 0, n
    if n not in probes:
        probes[n] = probe(n)
        if not probes[n].failed:
            raise ValueError(f"stage {n} passes: nothing to bisect")
    while bad - good > 1:
        mid = (good + bad) // 2
        probes[mid] = probe(mid)
        good, bad = (good, mid) if probes[mid].failed else (mid, bad)
    return Bisection(n, bad, tuple(probes.values()))
