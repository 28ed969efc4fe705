"""Fault injection on real processes: CI cancelling pytest must leave no worker behind.

A worker runs in its own session (so one kill takes its whole process group); without a
lifeline it would outlive a pytest that CI stops with SIGTERM or SIGKILL, hung in the middle
of a generation, and keep a core busy until the machine is recycled.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import MERGED, REPO
from test_generation import HANG_OPTION, HANG_SUITE, alive

GONE_WITHIN_S = 10


def _wait_for(condition: object, timeout: float) -> bool:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return bool(condition())


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_stopping_pytest_mid_generation_leaves_no_worker(tmp_path: Path, sig: signal.Signals) -> None:
    (tmp_path / "suite.yaml").write_text(HANG_SUITE.format(timeout=600, option=HANG_OPTION), encoding="utf-8")
    shutil.copy(REPO / "tests" / "hanging_backend.py", tmp_path)
    pid_file, hang_file = tmp_path / "pids.txt", tmp_path / "hanging.txt"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "LLMMERGE_TEST_PID_FILE": str(pid_file), "LLMMERGE_TEST_HANG_FILE": str(hang_file),
           "PYTHONPATH": str(tmp_path), "TMPDIR": str(scratch)}
    log = (tmp_path / "pytest.log").open("wb")
    pytest_proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--llm-model={MERGED}", "-m", "llmmerge_suite",
         "--llm-backend=hanging_backend:HangingHF", "--timeout=0", "suite.yaml"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    workers: list[int] = []
    try:
        # The worker loads, answers "before", then hangs on "trigger" for as long as it is let.
        assert _wait_for(hang_file.exists, 180), (tmp_path / "pytest.log").read_text(errors="replace")
        workers = [int(p) for p in pid_file.read_text().split()]
        assert workers and all(alive(p) for p in workers)
        pytest_proc.send_signal(sig)
        pytest_proc.wait(timeout=30)
        assert _wait_for(lambda: not any(alive(p) for p in workers), GONE_WITHIN_S), \
            f"worker(s) {[p for p in workers if alive(p)]} outlived pytest stopped by {sig.name}"
        if sig == signal.SIGTERM:  # unwound like Ctrl-C: the run's temp dirs (worker logs) are gone now
            assert [p.name for p in scratch.iterdir() if p.name.startswith("llmmerge")] == [], \
                (tmp_path / "pytest.log").read_text(errors="replace")
    finally:
        log.close()
        for pid in [pytest_proc.pid, *workers]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        pytest_proc.wait(timeout=30)


def test_a_merge_that_fails_is_reported_once_and_not_retried(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """An adapter that does not fit the base: the stage it breaks is tried once; every item that
    needs it fails with that one reason, no traceback, no second attempt."""
    from safetensors.numpy import load_file, save_file

    from conftest import ADAPTERS, BASE

    bad = Path(shutil.copytree(ADAPTERS[0], tmp_path / "misfit"))
    weights = load_file(str(bad / "adapter_model.safetensors"))
    # Trained for a model half as wide: every lora_A reads 64 features where the base has 128.
    save_file({n: (w[:, : w.shape[1] // 2].copy() if "lora_A" in n else w) for n, w in weights.items()},
              str(bad / "adapter_model.safetensors"))
    assert any("lora_A" in n for n in weights)
    result = pytester.runpytest_subprocess(
        f"--llm-model={MERGED}", f"--llm-base={BASE}", f"--llm-adapter={bad}", f"--llm-adapter={ADAPTERS[1]}",
        "--llm-backend=hf", "-m", "llmmerge_parity", "-p", "no:cacheprovider", "-rN")
    output = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in output and "INTERNALERROR" not in output
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) >= 2 and "passed" not in outcomes, output
    assert output.count("stage 1 could not be built: merging adapters") == 1, output
    assert "size mismatch" in output  # the cause, not only the library's headline
    assert output.count("its build failed earlier in this run") == outcomes["failed"] - 1, output


def test_a_run_leaves_no_temporary_directory(pytester: pytest.Pytester, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker logs and (without the pytest cache) built merges live in temp dirs the run removes."""
    import socket

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    # What a run killed before its end left, and a user's directory with a look-alike name.
    killed, look_alike = scratch / f"llmmerge-workers-{2 ** 22 + 1}-abc", scratch / f"llmmerge-merges-{2 ** 22 + 1}-x"
    killed.mkdir()
    (killed / ".llmmerge-run").write_text(f"{socket.gethostname()} {2 ** 22 + 1}")
    look_alike.mkdir()
    result = pytester.runpytest_subprocess(f"--llm-model={MERGED}", "--llm-backend=hf", "-p", "no:cacheprovider",
                                           "-m", "llmmerge_suite", str(REPO / "example_suites" / "smoke.yaml"),
                                           "-k", "repeat-en", f"--basetemp={tmp_path / 'basetemp'}")
    assert result.parseoutcomes().get("passed", 0) >= 1, result.stdout.str()
    left = [p.name for p in scratch.iterdir() if p.name.startswith("llmmerge")]  # torch keeps its own
    assert left == [look_alike.name]


FULL_DISK_SCRIPT = """
import resource, signal, sys
from pathlib import Path
from pytest_llmmerge.variants import BuildFailed, Chain
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))
chain = Chain(base=Path(sys.argv[1]), adapters=(Path(sys.argv[2]),) * 2, candidate=None, cache_dir=Path(sys.argv[3]))
for attempt in range(3):  # three items needing the stage
    try:
        chain.stage(1)
    except BuildFailed as exc:
        print("BUILD-FAILED", exc)
sys.exit(3)
"""


