"""Serve generation requests for many items through few workers, batching where it is safe.

One worker per (variant, backend), loaded once.  When an item asks for its result, the next
pending requests for the same worker are generated with it in one batch; the others find
their result cached.  A batch of n requests gets n times their deadline: a batch is never
slower than its members one after the other, so batching never kills a case that would have
finished alone.  A batch that misses it is not blamed on anyone: its members are marked to run
alone, so the prompt that hangs is pinned down by its own deadline and the rest pass.  (A
hanging prompt inside a batch of n so costs up to n + 1 deadlines; --llm-batch-size 1 pins a
hang at once.)
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends.base import Generation, GenRequest, ScoreRequest, TokenLogprobs
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
    # (worker identity, request) -> scores: the float32 truth of a comparison is scored once
    # and serves every backend's item, even after its worker was closed.
    _scores: dict[tuple[str, ScoreRequest], TokenLogprobs] = field(default_factory=dict)

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
            # Same budget (no tokens generated only to be cut off) and same deadline (so the
            # batch's, n times it, is every member's own n times).
            batch += [p for p in upcoming if p.uid not in self._solo and p.uid not in self._done
                      and p.uid != item.uid and p.deadline_s == item.deadline_s
                      and p.request.max_new_tokens == item.request.max_new_tokens][: self.batch_size - 1]
        if len(batch) > 1:
            try:
                results = worker.generate([p.request for p in batch], item.deadline_s * len(batch))
            except (DeadlineExceeded, RequestFailed):
                self._solo.update(p.uid for p in batch)
            else:
                self._done.update((p.uid, g) for p, g in zip(batch[1:], results[1:]))
                return results[0]
        return worker.generate([item.request], item.deadline_s)[0]

    def generate_all(self, key: WorkerKey, requests: Sequence[GenRequest], deadline_s: float) -> list[Generation]:
        """Greedy generations of `requests` on a worker in one batch (comparisons, users' own tests).

        `deadline_s` is per request: the batch gets it once for each of its requests."""
        return self.worker(key).generate(list(requests), deadline_s * max(1, len(requests)))

    def score(self, key: WorkerKey, requests: Sequence[ScoreRequest], deadline_s: float) -> list[TokenLogprobs]:
        """Teacher-forced scores of `requests` on a worker, each computed once per model and dtype;
        `deadline_s` is per request scored."""
        identity = self._identity(key)
        todo = list(dict.fromkeys(r for r in requests if (identity, r) not in self._scores))
        if todo:
            results = self.worker(key).score(todo, deadline_s * len(todo))
            self._scores.update(((identity, r), s) for r, s in zip(todo, results))
        return [self._scores[(identity, r)] for r in requests]

    def _identity(self, key: WorkerKey) -> str:
        spec, kwargs = self.worker_kwargs(*key)
        return repr((spec, sorted(kwargs.items())))

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
                    earlier = self._released.get(worker.label)
                    self._released[worker.label] = worker.stats if earlier is None else earlier + worker.stats

    def stats(self) -> dict[str, WorkerStats]:
        totals = dict(self._released)
        for worker in {id(w): w for w in self.workers.values()}.values():
            earlier = totals.get(worker.label)
            totals[worker.label] = worker.stats if earlier is None else earlier + worker.stats
        return totals

    def close(self) -> None:
        for worker in {id(w): w for w in self.workers.values()}.values():
            worker.close()

