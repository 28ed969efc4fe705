"""Checks of the tensor data itself, read shard by shard in fixed-size chunks.

The header checks in :mod:`integrity` never read a tensor byte; these do.  Every float tensor
of the model (and, where the base has the same tensor, the base's) is read in chunks of
:data:`CHUNK_ELEMENTS` elements into reused buffers, so the memory held is a fixed overhead
(a few chunk-sized arrays), not the largest tensor, whatever the checkpoint's size.  One scan
gives the figures every weight check needs:

- non-finite values (NaN/Inf) anywhere;
- tensors that are constant (all zero, all one value) where the base's are not;
- ``tie_word_embeddings`` against what the tensors say, in both directions of the field
  failure: tied on paper but lm_head differs from the embedding after a merge (transformers
  #45127), untied on paper but lm_head missing (loaders then initialise it at random);
- per-layer relative change ||W - W_base|| / ||W_base||, a table for the report and an
  optional threshold; a model identical to its base although adapters were merged is an error
  (unsloth #1352).

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

from .checkpoint import (
    CONFIG,
    LM_HEAD_SUFFIXES,
    Checkpoint,
    embedding_name,
    is_lora_key,
    lm_head_name,
)
from .safetensors_header import HeaderError, SafetensorsHeader, TensorInfo
from .integrity import Check, CheckSkipped, Context, Finding

if TYPE_CHECKING:
    import numpy as np

# 1 Mi elements: 8 MiB for the widest (F64) raw chunk; a handful of such arrays live at once.
CHUNK_ELEMENTS = 1 << 20
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_LAYER = re.compile(r"^(?P<group>.*?\blayers?\.\d+)\.")
SCAN_KEY = "weights.scan"


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

    def chunks(self, shard: str, header: SafetensorsHeader, info: TensorInfo,
               elements: int = CHUNK_ELEMENTS) -> Iterator[np.ndarray[Any, Any]]:
        """Flat float chunks of `elements` values (the last one shorter); each is only valid
        until the next is taken, since they share this reader's buffer."""
        import numpy as np

        handle = self.handles.get(shard)
        if handle is None:
            # Unbuffered: a buffered reader would keep another copy of every chunk.
            handle = self.handles[shard] = io.FileIO(self.ckpt.path / shard, "rb")
        width = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}[info.dtype]
        total = math.prod(info.shape)
        offset = header.data_start + info.begin
        if len(self.buffer) < min(elements, total) * width:
            self.buffer = bytearray(min(elements, total) * width)
        view = memoryview(self.buffer)
        for start in range(0, total, elements):
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


# --- the scan shared by the checks of one run -------------------------------------------------

def shared_scan(ctx: Context) -> WeightScan:
    """The scan of ctx.model against ctx.base, made once per Context."""
    cached = ctx.memo.get(SCAN_KEY)
    if cached is None:
        if not ctx.model.loaded_weight_files():
            raise CheckSkipped("no safetensors weights to read (see WGT001 / SAF001)")
        cached = ctx.memo[SCAN_KEY] = scan(ctx.model, ctx.base, progress=ctx.progress)
    assert isinstance(cached, WeightScan)
    return cached


def shard_of(ckpt: Checkpoint, tensor: str) -> str:
    """The weight file the loader reads a tensor from, for Finding.file."""
    where = ckpt.tensor_locations().get(tensor)
    if where is not None:
        return where[0]
    return (ckpt.loaded_weight_files() or ["model.safetensors"])[0]