def test_a_disk_that_fills_during_a_merge_leaves_no_partial_cache_entry(tmp_path: Path) -> None:
    from conftest import ADAPTERS, BASE

    cache = tmp_path / "cache"
    run = subprocess.run([sys.executable, "-c", FULL_DISK_SCRIPT, str(BASE), str(ADAPTERS[0]), str(cache)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 3, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 3 and "could not be built" in lines[0] and "File too large" in lines[0], lines
    assert all("failed earlier in this run" in line and "not retried" in line for line in lines[1:]), lines
    left = sorted(p.name for p in cache.iterdir())
    assert [n for n in left if not n.endswith(".lock")] == [], left  # no entry, no temp dir


def _misfit(adapter: Path, out: Path) -> Path:
    """A copy of `adapter` trained for a model half as wide: it cannot be merged into the base."""
    from safetensors.numpy import load_file, save_file

    bad = Path(shutil.copytree(adapter, out))
    weights = load_file(str(bad / "adapter_model.safetensors"))
    save_file({n: (w[:, : w.shape[1] // 2].copy() if "lora_A" in n else w) for n, w in weights.items()},
              str(bad / "adapter_model.safetensors"))
    return bad


@pytest.mark.parametrize("fits", [True, False], ids=["fits", "misfit"])
def test_build_merged_builds_once_or_fails_once(pytester: pytest.Pytester, tmp_path: Path, fits: bool) -> None:
    """--llm-build-merged: the candidate is built in its own process, once, and every integrity
    item checks it; when it cannot be built, every item says so with the one cause."""
    from conftest import ADAPTERS, BASE

    last = ADAPTERS[1] if fits else _misfit(ADAPTERS[1], tmp_path / "misfit")
    out = tmp_path / "out"
    result = pytester.runpytest_subprocess(
        "--llm-build-merged", f"--llm-model={out}", f"--llm-base={BASE}", f"--llm-adapter={ADAPTERS[0]}",
        f"--llm-adapter={last}", "-m", "llmmerge_integrity", "-p", "no:cacheprovider", "-rN")
    output = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in output and "INTERNALERROR" not in output, output
    outcomes = result.parseoutcomes()
    if fits:
        assert outcomes.get("passed", 0) >= 10 and "failed" not in outcomes, output
        assert (out / "config.json").is_file()
    else:
        assert outcomes.get("failed", 0) >= 10 and "passed" not in outcomes, output
        assert output.count("stage 2 could not be built") == 1 and "size mismatch" in output, output
        assert output.count("its build failed earlier in this run") == outcomes["failed"] - 1, output
        assert not out.exists()


def test_a_merge_past_its_deadline_is_killed_and_leaves_nothing(tmp_path: Path) -> None:
    from conftest import ADAPTERS, BASE
    from pytest_llmmerge.merge import MergeSpec
    from pytest_llmmerge.merge_process import MergeTimeout, run_merge

    cache = tmp_path / "cache"
    with pytest.raises(MergeTimeout, match=r"did not finish within 0.5 s \(--llm-merge-timeout\)"):
        run_merge(MergeSpec(BASE, (ADAPTERS[0],)), cache_dir=cache, timeout_s=0.5)
    assert _merge_processes(str(cache)) == []
    left = [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] if cache.exists() else []
    assert left == []  # no cache entry, no temp dir


def _merge_processes(mentioning: str) -> list[int]:
    """Live merge processes whose command line mentions `mentioning` (this test's paths: other
    tests may be merging at the same time)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes() if proc.name.isdigit() else b""
            if b"pytest_llmmerge.merge_process" in cmdline and mentioning.encode() in cmdline \
                    and "zombie" not in (proc / "status").read_text():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


MERGE_PARENT = """
import sys
from pathlib import Path
from pytest_llmmerge.merge import MergeSpec
from pytest_llmmerge.merge_process import run_merge
said = Path(sys.argv[3])
run_merge(MergeSpec(Path(sys.argv[1]), (Path(sys.argv[2]),)), cache_dir=said.parent / "cache", timeout_s=600,
          progress=lambda m: said.write_text(m))
"""


def test_killing_the_parent_mid_merge_kills_the_merge(tmp_path: Path) -> None:
    from conftest import ADAPTERS, BASE

    # A merge that cannot finish: its adapter weights are a FIFO nobody writes, so the merge
    # process blocks reading them (a merge stuck on a hung network volume) until it is killed.
    stuck = Path(shutil.copytree(ADAPTERS[0], tmp_path / "stuck"))
    (stuck / "adapter_model.safetensors").unlink()
    os.mkfifo(stuck / "adapter_model.safetensors")
    parent = subprocess.Popen([sys.executable, "-c", MERGE_PARENT, str(BASE), str(stuck), str(tmp_path / "said.txt")],
                              start_new_session=True)
    try:
        assert _wait_for(lambda: _merge_processes(str(tmp_path)), 120), "the merge process never started"
        children = _merge_processes(str(tmp_path))
        time.sleep(1)
        assert all(pid in _merge_processes(str(tmp_path)) for pid in children)  # still merging
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        assert _wait_for(lambda: not set(children) & set(_merge_processes(str(tmp_path))), GONE_WITHIN_S)
    finally:
        parent.kill()
        parent.wait()
        for pid in _merge_processes(str(tmp_path)):
            os.kill(pid, signal.SIGKILL)
