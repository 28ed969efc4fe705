"""The tensor data itself, read shard by shard in fixed-size chunks: the figures behind the
`weights::` checks (:mod:`.checks.tensors`), and the reader the merge audit uses.

The header checks never read a tensor byte; this does.  Every float tensor of the model (and,
where the base has the same tensor, the base's) is read in chunks of :data:`CHUNK_ELEMENTS`
elements into reused buffers, so the memory held is a fixed overhead (a few chunk-sized
arrays), not the largest tensor, whatever the checkpoint's size.  One :func:`scan` gives per
tensor the NaN/Inf counts, the extremes (a constant tensor), the norm and, against the base,
the norm of the difference (:func:`change_table` groups it per layer); and how far lm_head is
from the input embedding (the tie flag's truth).

numpy is imported lazily; torch is not needed.
"""

from __future__ import annotations

import io
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .checkpoint import Checkpoint, embedding_name, lm_head_name
from .safetensors_header import HeaderError, SafetensorsHeader, TensorInfo

if TYPE_CHECKING:
    import numpy as np

# 1 Mi elements: 8 MiB for the widest (F64) raw chunk; a handful of such arrays live at once.
CHUNK_ELEMENTS = 1 << 20
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_LAYER = re.compile(r"^(?P<group>.*?\blayers?\.\d+)\.")


@dataclass
class TensorStats:
    dtype: str
    shape: tuple[int, ...]
    nan: int = 0
    inf: int = 0
    lo: float = math.inf  # over finite values
    hi: float = -math.inf
    sumsq: float = 0.0
    # Filled when the base holds a tensor of the same name and shape.
    base_sumsq: float | None = None
    diff_sumsq: float | None = None
    base_constant: bool | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def constant(self) -> bool:
        return self.numel > 1 and self.nan == self.inf == 0 and self.lo == self.hi

    @property
    def relative_change(self) -> float | None:
        if self.base_sumsq is None or self.diff_sumsq is None:
            return None
        if self.base_sumsq == 0:
            return 0.0 if self.diff_sumsq == 0 else math.inf
        return math.sqrt(self.diff_sumsq / self.base_sumsq)


@dataclass(frozen=True)
class TieStats:
    embedding: str
    lm_head: str
    max_abs_diff: float  # nan when either tensor holds non-finite values
    relative_diff: float  # ||lm_head - embedding|| / ||embedding||


@dataclass
class WeightScan:
    tensors: dict[str, TensorStats] = field(default_factory=dict)
    unread: dict[str, str] = field(default_factory=dict)  # tensor -> why its data was not read
    tie: TieStats | None = None
    bytes_read: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class ChangeRow:
    group: str  # "model.layers.3", or a tensor name outside the layers
    relative_change: float
    tensors: int


# --- reading ----------------------------------------------------------------------------------

