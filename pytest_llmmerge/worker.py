"""Run a backend in a child process and put a deadline on every request.

A model that hangs on one prompt (an endless loop in a kernel, an engine that spins) cannot
be interrupted from inside its own process.  So each backend lives in a child process of its
own session; a request that misses its deadline kills the whole process group (no orphans,
vLLM's engine processes included) and the next request starts a fresh child.

The child is `python -m pytest_llmmerge.worker FD`, talking over a socketpair: the parent sends
typed requests (Load, Generate, Score, Close), the child answers with ("loaded" | "result" |
"progress" | "error", value) tuples; its stdout and stderr go to a log file whose tail is shown
when it fails.  Only the Runner talks to workers.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from . import lifeline
from .backends import backend_class
from .backends.base import Generation, GenRequest, ScoreRequest, TokenLogprobs


@dataclass(frozen=True)
class Load:
    backend: str  # "module:Class" of the backend
    kwargs: dict[str, Any]
    sys_path: list[str]  # the parent's: a backend may live in the user's project


@dataclass(frozen=True)
class Generate:
    requests: list[GenRequest]


@dataclass(frozen=True)
class Score:
    requests: list[ScoreRequest]


@dataclass(frozen=True)
class Close:
    pass


LOG_TAIL_LINES = 25
# Environment every worker gets: never reach a model hub, and keep tokenizers' own thread
# pool from fighting with torch's.
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
              "HF_HUB_DISABLE_TELEMETRY": "1"}


class WorkerError(RuntimeError):
    """The worker could not serve the request; `log_tail` holds the end of its log."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


class RequestFailed(WorkerError):
    """The backend raised for this request; the worker is still alive and loaded."""


class DeadlineExceeded(WorkerError):
    """No result before the deadline; the worker was killed.  `partial` is what had been produced."""

    def __init__(self, seconds: float, partial: list[str], log_tail: str = "") -> None:
        super().__init__(f"no result after {seconds:g} s (worker killed)", log_tail)
        self.seconds = seconds
        self.partial = partial


@dataclass
class WorkerStats:
    loads: int = 0
    load_seconds: float = 0.0
    requests: int = 0
    kills: int = 0
    deaths: int = 0

    def __add__(self, other: WorkerStats) -> WorkerStats:
        """Both lives of a worker closed and started again (a probe, then the next item)."""
        return WorkerStats(self.loads + other.loads, self.load_seconds + other.load_seconds,
                           self.requests + other.requests, self.kills + other.kills, self.deaths + other.deaths)


