"""The streaming tensor-data checks: both ways on real fixture checkpoints, and their memory bound."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import ADAPTERS, BASE, FIXTURES, MERGED
from pytest_llmmerge import tensor_scan
from pytest_llmmerge.checkpoint import Checkpoint
from pytest_llmmerge.checks import checks_of
from pytest_llmmerge.checks.base import Check, Context, Finding, run_check
from pytest_llmmerge.tensor_scan import change_table, scan

TIED = FIXTURES / "tied"


def check(name: str) -> Check:
    return next(c for c in checks_of("weights") if c.name == name)


def findings(model: Path, base: Path | None, name: str, **ctx: object) -> list[Finding]:
    context = Context(Checkpoint(model), Checkpoint(base) if base else None, **ctx)  # type: ignore[arg-type]
    outcome = run_check(check(name), context)
    assert outcome.skipped is None, outcome.skipped
    return list(outcome.findings)


def codes(found: list[Finding]) -> set[str]:
    return {f.code for f in found if f.severity == "error"}


def test_healthy_tied_model_passes() -> None:
    for c in checks_of("weights"):
        if not c.needs_base:
            assert findings(TIED, None, c.name) == []


def _with_lm_head(src: Path, dest: Path, change: float) -> Path:
    """A tied checkpoint saved with an explicit lm_head = embedding + change (transformers #45127)."""
    shutil.copytree(src, dest)
    tensors = load_file(str(dest / "model.safetensors"))
    embedding = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = embedding + np.float32(change)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_tied_flag_with_diverged_lm_head_fails(tmp_path: Path) -> None:
    diverged = _with_lm_head(TIED, tmp_path / "diverged", 0.01)
    (finding,) = findings(diverged, None, "tied_embeddings")
    assert finding.code == "WGT015"
    assert "lm_head.weight differs from model.embed_tokens.weight" in finding.message
    assert "max abs diff 0.01" in finding.message and "transformers #45127" in finding.message


def test_tied_flag_with_an_equal_lm_head_copy_passes(tmp_path: Path) -> None:
    assert findings(_with_lm_head(TIED, tmp_path / "copy", 0.0), None, "tied_embeddings") == []


def test_untied_flag_without_lm_head_fails(tmp_path: Path) -> None:
    untied = shutil.copytree(TIED, tmp_path / "untied")
    config = json.loads((untied / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (untied / "config.json").write_text(json.dumps(config))
    (finding,) = findings(untied, None, "tied_embeddings")
    assert finding.code == "WGT016" and "initialise the output layer at random" in finding.message


def test_model_identical_to_its_base_fails_when_adapters_were_merged() -> None:
    found = findings(BASE, BASE, "change_vs_base", adapters=ADAPTERS)
    assert codes(found) == {"WGT018"}
    assert "bit-identical to the base although 2 adapter(s)" in found[0].message
    assert findings(BASE, BASE, "change_vs_base") == []  # no adapters: nothing was meant to change


def test_change_table_and_threshold() -> None:
    result = scan(Checkpoint(MERGED), Checkpoint(BASE))
    table = {row.group: row.relative_change for row in change_table(result)}
    # The fixture's adapters touch the attention and MLP projections of both layers only.
    assert set(table) == {"model.layers.0", "model.layers.1", "model.embed_tokens.weight", "lm_head.weight",
                          "model.norm.weight"}
    assert table["model.layers.0"] > 0.1 and table["model.layers.1"] > 0.1
    assert table["lm_head.weight"] == table["model.norm.weight"] == 0.0
    assert findings(MERGED, BASE, "change_vs_base") == []
    found = findings(MERGED, BASE, "change_vs_base", max_weight_change=0.55)
    assert codes(found) == {"WGT017"}
    assert "1 layer(s) changed more than --llm-max-weight-change=0.55" in found[0].message
    assert "model.layers.1 0.68" in found[0].message


def _write(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))
    return path


def test_chunked_statistics_match_whole_tensor_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunk boundaries fall inside tensors; NaN/Inf counts, extremes and norms stay exact."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((37, 53)).astype(np.float32)
    values[5, 7], values[36, 52], values[0, 0] = np.nan, -np.inf, np.inf
    base_values = rng.standard_normal((37, 53)).astype(np.float32)
    model = _write(tmp_path / "m", {"w": values, "h": values.astype(np.float16), "clean": base_values * 2})
    base = _write(tmp_path / "b", {"w": base_values, "h": base_values.astype(np.float16), "clean": base_values})
    monkeypatch.setattr(tensor_scan, "CHUNK_ELEMENTS", 100)
    result = scan(Checkpoint(model), Checkpoint(base))
    for name in ("w", "h"):
        stats = result.tensors[name]
        assert (stats.nan, stats.inf) == (1, 2)
        finite = values[np.isfinite(values)]
        assert stats.lo == pytest.approx(float(finite.min()), rel=1e-3)
        assert stats.hi == pytest.approx(float(finite.max()), rel=1e-3)
        assert stats.diff_sumsq is None  # a difference with NaN in it means nothing
    clean = result.tensors["clean"]
    assert clean.relative_change == pytest.approx(1.0, rel=1e-6)  # ||2b - b|| / ||b||
    assert clean.sumsq == pytest.approx(float(np.sum((base_values * 2).astype(np.float64) ** 2)), rel=1e-5)


def test_bfloat16_tensors_are_read_exactly(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file as save_torch

    values = torch.linspace(-3, 5, 4099, dtype=torch.float32).reshape(1, -1).to(torch.bfloat16)
    values[0, 10] = float("nan")
    path = tmp_path / "bf16"
    path.mkdir()
    save_torch({"w": values}, str(path / "model.safetensors"))
    stats = scan(Checkpoint(path)).tensors["w"]
    finite = values.float()[~values.float().isnan()]
    assert stats.nan == 1 and stats.dtype == "BF16"
    assert (stats.lo, stats.hi) == (float(finite.min()), float(finite.max()))
    assert stats.sumsq == pytest.approx(float((finite.double() ** 2).sum()), rel=1e-6)


def test_memory_stays_below_the_largest_tensor(tmp_path: Path) -> None:
    """Peak Python/numpy allocation during a scan with a base is a fixed overhead (~5 chunk-sized
    arrays, ~21 MiB), not the size of the 64 MiB tensors read."""
    rng = np.random.default_rng(1)
    big = rng.standard_normal(16 * 2**20, dtype=np.float32).reshape(4096, 4096)
    model = _write(tmp_path / "m", {"big": big, "small": big[:2]})
    base = _write(tmp_path / "b", {"big": big * np.float32(0.5), "small": big[:2]})
    del big
    tracemalloc.start()
    try:
        result = scan(Checkpoint(model), Checkpoint(base))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.tensors["big"].relative_change == pytest.approx(1.0, rel=1e-4)
    assert result.bytes_read >= 2 * 64 * 2**20
    largest = 64 * 2**20
    assert peak < 20 * 2**20 < largest, f"peak {peak / 2**20:.1f} MiB"
