"""Serve generation requests for many items through few workers, batching where it is safe.

One worker per (variant, backend), loaded once.  When an item asks for its result, the next
pending requests for the same worker are generated with it in one batch; the others find
their result cached.  A batch that misses its deadline is not blamed on anyone: its members
are marked to run alone, so the prompt that hangs is pinned down by its own deadline and the
rest pass.  (A hanging prompt inside a batch so costs up to two deadlines.)
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends.base import Generation, GenRequest
from .worker import DeadlineExceeded, RequestFailed, Worker, WorkerStats

WorkerKey = tuple[str, str]  # (variant, backend)


@dataclass(frozen=True)
class Pending:
    """A request an item will make: its id, the request and its deadline."""

    uid: Hashable
    request: GenRequest
    deadline_s: float


@dataclass
class Runner:
    worker_kwargs: Callable[[str, str], tuple[str, dict[str, Any]]]  # (variant, backend) -> (backend spec, kwargs)
    log_dir: Path
    batch_size: int = 8
    load_timeout_s: float = 900.0
    on_status: Callable[[str], None] | None = None
    workers: dict[WorkerKey, Worker] = field(default_factory=dict)
    _done: dict[Hashable, Generation] = field(default_factory=dict)
    _solo: set[Hashable] = field(default_factory=set)
    _released: dict[str, WorkerStats] = field(default_factory=dict)

    def worker(self, key: WorkerKey) -> Worker:
        """The worker of a (variant, backend); variants that are the same model share one."""
        if key not in self.workers:
            spec, kwargs = self.worker_kwargs(*key)
            same = next((w for w in self.workers.values() if w.backend == spec and w.kwargs == kwargs), None)
            self.workers[key] = same or Worker(label=f"{key[0]}-{key[1]}", backend=spec, kwargs=kwargs,
                                               log_dir=self.log_dir, load_timeout_s=self.load_timeout_s,
                                               on_status=self.on_status)
        return self.workers[key]

    def generate(self, key: WorkerKey, item: Pending, upcoming: Sequence[Pending] = ()) -> Generation:
        """The generation for `item`; raises DeadlineExceeded / RequestFailed / WorkerError."""
        if item.uid in self._done:
            return self._done.pop(item.uid)
        worker = self.worker(key)
        batch = [item]
        if item.uid not in self._solo:
            # Same budget (no tokens generated only to be cut off) and same deadline (the batch's
            # deadline is then every member's own).
            batch += [p for p in upcoming if p.uid not in self._solo and p.uid not in self._done
                      and p.uid != item.uid and p.deadline_s == item.deadline_s
                      and p.request.max_new_tokens == item.request.max_new_tokens][: self.batch_size - 1]
        if len(batch) > 1:
            try:
                results = worker.generate([p.request for p in batch], item.deadline_s)
            except (DeadlineExceeded, RequestFailed):
                self._solo.update(p.uid for p in batch)
            else:
                self._done.update((p.uid, g) for p, g in zip(batch[1:], results[1:]))
                return results[0]
        return worker.generate([item.request], item.deadline_s)[0]

    def keep_only(self, needed: Iterable[WorkerKey]) -> None:
        """Close the workers no needed (variant, backend) will use (their model is done with)."""
        wanted = []
        for key in set(needed):
            try:
                wanted.append(self.worker_kwargs(*key))
            except LookupError:  # a variant this run cannot give: its items skip, no worker needed
                continue
        for key, worker in list(self.workers.items()):
            if (worker.backend, worker.kwargs) not in wanted:
                del self.workers[key]
                if all(w is not worker for w in self.workers.values()):
                    worker.close()
                    self._released[worker.label] = worker.stats

    def stats(self) -> dict[str, WorkerStats]:
        return {**self._released, **{w.label: w.stats for w in self.workers.values()}}

    def close(self) -> None:
        for worker in {id(w): w for w in self.workers.values()}.values():
            worker.close()

