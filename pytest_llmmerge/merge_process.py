"""Run a merge in a child process under a deadline.

A merge runs in library code (peft, transformers, safetensors) that no flag can interrupt, and it
holds a whole model in memory; in a child process it has a deadline (the child's process group
is killed when it passes), its memory is returned when it ends, and it dies with the pytest that
started it (see :mod:`lifeline`).  The child writes tab-separated lines on stdout:
``progress <text>``, then ``done <path> <0|1 built now>`` or ``error <what happened>``.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import lifeline
from .atomic import Progress, remove_dead_builds
from .merge import MergeSpec, build_merged, cached_merge

TAIL_LINES = 20


class MergeFailed(RuntimeError):
    """The merge process ended without a merge; the message says why (or its last lines)."""


class MergeTimeout(MergeFailed):
    """The merge did not finish within its deadline; its process group was killed."""


def run_merge(spec: MergeSpec, *, out: Path | None = None, cache_dir: Path | None = None, timeout_s: float,
              progress: Progress | None = None) -> tuple[Path, bool]:
    """(output, built now): `spec` merged into `out` (build_merged) or into the cache
    (cached_merge), in a child process killed after `timeout_s` seconds."""
    if (out is None) == (cache_dir is None):
        raise ValueError("give exactly one of out and cache_dir")
    payload = {"spec": {k: (str(v) if isinstance(v, Path) else [str(a) for a in v] if k == "adapters" else v)
                        for k, v in asdict(spec).items()},
               "out": str(out) if out else None, "cache_dir": str(cache_dir) if cache_dir else None}
    proc, write_end = lifeline.spawn([sys.executable, "-m", "pytest_llmmerge.merge_process", json.dumps(payload)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    tail: list[str] = []
    try:
        for line in _lines(proc, deadline):
            kind, _, rest = line.partition("\t")
            if kind == "progress" and progress is not None:
                progress(rest)
            elif kind == "done":
                path, _, built = rest.rpartition("\t")
                return Path(path), built == "1"
            elif kind == "error":
                raise MergeFailed(rest)
            elif kind != "progress":
                tail = (tail + [line])[-TAIL_LINES:]
        if time.monotonic() >= deadline:
            raise MergeTimeout(f"the merge did not finish within {timeout_s:g} s (--llm-merge-timeout); its "
                               "process was killed")
        code = proc.wait()
        raise MergeFailed(f"the merge process ended with exit code {code} without a merge; its last lines:\n"
                          + "\n".join(tail))
    finally:
        lifeline.cut(write_end)
        lifeline.kill_group(proc)
        proc.stdout.close()
        # A killed merge leaves its marked temp dir; the child is gone now, so it goes too.
        remove_dead_builds(cache_dir if cache_dir is not None else out.parent)  # type: ignore[union-attr]


def _lines(proc: subprocess.Popen[bytes], deadline: float) -> Any:
    """The child's output lines until it closes stdout or the deadline passes."""
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    buffer = b""
    try:
        while time.monotonic() < deadline:
            if not selector.select(timeout=min(1.0, max(0.0, deadline - time.monotonic()))):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                yield raw.decode("utf-8", errors="replace")
    finally:
        selector.close()


def _say(kind: str, text: str) -> None:
    sys.stdout.write(f"{kind}\t{text.replace(chr(10), ' ')}\n")
    sys.stdout.flush()


def _child(payload: dict[str, Any]) -> None:
    raw = payload["spec"]
    spec = MergeSpec(**{**raw, "base": Path(raw["base"]), "adapters": tuple(Path(a) for a in raw["adapters"])})
    try:
        if payload["cache_dir"] is not None:
            path, built = cached_merge(spec, Path(payload["cache_dir"]), progress=lambda m: _say("progress", m))
        else:
            path, built = build_merged(spec, Path(payload["out"]), progress=lambda m: _say("progress", m)), True
    except Exception as exc:
        traceback.print_exc(file=sys.stdout)
        _say("error", f"{type(exc).__name__}: {' '.join(str(exc).split())[:1000]}")
        sys.exit(1)
    _say("done", f"{path}\t{int(built)}")


if __name__ == "__main__":
    lifeline.die_with_parent(int(sys.argv[2]))
    _child(json.loads(sys.argv[1]))
