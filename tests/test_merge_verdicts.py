"""The merge diagnosis's classes are defined by the arithmetic, not by the recipes of
test_audit.py: merges made wrong in randomly drawn ways (shapes, ranks, alphas, rsLoRA, storage
dtypes, update sizes, factors) are each named by what was done to them.

Each example writes a real base, adapter and candidate as safetensors (torch does the dtype
rounding) and runs the real diagnosis on them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_llmmerge.checkpoint import Checkpoint
from pytest_llmmerge.merge_diagnosis import diagnose, levels_per_block
from pytest_llmmerge.merge_verdicts import GRID_MAX_LEVELS, scale_hints
from pytest_llmmerge.tensor_scan import scan

TORCH_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
MISTAKES = ("exact", "scaled", "missing", "transposed", "foreign", "rounded", "untouched")


def _save(path: Path, tensors: dict[str, np.ndarray[Any, Any]], dtype: str, name: str = "model.safetensors") -> None:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.from_numpy(v.astype(np.float32)).to(getattr(torch, TORCH_DTYPES[dtype])).contiguous()
               for k, v in tensors.items()}, str(path / name), metadata={"format": "pt"})


def _rounded(values: np.ndarray[Any, Any], dtype: str) -> np.ndarray[Any, Any]:
    import torch

    return torch.from_numpy(values.astype(np.float32)).to(getattr(torch, TORCH_DTYPES[dtype])).double().numpy()


@st.composite
def merges(draw: st.DrawFn) -> dict[str, Any]:
    mistake = draw(st.sampled_from(MISTAKES))
    square = mistake == "transposed" or draw(st.booleans())
    rows = draw(st.sampled_from((32, 48, 64, 96)))
    return {
        "mistake": mistake,
        "shape": (rows, rows if square else draw(st.sampled_from((32, 80, 128)))),
        "rank": draw(st.sampled_from((1, 2, 4, 8, 16))),
        "alpha": draw(st.sampled_from((1, 8, 16, 32))),
        "rslora": draw(st.booleans()),
        # the candidate's storage dtype; a rounded merge needs one finer than the dtype it ran in
        "dtype": "F32" if mistake == "rounded" else draw(st.sampled_from(("F32", "BF16", "F16"))),
        "ran_in": draw(st.sampled_from(("BF16", "F16"))),
        # |U| / |W|: down to updates below bfloat16's rounding, where exact and missing are told
        # apart by the share of the update kept; the other mistakes need one rounding can show
        "ratio": draw(st.floats(0.001 if mistake in ("exact", "missing") else 0.03, 0.6)),
        # a float32 base under a 16-bit candidate: the release cast the base it merged into
        "base_dtype": draw(st.sampled_from(("same", "F32"))),
        # a factor visibly away from 1 and from 0 (near either it is exact or missing)
        "k": draw(st.one_of(st.floats(-3.0, 0.6), st.floats(1.4, 4.0)).filter(lambda k: abs(k) >= 0.3)),
        "seed": draw(st.integers(0, 2**16)),
    }


def build(root: Path, case: dict[str, Any]) -> tuple[Path, Path, Path]:
    """base, adapter and candidate of `case` under root."""
    rng = np.random.default_rng(case["seed"])
    rows, cols = case["shape"]
    dtype, rank, alpha = case["dtype"], case["rank"], case["alpha"]
    stored = dtype if case["base_dtype"] == "same" else case["base_dtype"]
    w = _rounded(rng.standard_normal((rows, cols)) * 0.02, stored)
    other = _rounded(rng.standard_normal((rows, cols)) * 0.02, stored)
    norm = _rounded(1 + 0.05 * rng.standard_normal(rows), stored)
    a = rng.standard_normal((rank, cols))
    b = rng.standard_normal((rows, rank))
    scale = alpha / (math.sqrt(rank) if case["rslora"] else rank)
    update = scale * b @ a
    b *= case["ratio"] * np.linalg.norm(w) / np.linalg.norm(update)  # the update's size relative to W
    update = scale * b @ a
    base = {"layers.0.proj.weight": w, "layers.0.other.weight": other, "layers.0.norm.weight": norm}
    _save(root / "base", base, stored)
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": case["rslora"],
        "target_modules": ["proj"]}))
    _save(adapter, {"base_model.model.layers.0.proj.lora_A.weight": a,
                    "base_model.model.layers.0.proj.lora_B.weight": b}, "F32", "adapter_model.safetensors")
    mistake = case["mistake"]
    merged = dict(base)
    if mistake in ("exact", "untouched"):
        merged["layers.0.proj.weight"] = w + _rounded(update, dtype)  # rounds twice, as peft does in half precision
    elif mistake == "scaled":
        merged["layers.0.proj.weight"] = w + case["k"] * update
    elif mistake == "transposed":
        merged["layers.0.proj.weight"] = w + update.T
    elif mistake == "foreign":
        merged["layers.0.proj.weight"] = w + update + 0.5 * np.linalg.norm(update) / math.sqrt(w.size) * \
            rng.standard_normal(w.shape)
    elif mistake == "rounded":
        merged["layers.0.proj.weight"] = _rounded(w + update, case["ran_in"])
    if mistake == "untouched":
        merged["layers.0.other.weight"] = other * 1.03
    _save(root / "merged", merged, dtype)
    return root / "base", adapter, root / "merged"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=merges())
def test_each_drawn_mistake_is_named_by_its_arithmetic(tmp_path_factory: pytest.TempPathFactory,
                                                       case: dict[str, Any]) -> None:
    base, adapter, merged = build(tmp_path_factory.mktemp("merge"), case)
    candidate = Checkpoint(merged)
    diagnosis = diagnose(candidate, Checkpoint(base), (adapter,), scan=scan(candidate, Checkpoint(base)))
    (module,) = diagnosis.modules
    mistake = case["mistake"]
    expected = "exact" if mistake == "untouched" else mistake
    assert module.verdict == expected, (case, module, diagnosis.summary())
    if mistake == "scaled":
        assert module.factors[0] == pytest.approx(case["k"], rel=0.02, abs=0.02)
    if mistake == "transposed":
        assert module.transposed_scale == pytest.approx(1, rel=0.02)
    if mistake == "rounded":
        assert module.precision == case["ran_in"]
    changed = [u.tensor for u in diagnosis.untouched if u.verdict == "changed"]
    assert changed == (["layers.0.other.weight"] if mistake == "untouched" else []), diagnosis.untouched


@pytest.mark.parametrize(("k", "rank", "alpha", "rslora", "named"), [
    (2.0, 8, 8, False, "merged twice"),
    (math.sqrt(8), 8, 16, False, "scaled alpha/sqrt(r) (rsLoRA) where the adapter uses alpha/r"),
    (1 / math.sqrt(16), 16, 16, True, "rsLoRA's alpha/sqrt(r) taken as alpha/r"),
    (4 / 32, 4, 32, False, "the LoRA scale 8 never applied"),
    (8.0, 4, 32, False, "the LoRA scale 8 applied twice"),
    (-1.0, 4, 8, False, "subtracted instead of added"),
    (0.0, 4, 8, False, "never merged"),
])
def test_a_factor_is_named_when_it_is_a_known_mistake(k: float, rank: int, alpha: int, rslora: bool,
                                                      named: str) -> None:
    from pytest_llmmerge.merge_verdicts import ScaleOf

    assert named in scale_hints(k * 1.01, ScaleOf(rank, alpha, rslora))
    assert scale_hints(1.7, ScaleOf(rank, alpha, rslora)) == []  # a factor no known mistake makes


def test_levels_per_block_tells_a_quantization_grid_from_real_weights() -> None:
    rng = np.random.default_rng(0)
    weights = rng.standard_normal(64 * 256) * 0.02
    jitter = np.zeros_like(weights)
    assert levels_per_block(_rounded(weights, "BF16"), jitter) > 56
    groups = weights.reshape(-1, 64)
    step = np.abs(groups).max(axis=1, keepdims=True) / 7
    on_grid = (np.round(groups / step) * step).ravel()
    # Rounded to bfloat16 after a merge moved it: still 15 levels, within the storage's jitter.
    stored = _rounded(on_grid + 1e-3, "BF16")
    half_ulp = np.ldexp(1.0, np.frexp(stored)[1] - 9)
    assert levels_per_block(stored - 1e-3, half_ulp) <= GRID_MAX_LEVELS


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=merges())
def test_a_sample_of_row_blocks_names_the_same_mistake(tmp_path_factory: pytest.TempPathFactory,
                                                       case: dict[str, Any]) -> None:
    """Past DIAGNOSED_VALUES a weight is diagnosed on every k-th block of rows: here blocks of a
    few rows and a cap of 2048 values, so every drawn weight is sampled, and the class holds."""
    from unittest import mock

    import pytest_llmmerge.merge_diagnosis as merge_diagnosis

    base, adapter, merged = build(tmp_path_factory.mktemp("sampled"), case)
    with mock.patch.object(merge_diagnosis, "CHUNK_ELEMENTS", 512), \
            mock.patch.object(merge_diagnosis, "DIAGNOSED_VALUES", 2048):
        diagnosis = diagnose(Checkpoint(merged), Checkpoint(base), (adapter,))
    (module,) = diagnosis.modules
    expected = "exact" if case["mistake"] == "untouched" else case["mistake"]
    assert module.verdict == expected, (case, module)
