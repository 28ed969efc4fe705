"""Model variants of one run: reference (the base), adapter-only and merged, over a merge chain.

A chain is the base s0, adapters a1..an and merged stages s1..sn, where sk = merge(s(k-1), ak).
A stage is the user's own checkpoint when given (`--llm-stage` for the intermediate ones,
`--llm-model` for the last), otherwise it is built (cached) by :mod:`merge` in one build from
the last given stage (or the base) and the adapters after it, so any stage costs one build
whether or not the stages before it exist (bisection builds about log2(n) of them).  The variants a
suite runs on:

- ``reference``: s0, the base;
- ``adapter``: s(n-1) with an applied unmerged through peft (what the fine-tune looked like
  before the merge);
- ``merged``: sn, the candidate.

Parity stage k compares sk with s(k-1) + ak unmerged (``stage<k>`` vs ``stage<k>-adapter``),
so drift shows at the stage where it starts.  Nothing here imports torch until a stage has to
be built.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .merge import MergeSpec, build_merged, cached_merge
from .merge_process import run_merge

REFERENCE, ADAPTER, MERGED = "reference", "adapter", "merged"
_STAGE = re.compile(r"^stage(?P<k>\d+)(?P<adapter>-adapter)?$")


class VariantUnavailable(LookupError):
    """The run lacks what a variant needs (the message says which option gives it)."""


class BuildFailed(RuntimeError):
    """A merged stage could not be built.  Raised once with the cause, then again, without a new
    attempt, for every item that needs the stage: one failure, one report, no retry storm."""


@dataclass(frozen=True)
class ModelSpec:
    """What a worker loads: a model directory and adapters applied on top, unmerged."""

    path: Path
    adapters: tuple[Path, ...] = ()
    dtype: str | None = None  # computed in this dtype; None: the run's --llm-dtype
    dtype_of: Path | None = None  # computed in the dtype this checkpoint is computed in


AS = "as-"  # ``<variant>@as-<other>``: computed in the dtype <other> is computed in


@dataclass
class Chain:
    base: Path | None
    adapters: tuple[Path, ...]
    candidate: Path | None
    given_stages: tuple[Path, ...] = ()
    cache_dir: Path | None = None
    merge_dtype: str = "float32"
    progress: Callable[[str], None] | None = None
    # Builds run in a child process killed after this many seconds; None: in this process.
    merge_timeout_s: float | None = None
    # --llm-build-merged: where the merged candidate (stage n) is written.
    candidate_out: Path | None = None
    _built: dict[int, Path] = field(default_factory=dict)
    _failed: dict[int, str] = field(default_factory=dict)
    # stage -> True when this run built it, False when it came from the cache.
    built_now: dict[int, bool] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.adapters)

    def available(self) -> list[str]:
        names = []
        if self.base is not None:
            names.append(REFERENCE)
        if self.n and self.base is not None:
            names.append(ADAPTER)
        if self.candidate is not None or (self.n and self.base is not None):
            names.append(MERGED)
        if self.n and self.base is not None:
            names += [f"stage{k}{suffix}" for k in range(1, self.n + 1) for suffix in ("", "-adapter")]
        return names

    def stage(self, k: int) -> Path:
        """Directory of stage k (0 = the base), building it when nobody gave it."""
        if k == 0:
            if self.base is None:
                raise VariantUnavailable("needs --llm-base")
            return self.base
        if k == self.n and self.candidate is not None:
            return self.candidate
        if k <= len(self.given_stages):
            return self.given_stages[k - 1]
        if k in self._failed:
            raise BuildFailed(f"stage {k} is not available: its build failed earlier in this run "
                              f"({self._failed[k]}); not retried")
        if k not in self._built:
            into_candidate = k == self.n and self.candidate_out is not None
            if self.cache_dir is None and not into_candidate:
                raise VariantUnavailable("no cache directory to build merged stages in")
            # The cached stages start from the last stage the user gave, never from another built
            # one: the cache key (its inputs) is then the same whichever stages a run builds
            # first.  --llm-build-merged writes the last adapter onto stage n-1 where asked.
            start = k - 1 if into_candidate else len(self.given_stages)
            spec = MergeSpec(base=self.stage(start), adapters=self.adapters[start:k], compute_dtype=self.merge_dtype)
            if self.progress is not None:  # merged now, or found in the cache: said after the build
                self.progress(f"stage {k}/{self.n}: adapters {start + 1}..{k} into "
                              f"{'the base' if start == 0 else f'stage {start}'}")
            try:
                self._built[k], self.built_now[k] = self._build(spec, self.candidate_out if into_candidate else None)
                if self.progress is not None:
                    self.progress(f"stage {k}/{self.n}: {'merged' if self.built_now[k] else 'from the cache'}")
            except BuildFailed:
                raise
            except Exception as exc:  # the merge libraries' errors are many; each is this stage's failure
                reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())[:500]
                self._failed[k] = f"{type(exc).__name__}: {reason}"
                raise BuildFailed(f"stage {k} could not be built: merging adapters "
                                  f"{', '.join(str(a) for a in self.adapters[start:k])} into "
                                  f"{spec.base} failed with {self._failed[k]}") from exc
        return self._built[k]

    def _build(self, spec: Any, out: Path | None) -> tuple[Path, bool]:
        """(directory, built now): into `out`, else into the cache; in a child process under a
        deadline when merge_timeout_s is set."""
        if self.merge_timeout_s is not None:
            if out is not None:
                return run_merge(spec, out=out, timeout_s=self.merge_timeout_s, progress=self.progress)
            return run_merge(spec, cache_dir=self.cache_dir, timeout_s=self.merge_timeout_s, progress=self.progress)
        if out is not None:
            return build_merged(spec, out, progress=self.progress), True
        assert self.cache_dir is not None
        return cached_merge(spec, self.cache_dir, progress=self.progress)

    def resolve(self, variant: str) -> ModelSpec:
        """The model a variant name stands for; raises VariantUnavailable naming what is missing.

        ``<variant>@<dtype>`` is the same model computed in that dtype."""
        name, _, dtype = variant.partition("@")
        spec = self._resolve(name)
        if dtype.startswith(AS):
            return ModelSpec(spec.path, spec.adapters, None, self._resolve(dtype[len(AS):]).path)
        return ModelSpec(spec.path, spec.adapters, dtype) if dtype else spec

    def _resolve(self, variant: str) -> ModelSpec:
        if variant == REFERENCE:
            return ModelSpec(self.stage(0))
        if variant == MERGED:
            if self.candidate is None and not self.n:
                raise VariantUnavailable("needs --llm-model, or --llm-base with --llm-adapter to build it")
            return ModelSpec(self.stage(self.n) if self.n else self.candidate)  # type: ignore[arg-type]
        if variant == ADAPTER:
            return self._resolve(f"stage{self.n}-adapter")
        match = _STAGE.match(variant)
        if match is None:
            raise VariantUnavailable(f"unknown variant {variant!r}")
        k = int(match["k"])
        if not self.n or not 1 <= k <= self.n or self.base is None:
            raise VariantUnavailable(f"needs --llm-base and at least {max(k, 1)} --llm-adapter")
        if match["adapter"]:
            return ModelSpec(self.stage(k - 1), (self.adapters[k - 1],))
        return ModelSpec(self.stage(k))