class TensorReader:
    """Chunks of one checkpoint's tensors as float arrays, through one reused byte buffer."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.buffer = bytearray()  # grown to the widest chunk read so far, then reused
        self.handles: dict[str, io.FileIO] = {}
        self.bytes_read = 0

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()

    def chunks(self, shard: str, header: SafetensorsHeader, info: TensorInfo, elements: int | None = None,
               every: int = 1, span: tuple[int, int] | None = None) -> Iterator[np.ndarray[Any, Any]]:
        """Flat float chunks of `elements` values (default CHUNK_ELEMENTS, the last one shorter),
        only every `every`-th of them (the rest are not read), of the values span[0]:span[1]
        (default all); each is only valid until the next is taken, since they share this
        reader's buffer."""
        import numpy as np

        if elements is None:
            elements = CHUNK_ELEMENTS  # looked up per call, not bound once as a default would be
        handle = self.handles.get(shard)
        if handle is None:
            # Unbuffered: a buffered reader would keep another copy of every chunk.
            handle = self.handles[shard] = io.FileIO(self.ckpt.path / shard, "rb")
        width = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}[info.dtype]
        first, total = span if span is not None else (0, math.prod(info.shape))
        offset = header.data_start + info.begin
        if len(self.buffer) < min(elements, total - first) * width:
            self.buffer = bytearray(min(elements, total - first) * width)
        view = memoryview(self.buffer)
        for start in range(first, total, elements * every):
            count = min(elements, total - start)
            nbytes = count * width
            handle.seek(offset + start * width)
            got = 0
            while got < nbytes:
                n = handle.readinto(view[got:nbytes])
                if not n:
                    raise OSError(f"{shard}: file ends inside tensor data")
                got += n
            self.bytes_read += nbytes
            raw = view[:nbytes]
            if info.dtype == "BF16":
                # bfloat16 is the top half of a float32: widen the bits, then reinterpret.
                yield (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
            elif info.dtype == "F16":
                yield np.frombuffer(raw, dtype="<f2").astype(np.float32)
            elif info.dtype == "F32":
                yield np.frombuffer(raw, dtype="<f4")
            else:
                yield np.frombuffer(raw, dtype="<f8")


def locate(ckpt: Checkpoint, shard: str, name: str) -> tuple[str, SafetensorsHeader, TensorInfo]:
    """Where tensor `name` of one safetensors file lies; KeyError/HeaderError say why not."""
    header = ckpt.header(shard)
    if isinstance(header, HeaderError):
        raise header
    if name not in header.tensors:
        raise KeyError(f"{ckpt.path / shard} has no tensor {name!r}")
    return shard, header, header.tensors[name]


def read_whole(ckpt: Checkpoint, shard: str, name: str) -> np.ndarray[Any, Any]:
    """One whole tensor (small ones: adapter factors) as a float array of its shape."""
    import numpy as np

    where = locate(ckpt, shard, name)
    reader = TensorReader(ckpt)
    try:
        parts = [chunk.copy() for chunk in reader.chunks(*where)]
    finally:
        reader.close()
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    return flat.reshape(where[2].shape)


def locations(ckpt: Checkpoint) -> tuple[dict[str, tuple[str, SafetensorsHeader, TensorInfo]], dict[str, str]]:
    """tensor -> (shard, header, info) for what the loader reads, from readable shards; tensor ->
    reason for the rest.  Files no loader reads (WGT003) are never looked at: a stale shard must
    not stand in for the one the index names."""
    found: dict[str, tuple[str, SafetensorsHeader, TensorInfo]] = {}
    unread: dict[str, str] = {}
    for name, (shard, info) in ckpt.tensor_locations().items():
        header = ckpt.header(shard)
        assert isinstance(header, SafetensorsHeader)  # tensor_locations lists readable headers only
        if info.end > header.data_bytes:
            unread[name] = f"{shard} is truncated (WGT006)"
        elif info.dtype not in _FLOAT_DTYPES:
            unread[name] = f"dtype {info.dtype} is not inspected"
        else:
            found[name] = (shard, header, info)
    return found, unread


def scan(model: Checkpoint, base: Checkpoint | None = None, *,
         progress: Callable[[str], None] | None = None) -> WeightScan:
    """Read every float tensor of `model` (and the same tensors of `base`) once, in chunks."""
    say = progress or (lambda message: None)
    started = time.monotonic()
    result = WeightScan()
    located, result.unread = locations(model)
    base_located = locations(base)[0] if base is not None else {}
    readers = (TensorReader(model), TensorReader(base) if base is not None else None)
    shards = sorted({where[0] for where in located.values()})
    try:
        for number, shard in enumerate(shards, 1):
            names = sorted(n for n, where in located.items() if where[0] == shard)
            size = sum(located[n][2].nbytes for n in names)
            say(f"weights: reading {shard} ({number}/{len(shards)}, {len(names)} tensors, {size / 2**20:.0f} MiB)")
            for name in names:
                _, header, info = located[name]
                stats = result.tensors[name] = TensorStats(info.dtype, info.shape)
                twin = base_located.get(name)
                if twin is not None and twin[2].shape == info.shape and readers[1] is not None:
                    _accumulate_pair(stats, readers[0].chunks(shard, header, info), readers[1].chunks(*twin))
                else:
                    for chunk in readers[0].chunks(shard, header, info):
                        _accumulate(stats, chunk)
        result.tie = _tie_stats(model, located, readers[0])
    finally:
        for reader in readers:
            if reader is not None:
                result.bytes_read += reader.bytes_read
                reader.close()
    result.seconds = time.monotonic() - started
    return result


def _accumulate(stats: TensorStats, chunk: np.ndarray[Any, Any]) -> np.ndarray[Any, Any] | None:
    """Fold one chunk into `stats`; returns the chunk when all its values are finite."""
    import numpy as np

    finite = np.isfinite(chunk)
    bad = chunk.size - int(np.count_nonzero(finite))
    values = chunk
    if bad:
        nan = int(np.count_nonzero(np.isnan(chunk)))
        stats.nan += nan
        stats.inf += bad - nan
        values = chunk[finite]
    if values.size:
        stats.lo = min(stats.lo, float(values.min()))
        stats.hi = max(stats.hi, float(values.max()))
        stats.sumsq += float(np.dot(values, values))
    return None if bad else chunk


def _accumulate_pair(stats: TensorStats, chunks: Iterator[Any], base_chunks: Iterator[Any]) -> None:
    import numpy as np

    base_stats = TensorStats("", stats.shape)
    diff_sumsq = 0.0
    comparable = True
    for chunk, base_chunk in zip(chunks, base_chunks):
        mine = _accumulate(stats, chunk)
        theirs = _accumulate(base_stats, base_chunk)
        if mine is None or theirs is None:
            comparable = False
            continue
        # float64 when either side is: a float32 difference of float64 weights loses the change.
        delta = mine - theirs
        diff_sumsq += float(np.dot(delta, delta))
    stats.base_sumsq = base_stats.sumsq
    stats.base_constant = base_stats.constant
    stats.diff_sumsq = diff_sumsq if comparable else None


def _tie_stats(model: Checkpoint, located: dict[str, tuple[str, SafetensorsHeader, TensorInfo]],
               reader: TensorReader) -> TieStats | None:
    import numpy as np

    embedding = embedding_name(located)
    lm_head = lm_head_name(located)
    if embedding is None or lm_head is None or located[embedding][2].shape != located[lm_head][2].shape:
        return None
    # Two readers over one checkpoint: one buffer each, so both chunks stay valid together.
    other = TensorReader(model)
    worst, diff_sumsq, emb_sumsq = 0.0, 0.0, 0.0
    try:
        for a, b in zip(reader.chunks(*located[embedding]), other.chunks(*located[lm_head])):
            delta = b.astype(np.float64) - a
            if not np.all(np.isfinite(delta)):
                worst = math.nan
                continue
            if delta.size:
                worst = max(worst, float(np.abs(delta).max()))
            diff_sumsq += float(np.dot(delta, delta))
            emb_sumsq += float(np.dot(a, a))
    finally:
        reader.bytes_read += other.bytes_read
        other.close()
    relative = math.sqrt(diff_sumsq / emb_sumsq) if emb_sumsq else (0.0 if diff_sumsq == 0 else math.inf)
    return TieStats(embedding, lm_head, worst, relative)


def change_table(result: WeightScan) -> list[ChangeRow]:
    """Relative change against the base per layer (tensors outside layers stand alone), worst first."""
    groups: dict[str, list[TensorStats]] = {}
    for name, stats in result.tensors.items():
        if stats.relative_change is None:
            continue
        match = _LAYER.match(name)
        groups.setdefault(match["group"] if match else name, []).append(stats)
    rows = []
    for group, members in groups.items():
        base = sum(s.base_sumsq or 0.0 for s in members)
        diff = sum(s.diff_sumsq or 0.0 for s in members)
        change = math.sqrt(diff / base) if base else (0.0 if diff == 0 else math.inf)
        rows.append(ChangeRow(group, change, len(members)))
    return sorted(rows, key=lambda r: (-r.relative_change, r.group))