def _listed(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --- checks -----------------------------------------------------------------------------------

def check_finite(ctx: Context) -> list[Finding]:
    result = shared_scan(ctx)
    bad = sorted(((n, s) for n, s in result.tensors.items() if s.nan or s.inf),
                 key=lambda item: -(item[1].nan + item[1].inf))
    if not bad:
        return []
    described = [f"{n} ({s.nan} NaN, {s.inf} Inf of {s.numel})" for n, s in bad]
    return [Finding("WGT013", "error", f"{len(bad)} tensor(s) hold non-finite values: {_listed(described)}. "
                    "Outputs will be NaN; a merge in float16 overflowed, or the merge read garbage",
                    shard_of(ctx.model, bad[0][0]))]


def check_degenerate(ctx: Context) -> list[Finding]:
    """Constant tensors where the base's vary; without a base, constant matrices (never trained so)."""
    result = shared_scan(ctx)
    flagged: list[str] = []
    for name, stats in sorted(result.tensors.items()):
        if not stats.constant or is_lora_key(name):  # leftover adapter tensors are WGT010's
            continue
        if stats.base_constant is False or (ctx.base is None and len(stats.shape) >= 2):
            value = "all zero" if stats.lo == 0 else f"every value {stats.lo:g}"
            flagged.append(f"{name} {list(stats.shape)} is {value}")
    if not flagged:
        return []
    against = "while the base's vary" if ctx.base is not None else "(a weight matrix is never constant after training)"
    return [Finding("WGT014", "error", f"{len(flagged)} tensor(s) are constant {against}: {_listed(flagged)}. "
                    "A save that wrote placeholder or meta tensors (peft #868) or zeroed weights",
                    shard_of(ctx.model, flagged[0].split(" ")[0]))]


def check_tied_embeddings(ctx: Context) -> list[Finding]:
    if not ctx.model.json(CONFIG).ok:
        raise CheckSkipped("config.json is unreadable (see CFG001)")
    tied = ctx.model.config_value("tie_word_embeddings")
    if not isinstance(tied, bool):
        raise CheckSkipped("config.json does not set tie_word_embeddings; the model class decides")
    result = shared_scan(ctx)
    names = set(ctx.model.tensor_names())
    embedding = embedding_name(names)
    if embedding is None:
        raise CheckSkipped("no input embedding tensor found by name")
    lm_head = lm_head_name(names)
    if not tied and lm_head is None:
        return [Finding("WGT016", "error", f"tie_word_embeddings is false but there is no lm_head tensor "
                        f"(*{' or *'.join(LM_HEAD_SUFFIXES)}): loaders initialise the output layer at random. "
                        f"Fix: set tie_word_embeddings to true if the model was tied (the base's config "
                        "says), or save lm_head.weight (unsloth PR #9331)", CONFIG)]
    if tied and lm_head is not None:
        tie = result.tie
        if tie is None:
            raise CheckSkipped(f"{embedding} and {lm_head} were not both readable")
        if tie.max_abs_diff != 0:
            return [Finding("WGT015", "error", f"tie_word_embeddings is true but {lm_head} differs from "
                            f"{embedding} (max abs diff {tie.max_abs_diff:.3g}, relative {tie.relative_diff:.3g}): "
                            "loaders tie the two and silently drop one of them, with the merged change in it "
                            "(transformers #45127). Fix: set tie_word_embeddings to false and keep both, or "
                            "merge so that they stay equal", CONFIG)]
    return []


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


def check_weight_change(ctx: Context) -> list[Finding]:
    ctx.require_base()
    result = shared_scan(ctx)
    rows = change_table(result)
    if not rows:
        raise CheckSkipped("no tensor of the model matches the base's name and shape (see WGT007 / WGT008)")
    findings = []
    if ctx.adapters and all(r.relative_change == 0 for r in rows):
        findings.append(Finding("WGT018", "error", f"every compared tensor ({sum(r.tensors for r in rows)}) is "
                                f"bit-identical to the base although {len(ctx.adapters)} adapter(s) were merged: "
                                "the save holds the base weights only (unsloth #1352)", shard_of(ctx.model, rows[0].group)))
    limit = ctx.max_weight_change
    if limit is not None:
        over = [r for r in rows if r.relative_change > limit]
        if over:
            described = [f"{r.group} {r.relative_change:.3g}" for r in over]
            findings.append(Finding("WGT017", "error", f"{len(over)} layer(s) changed more than "
                                    f"--llm-max-weight-change={limit:g} relative to the base: {_listed(described)}",
                                    shard_of(ctx.model, next(n for n in result.tensors if n.startswith(over[0].group)))))
    return findings


def describe_table(rows: list[ChangeRow], limit: int = 10) -> list[str]:
    """Lines of the change table for a terminal or a failure message."""
    return [f"{r.group:<40} {r.relative_change:10.3e}  ({r.tensors} tensors)" for r in rows[:limit]]


WEIGHT_CHECKS: tuple[Check, ...] = (
    Check("finite", ("WGT013",), False, check_finite, "weights"),
    Check("constant_tensors", ("WGT014",), False, check_degenerate, "weights"),
    Check("tied_embeddings", ("WGT015", "WGT016"), False, check_tied_embeddings, "weights"),
    Check("change_vs_base", ("WGT017", "WGT018"), True, check_weight_change, "weights"),
)
