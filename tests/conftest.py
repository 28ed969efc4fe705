"""Shared paths and factories for the tests; the fixture models live in ../fixtures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from breakage import broken_copy

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
BASE = FIXTURES / "base"
MERGED = FIXTURES / "merged"
ADAPTERS = (FIXTURES / "adapters" / "lora1", FIXTURES / "adapters" / "lora2")


@pytest.fixture
def broken(tmp_path: Path) -> Callable[[str], Path]:
    """A factory: broken("shard_deleted") -> a copy of the healthy merged model, broken that way."""
    def make(name: str, healthy: Path = MERGED) -> Path:
        return broken_copy(healthy, tmp_path / name, name)
    return make