@dataclass
class Worker:
    """One backend on one model variant, in a killable child process started on first use."""

    label: str
    backend: str
    kwargs: dict[str, Any]
    log_dir: Path
    load_timeout_s: float = 900.0
    on_status: Callable[[str], None] | None = None
    stats: WorkerStats = field(default_factory=WorkerStats)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _conn: Connection | None = field(default=None, repr=False)
    _log: Path | None = field(default=None, repr=False)
    _lifeline: int | None = field(default=None, repr=False)  # write end of the child's parent-death pipe
    _starts: int = field(default=0, repr=False)

    # --- public -----------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenRequest], deadline_s: float) -> list[Generation]:
        result: list[Generation] = self._call(Generate(list(requests)), deadline_s)
        return result

    def score(self, requests: Sequence[ScoreRequest], deadline_s: float) -> list[TokenLogprobs]:
        result: list[TokenLogprobs] = self._call(Score(list(requests)), deadline_s)
        return result

    def _call(self, request: Generate | Score, deadline_s: float) -> Any:
        """Run `request` in the child; raises DeadlineExceeded, RequestFailed or WorkerError."""
        conn = self._ensure_started()
        self.stats.requests += 1
        conn.send(request)
        return self._wait(deadline_s, expect="result")

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def close(self) -> None:
        """Ask the child to exit, and kill it if it does not within a few seconds."""
        if self._proc is None:
            return
        if self.alive and self._conn is not None:
            try:
                self._conn.send(Close())
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._kill()

    # --- child lifecycle -------------------------------------------------------------------

    def _ensure_started(self) -> Connection:
        if self.alive and self._conn is not None:
            return self._conn
        if self._proc is not None:  # died since the last request
            self.stats.deaths += 1
            self._kill()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._starts += 1
        self._log = self.log_dir / f"worker-{self.label}-{self._starts}.log"
        parent_sock, child_sock = socket.socketpair()
        env = {**os.environ, **WORKER_ENV}
        with self._log.open("wb") as log:
            self._proc, self._lifeline = lifeline.spawn(
                [sys.executable, "-m", "pytest_llmmerge.worker", str(child_sock.fileno())],
                pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env)
        child_sock.close()
        self._conn = Connection(parent_sock.detach())
        if self.on_status is not None:
            self.on_status(f"loading {self.label} ({self.backend})")
        self._conn.send(Load(self.backend, self.kwargs, list(sys.path)))
        seconds = self._wait(self.load_timeout_s, expect="loaded", loading=True)
        self.stats.loads += 1
        self.stats.load_seconds += float(seconds)
        if self.on_status is not None:
            self.on_status(f"loaded {self.label} in {seconds:.1f} s")
        return self._conn

    def _wait(self, deadline_s: float, *, expect: str, loading: bool = False) -> Any:
        assert self._conn is not None and self._proc is not None
        deadline = time.monotonic() + deadline_s
        partial: list[str] = []
        done = False
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.stats.kills += 1
                    self._kill()
                    if loading:
                        raise WorkerError(f"{self.label}: model not loaded after {deadline_s:g} s (worker killed)",
                                          self.log_tail())
                    raise DeadlineExceeded(deadline_s, partial, self.log_tail())
                if not self._conn.poll(min(remaining, 0.5)):
                    if self._proc.poll() is not None and not self._conn.poll(0):
                        raise self._died()
                    continue
                try:
                    kind, value = self._conn.recv()
                except (EOFError, OSError):
                    raise self._died() from None
                if kind == "progress":
                    partial = value
                elif kind == expect:
                    done = True
                    return value
                elif kind == "error":
                    done = not loading
                    error_cls = WorkerError if loading else RequestFailed
                    raise error_cls(f"{self.label}: {value}", "" if not loading else self.log_tail())
        finally:
            if not done:
                # Interrupted (deadline, pytest-timeout, Ctrl-C) or dead: never reuse a busy child.
                self._kill()

    def _died(self) -> WorkerError:
        assert self._proc is not None
        code = self._proc.wait()
        self.stats.deaths += 1
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        return WorkerError(f"{self.label}: worker process died ({how})", self.log_tail())

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        lifeline.cut(self._lifeline)
        self._lifeline = None
        if proc is not None:
            lifeline.kill_group(proc)

    def log_tail(self) -> str:
        if self._log is None or not self._log.exists():
            return ""
        lines = self._log.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(lines[-LOG_TAIL_LINES:])


# --- the child side -------------------------------------------------------------------------

def _child(fd: int, lifeline_fd: int | None = None) -> None:
    if lifeline_fd is not None:
        lifeline.die_with_parent(lifeline_fd)
    # This file runs as __main__ in the child; requests unpickle as the package module's classes.
    from pytest_llmmerge.worker import Close, Generate, Load, Score

    conn = Connection(fd)
    load = conn.recv()
    assert isinstance(load, Load)
    sys.path[:0] = [p for p in load.sys_path if p not in sys.path]
    try:
        start = time.perf_counter()
        backend = backend_class(load.backend)(**load.kwargs)
        conn.send(("loaded", time.perf_counter() - start))
    except BaseException as exc:  # the parent reports it; the child has nothing else to do
        traceback.print_exc()
        conn.send(("error", f"cannot load the model: {type(exc).__name__}: {exc}"))
        return

    def progress(texts: list[str]) -> None:
        conn.send(("progress", texts))

    while True:
        try:
            request = conn.recv()
        except EOFError:
            break
        if isinstance(request, Close):
            break
        try:
            if isinstance(request, Generate):
                result: Any = backend.generate(request.requests, on_progress=progress)
            elif isinstance(request, Score):
                result = backend.score(request.requests)
            else:
                raise TypeError(f"unknown request {type(request).__name__}")
            conn.send(("result", result))
        except Exception as exc:
            traceback.print_exc()
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    backend.close()

if __name__ == "__main__":
    _child(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None)
