"""The worker's plumbing (deadlines, kills, errors, restarts) with a model-free backend."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_llmmerge.backends.base import GenRequest
from pytest_llmmerge.runner import Pending, Runner
from pytest_llmmerge.worker import DeadlineExceeded, RequestFailed, Worker, WorkerError

ECHO = "fake_backends:Echo"


@pytest.fixture
def worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Worker:
    monkeypatch.chdir(Path(__file__).parent)  # the child imports fake_backends from the cwd
    w = Worker("test-echo", ECHO, {"model_path": "x"}, tmp_path)
    yield w  # type: ignore[misc]
    w.close()


def ask(worker: Worker, prompt: str, deadline: float = 30) -> str:
    return worker.generate([GenRequest(prompt=prompt)], deadline)[0].text


def test_loads_once_for_many_requests(worker: Worker) -> None:
    texts = [ask(worker, f"p{i}") for i in range(5)]
    assert len({t.split(":")[0] for t in texts}) == 1
    assert worker.stats.loads == 1 and worker.stats.requests == 5


def test_deadline_kills_the_process_and_keeps_the_partial_output(worker: Worker) -> None:
    ask(worker, "warm up")
    pid = worker.pid
    assert pid is not None
    with pytest.raises(DeadlineExceeded, match=r"no result after 1 s") as info:
        ask(worker, "sleep:60", deadline=1)
    assert info.value.partial == ["partial words"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert ask(worker, "again").split(":")[0] != str(pid)  # a fresh worker
    assert worker.stats.loads == 2 and worker.stats.kills == 1


def test_backend_error_fails_the_request_and_keeps_the_worker(worker: Worker) -> None:
    pid = ask(worker, "first").split(":")[0]
    with pytest.raises(RequestFailed, match="ValueError: bad prompt"):
        ask(worker, "raise:bad prompt")
    assert ask(worker, "second").split(":")[0] == pid


def test_a_dying_worker_is_reported_and_replaced(worker: Worker) -> None:
    with pytest.raises(WorkerError, match=r"worker process died \(exit code 3\)"):
        ask(worker, "exit:")
    assert ask(worker, "after").endswith(":after")
    assert worker.stats.deaths == 1


def test_load_failure_names_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).parent)
    w = Worker("bad", ECHO, {"model_path": "fail-to-load"}, tmp_path)
    with pytest.raises(WorkerError, match="cannot load the model: RuntimeError: cannot open the checkpoint") as info:
        ask(w, "x")
    assert "Traceback" in info.value.log_tail
    w.close()


def test_runner_batches_and_pins_a_hang_to_its_prompt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).parent)
    runner = Runner(worker_kwargs=lambda v, b: (ECHO, {"model_path": "x"}), log_dir=tmp_path, batch_size=4)
    items = [Pending(i, GenRequest(prompt="sleep:60" if i == 2 else f"p{i}"), 2.0) for i in range(5)]
    results: dict[int, str] = {}
    for index, item in enumerate(items):
        try:
            results[index] = runner.generate(("m", "echo"), item, items[index + 1:]).text
        except DeadlineExceeded:
            results[index] = "DEADLINE"
    runner.close()
    assert results[2] == "DEADLINE"
    assert all(results[i].endswith(f":p{i}") for i in (0, 1, 3, 4))
    stats = runner.stats()["m-echo"]
    assert stats.kills == 2  # the batch [0..3] once, then prompt 2 alone


def test_a_worker_closed_and_started_again_counts_both_lives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """keep_only closes a worker no later item needs; a probe may start it again: the run's
    load and request counts add both, not only the last."""
    monkeypatch.chdir(Path(__file__).parent)
    runner = Runner(worker_kwargs=lambda v, b: (ECHO, {"model_path": "x"}), log_dir=tmp_path)
    try:
        for _ in range(3):
            runner.generate(("reference", "hf"), Pending("a", GenRequest(prompt="hi", max_new_tokens=4), 30))
            runner.keep_only(set())
        runner.generate(("reference", "hf"), Pending("b", GenRequest(prompt="hi", max_new_tokens=4), 30))
        (stats,) = runner.stats().values()
        assert (stats.loads, stats.requests) == (4, 4)
    finally:
        runner.close()
