"""Judge one generation against its case: a list of reasons a person can act on, empty if fine.

Pure functions over the plain dataclasses of :mod:`.suite` and :mod:`.backends.base`, so they
run the same in pytest's process, in a worker, or in a notebook.
"""

from __future__ import annotations

import os
import re
import select
import signal
from collections import Counter
from collections.abc import Sequence

from .backends.base import Generation
from .suite import Case

_SHOWN_CHARS = 80  # of the output quoted in an `equals` failure; the item shows it in full
# A suite's regex runs on a model's output in pytest's own process, where nothing else could
# stop it: exponential backtracking would hang the run outside every deadline.
REGEX_SECONDS = 5.0


def evaluate(case: Case, gen: Generation) -> list[str]:
    """Every way `gen` fails `case`, in a fixed order; an empty list means it passes."""
    reasons: list[str] = []
    expect = case.expect
    if case.must_terminate and gen.finish_reason != "stop":
        reasons.append(f"did not terminate: no eos within {case.max_new_tokens} tokens "
                       f"(finish_reason={gen.finish_reason})")
    ids = content_ids(gen)
    if len(ids) < expect.min_new_tokens:
        reasons.append(f"too short: {len(ids)} new tokens, expected at least {expect.min_new_tokens}")
    reasons += [f"missing expected text {t!r}" for t in expect.contains if t not in gen.text]
    reasons += [f"contains forbidden text {t!r}" for t in expect.not_contains if t in gen.text]
    for pattern in expect.regex:
        matched = search_within(pattern, gen.text, REGEX_SECONDS)
        if matched is None:
            reasons.append(f"regex {pattern!r} took longer than {REGEX_SECONDS:g} s on the output and was stopped "
                           "(nested repetition such as (a+)+ backtracks exponentially: rewrite it)")
        elif not matched:
            reasons.append(f"no match for regex {pattern!r}")
    if expect.equals is not None and gen.text.strip() != expect.equals.strip():
        got = gen.text.strip()
        shown = got if len(got) <= _SHOWN_CHARS else got[:_SHOWN_CHARS] + "..."
        reasons.append(f"output is not exactly {expect.equals.strip()!r} (got {shown!r})")
    limit = expect.max_repeated_ngram
    if limit is not None:
        found = repeated_ngram(ids, limit.n)
        if found is not None and found[1] > limit.max_count:
            gram, count = found
            reasons.append(f"degenerate loop: token {limit.n}-gram {list(gram)} occurs {count} times "
                           f"(max {limit.max_count})")
    return reasons


def content_ids(gen: Generation) -> tuple[int, ...]:
    """The generated ids without a final stop token, so an answer that is only eos counts as empty."""
    ids = gen.token_ids
    if ids and gen.finish_reason == "stop" and gen.stop_token_id is not None and ids[-1] == gen.stop_token_id:
        return ids[:-1]
    return ids


def repeated_ngram(ids: Sequence[int], n: int) -> tuple[tuple[int, ...], int] | None:
    """The most frequent n-gram of `ids` (overlaps count; ties go to the first seen) and its count.

    None when `ids` is shorter than `n`.  Token ids rather than words, so a loop is found in any
    language, Chinese included, without a tokenizer.
    """
    if n < 1:
        raise ValueError(f"n-gram length must be at least 1, got {n}")
    if len(ids) < n:
        return None
    counts = Counter(tuple(ids[i:i + n]) for i in range(len(ids) - n + 1))
    # most_common(1) is max() over insertion order: among equal counts the earliest n-gram wins.
    gram, count = counts.most_common(1)[0]
    return gram, count


def search_within(pattern: str, text: str, seconds: float) -> bool | None:
    """Whether `pattern` matches somewhere in `text`, or None when the search ran past `seconds`.

    The search runs in a forked child (a regex cannot be interrupted in-process) that answers
    through a pipe and is killed at the deadline."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer, and leave without running any of the parent's cleanup
        try:
            os.close(read_end)
            os.write(write_end, b"1" if re.search(pattern, text) is not None else b"0")
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], seconds)
        answer = os.read(read_end, 1) if ready else b""
    finally:
        os.close(read_end)
        if not answer:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return None if not answer else answer == b"1"
