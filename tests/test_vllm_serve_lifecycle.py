"""The `vllm serve` process of the vllm-serve backend never outlives its worker: a missed
deadline kills the server and its engine core with the worker, and a closed worker stops them.
A real server each time (its start and stop are timed and printed with -s)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

import pytest

from conftest import MERGED
from pytest_llmmerge.backends.base import GenRequest
from pytest_llmmerge.worker import DeadlineExceeded, Worker

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")


MARK = "LLMMERGE_TEST_SERVE_MARK"


def server_processes(marker: str) -> list[int]:
    """Live processes other than this one that inherited `marker` in their environment: the
    worker, its server and the engine core the server spawns (whose command line names nothing)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if f"{MARK}={marker}".encode() in (proc / "environ").read_bytes().split(b"\0") \
                    and "zombie" not in (proc / "status").read_text():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def gone_within(marker: str, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := server_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_deadline_and_close_leave_no_server_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mark = f"{os.getpid()}-{time.time_ns()}"
    monkeypatch.setenv(MARK, mark)
    model = tmp_path / "served-model-under-test"
    shutil.copytree(MERGED, model)
    worker = Worker(label="merged-vllm-serve", backend="pytest_llmmerge.backends.vllm_serve:VLLMServeBackend",
                    kwargs={"model_path": str(model)}, log_dir=tmp_path / "logs", load_timeout_s=600)
    chat = GenRequest(messages=(("user", "Add: 3 4"),), max_new_tokens=16)
    try:
        started = time.perf_counter()
        (first,) = worker.generate([chat], deadline_s=600)
        print(f"vllm serve: started and answered in {time.perf_counter() - started:.1f} s")
        assert first.finish_reason == "stop" and first.stop_token_id == 2 and first.text == "7"
        assert first.prompt_text.endswith("<|im_start|>assistant\n"), "the server rendered the chat template"
        assert len(server_processes(mark)) >= 3, "worker, server and engine core run while the worker lives"

        with pytest.raises(DeadlineExceeded):
            worker.generate([GenRequest(prompt="Repeat: apple river\nAnswer:", max_new_tokens=200)], deadline_s=0.001)
        assert gone_within(mark, 10) == [], "a missed deadline kills the server with the worker"

        (again,) = worker.generate([chat], deadline_s=600)  # the next request starts a fresh server
        assert again.token_ids == first.token_ids
        stopping = time.perf_counter()
        worker.close()
        assert gone_within(mark, 30) == [], "closing the worker stops the server and its engine"
        print(f"vllm serve: stopped in {time.perf_counter() - stopping:.1f} s")
    finally:
        worker.close()
    assert worker.stats.loads == 2 and worker.stats.kills == 1
