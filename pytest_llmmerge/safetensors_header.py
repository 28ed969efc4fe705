"""Read and validate the header of a safetensors file, without reading any tensor data.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw data.  Everything here trusts nothing in the
header: a truncated, oversized or inconsistent header raises :class:`HeaderError` saying what is
wrong, so that callers can report one broken file and go on with the rest.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

# Bits per element of every dtype the safetensors format defines (integers: a header's shape
# may multiply to more than a float holds).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
# A real header is a few MB at most; a larger length prefix means the file is not safetensors.
MAX_HEADER_BYTES = 100 * 1024 * 1024


class HeaderError(ValueError):
    """A safetensors file whose header cannot be trusted."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one safetensors file; `data_bytes` is what the file really holds."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    header_bytes: int
    data_bytes: int

    @property
    def data_start(self) -> int:
        return 8 + self.header_bytes

    def overruns(self) -> list[tuple[str, TensorInfo]]:
        """Tensors whose data would lie past the end of the file (a truncated file)."""
        return [(n, t) for n, t in self.tensors.items() if t.end > self.data_bytes]

    def layout_problem(self) -> str | None:
        """Why the safetensors library would refuse this layout, None when it would accept it.

        The library requires the tensors, in offset order, to tile the data exactly: the first
        starts at 0, each starts where the previous ends, the last ends at the end of the file.
        Data past the end of the file is :meth:`overruns` (a truncation) and is not repeated here.
        """
        end = 0
        for name, info in sorted(self.tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
            if info.begin < end:
                return f"tensor {name!r} (bytes {info.begin}-{info.end}) overlaps the tensor before it (ends at {end})"
            if info.begin > end:
                return f"bytes {end}-{info.begin} before tensor {name!r} belong to no tensor"
            end = info.end
        if end < self.data_bytes:
            return f"{self.data_bytes - end} byte(s) after the last tensor (data ends at {end}) belong to no tensor"
        return None


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse and validate a safetensors header; raises HeaderError saying what is wrong."""
    size = path.stat().st_size
    # Unbuffered, exact reads: a buffered reader would pull tensor bytes in after the header.
    with path.open("rb", buffering=0) as fh:
        prefix = _read_exactly(fh, 8)
        if len(prefix) < 8:
            raise HeaderError(f"file is {size} bytes, shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES or length > size - 8:
            raise HeaderError(f"header length field says {length} bytes but the file has {size - 8} after it")
        raw = _read_exactly(fh, length)
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise HeaderError("header JSON is nested deeper than a parser allows") from None
    except ValueError as exc:  # also UnicodeDecodeError, and integers past Python's digit limit
        raise HeaderError(f"header is not valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise HeaderError("header JSON is not an object")
    metadata_raw = parsed.pop("__metadata__", None)
    if metadata_raw is None:
        metadata_raw = {}
    # The format's own reader refuses anything but string to string here (safe_open fails).
    if not isinstance(metadata_raw, dict) or not all(isinstance(v, str) for v in metadata_raw.values()):
        raise HeaderError(f"__metadata__ is not an object of strings: {_shown(metadata_raw)}")
    metadata = dict(metadata_raw)
    tensors: dict[str, TensorInfo] = {}
    for name, entry in parsed.items():
        tensors[name] = _tensor_info(name, entry)
    return SafetensorsHeader(path, tensors, metadata, length, size - 8 - length)


def _read_exactly(fh: BinaryIO, count: int) -> bytes:
    chunks, left = [], count
    while left > 0:
        chunk = fh.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# More dimensions than any tensor library supports (torch: 64).
MAX_DIMS = 64


def _shown(value: Any, limit: int = 80) -> str:
    """A value for a message, cut short (a hostile header's values can be megabytes)."""
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's digit limit
        text = f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[:limit] + "..."


def _tensor_info(name: str, entry: Any) -> TensorInfo:
    if not isinstance(entry, dict):
        raise HeaderError(f"entry for tensor {_shown(name)} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise HeaderError(f"tensor {_shown(name)} has unknown dtype {_shown(dtype)}")
    # The format's own reader takes at most 64-bit sizes; past that a product is astronomic.
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and 0 <= d < 2**64 for d in shape)):
        raise HeaderError(f"tensor {_shown(name)} has invalid shape {_shown(shape)}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and 0 <= o < 2**64 for o in offsets) or not offsets[0] <= offsets[1]):
        raise HeaderError(f"tensor {_shown(name)} has invalid data_offsets {_shown(offsets)}")
    expected = -(-math.prod(shape) * DTYPE_BITS[dtype] // 8)
    if offsets[1] - offsets[0] != expected:
        raise HeaderError(
            f"tensor {_shown(name)}: {dtype}{shape} needs {expected} bytes but data_offsets span "
            f"{offsets[1] - offsets[0]}")
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
