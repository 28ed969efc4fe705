"""The safetensors header reader on hand-made files: every way a header can lie."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from pytest_llmmerge.checkpoint import Checkpoint, shard_name_parts
from pytest_llmmerge.safetensors_header import HeaderError, read_safetensors_header


def raw_file(path: Path, header: Any, data: bytes = b"", length: int | None = None) -> Path:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_reads_a_real_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": np.zeros((3, 4), dtype=np.float32), "b": np.ones(5, dtype=np.int64)}, str(path),
              metadata={"format": "pt"})
    header = read_safetensors_header(path)
    assert header.tensors["a"].shape == (3, 4) and header.tensors["a"].dtype == "F32"
    assert header.tensors["b"].nbytes == 40
    assert header.metadata == {"format": "pt"}
    assert header.overruns() == []


@pytest.mark.parametrize("header,data,length,message", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"", None, None),  # truncated: overrun
    ({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12 bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "invalid data_offsets"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "invalid shape"),
    (b"{not json", b"", None, "not valid JSON"),
    ([1, 2], b"", None, "not an object"),
    ({}, b"", 10**12, "header length field says"),
])
def test_rejects_bad_headers(tmp_path: Path, header: Any, data: bytes, length: int | None,
                             message: str | None) -> None:
    path = raw_file(tmp_path / "x.safetensors", header, data, length)
    if message is None:
        assert [name for name, _ in read_safetensors_header(path).overruns()] == ["a"]
        return
    with pytest.raises(HeaderError, match=message):
        read_safetensors_header(path)


def test_too_short_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\1\2")
    with pytest.raises(HeaderError, match="shorter than the 8-byte"):
        read_safetensors_header(path)


def test_shard_names() -> None:
    assert shard_name_parts("model-00002-of-00003.safetensors") == ("model", 2, 3)
    assert shard_name_parts("model-1.safetensors") is None
    assert shard_name_parts("model.safetensors") is None


def test_unigram_vocab_and_template_list(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"model": {"type": "Unigram", "vocab": [["<unk>", 0.0], ["a", -1.0]]},
         "added_tokens": [{"id": 2, "content": "<eot>", "special": True}]}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<eot>"}, "chat_template": [{"name": "tool_use", "template": "T"},
                                                              {"name": "default", "template": "D"}]}))
    ckpt = Checkpoint(tmp_path)
    assert ckpt.token_ids == {"<unk>": 0, "a": 1, "<eot>": 2}
    assert ckpt.tokenizer_eos() == ("<eot>", 2)
    assert ckpt.chat_template() == ("D", "tokenizer_config.json")
    assert ckpt.tokenizer_rows_needed() == 3


def _f32(begin: int, count: int) -> dict[str, Any]:
    return {"dtype": "F32", "shape": [count], "data_offsets": [begin, begin + 4 * count]}


@pytest.mark.parametrize("tensors,data_bytes", [
    ({"a": _f32(0, 2), "b": _f32(8, 1)}, 12),              # tiled in order
    ({"b": _f32(8, 1), "a": _f32(0, 2)}, 12),              # tiled, listed out of order
    ({"a": _f32(0, 0), "b": _f32(0, 0), "c": _f32(0, 1)}, 4),  # empty tensors share an offset
    ({"a": _f32(4, 2)}, 12),                               # gap before the first tensor
    ({"a": _f32(0, 1), "b": _f32(8, 1)}, 12),              # gap between tensors
    ({"a": _f32(0, 2), "b": _f32(0, 2)}, 8),               # two tensors on the same bytes
    ({"a": _f32(0, 2), "b": _f32(4, 2)}, 12),              # partial overlap
    ({"a": _f32(0, 2)}, 12),                               # bytes after the last tensor
])
def test_layout_verdict_matches_the_safetensors_library(tmp_path: Path, tensors: dict[str, Any],
                                                        data_bytes: int) -> None:
    """WGT019 is the library's own rule: a file is flagged exactly when safe_open refuses it."""
    from safetensors import safe_open

    path = raw_file(tmp_path / "x.safetensors", tensors, b"\0" * data_bytes)
    try:
        with safe_open(str(path), framework="np") as handle:
            list(handle.keys())
        library_accepts = True
    except Exception:
        library_accepts = False
    header = read_safetensors_header(path)
    assert header.overruns() == []
    assert (header.layout_problem() is None) == library_accepts, header.layout_problem()
