"""Diagnose a merge: stream every adapted weight of the candidate and the base against the
adapters' exact update, and name what the merge did to each (:mod:`.merge_verdicts`).

Per adapted weight, everything is computed in row blocks of at most CHUNK_ELEMENTS values, so
memory is a few blocks plus the adapters' (small) factors, whatever the size of the model;
the update is never materialised whole.  Tensors no adapter touches are judged from the
weight scan's norms (:func:`.tensor_scan.scan`, shared with the `weights::` checks), so the
diagnosis reads only the adapted weights a second time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import LM_HEAD_SUFFIXES, Checkpoint, embedding_name
from .file_names import ADAPTER_WEIGHTS, CONFIG
from .merge_audit import (
    MANTISSA_BITS,
    AuditError,
    Factors,
    Replacement,
    Update,
    chain_updates,
    coarser_of,
    round_to,
    rounding_slack,
)
from .merge_verdicts import (
    GRID_BLOCK,
    Diagnosis,
    ModuleFigures,
    ModuleVerdict,
    ScaleOf,
    classify,
    coarser_dtypes,
    untouched_verdict,
)
from .safetensors_header import SafetensorsHeader, TensorInfo
from .tensor_scan import CHUNK_ELEMENTS, TensorReader, WeightScan, locations

if TYPE_CHECKING:
    import numpy as np

Where = tuple[str, SafetensorsHeader, TensorInfo]
# Values per block the rounding floors are estimated from (see _figures).
_SAMPLE = 1 << 17
# Values of one weight the figures are summed over at most (16 Mi: every weight of a 7B model
# whole; a 70B's 235 M-value MLP weights on every 14th block of rows).
DIAGNOSED_VALUES = 1 << 24


def _floor_dtypes(dtype: str) -> list[str]:
    """The candidate's dtype, float32 (what any float32 merge's own rounding costs) and the 16-bit
    floats coarser than the candidate's, where a merge that rounded may have run."""
    return list(dict.fromkeys([dtype, "F32", *coarser_dtypes(dtype)]))


def _dot(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> float:
    """<a, b> of two flat arrays, in one thread: BLAS's threaded dot spins against the other
    processes of a loaded machine (pytest-xdist on two cores), ten times slower here."""
    import numpy as np

    return float(np.einsum("i,i->", a, b))


def _geometry(info: TensorInfo) -> tuple[int, int, int]:
    """(rows, columns, rows per block of at most CHUNK_ELEMENTS values) of a weight read as a matrix."""
    rows = info.shape[0] if info.shape else 1
    columns = math.prod(info.shape[1:]) if len(info.shape) > 1 else 1
    return rows, columns, max(1, CHUNK_ELEMENTS // max(columns, 1))


def _row_blocks(reader: TensorReader, where: Where, every: int = 1) -> Iterator[np.ndarray[Any, Any]]:
    _, columns, rows_per_block = _geometry(where[2])
    for flat in reader.chunks(*where, elements=rows_per_block * columns, every=every):
        yield flat.reshape(-1, columns)


def _figures(name: str, candidate: Where, base: Where, updates: Sequence[Update],
             readers: tuple[TensorReader, TensorReader]) -> ModuleFigures:
    """The streamed sums of one adapted weight (merge_verdicts' module docstring)."""
    import numpy as np

    info = candidate[2]
    rows, columns, rows_per_block = _geometry(info)
    # A weight saved whole (modules_to_save) is never one a merge transposes.
    square = rows == columns and len(info.shape) == 2 and all(isinstance(u.factors, Factors) for u in updates)
    # Every figure is a sum over values: past DIAGNOSED_VALUES, an evenly spread systematic
    # sample of row blocks (every k-th, from the first to the last rows) stands for the weight.
    every = max(1, math.ceil(rows * columns / DIAGNOSED_VALUES))
    m = len(updates)
    gram = np.zeros((m, m))
    along = np.zeros(m)
    base_along = np.zeros(m)
    along_t = transposed_sq = change_sq = error_sq = base_sq = 0.0
    base_dtype = base[2].dtype
    floors = dict.fromkeys(_floor_dtypes(info.dtype) + [base_dtype], 0.0)
    # The coarser of the two dtypes: what a perfect merge at the base's or the candidate's own
    # precision keeps of the update, on the sample (<D_perfect, U>, |D_perfect|^2, |U|^2).
    perfect_dtype = coarser_of(info.dtype, base_dtype)
    kept = kept_sq = sampled_sq = 0.0
    sampled_n = 0
    nonfinite = moved = vanished = values = 0
    for block, (cand_rows, base_rows) in enumerate(zip(_row_blocks(readers[0], candidate, every),
                                                       _row_blocks(readers[1], base, every))):
        start = block * every * rows_per_block
        stop = start + cand_rows.shape[0]
        w_base = base_rows.astype(np.float64).ravel()
        parts = [_update_rows(u, start, stop, columns, w_base) for u in updates]
        delta = parts[0] if m == 1 else np.sum(parts, axis=0)
        w_cand = cand_rows.astype(np.float64).ravel()
        bad = ~np.isfinite(w_cand)
        if bad.any():
            # Counted, then set to the exact merge so the other sums stay finite: the verdict is overflow.
            nonfinite += int(np.count_nonzero(bad))
            w_cand = np.where(bad, w_base + delta, w_cand)
        change = w_cand - w_base
        values += change.size
        for i, part in enumerate(parts):
            along[i] += _dot(part, change)
            base_along[i] += _dot(part, w_base)
            for j in range(i, m):
                gram[i, j] += _dot(part, parts[j])
        change_sq += _dot(change, change)
        error = change - delta
        error_sq += _dot(error, error)
        base_sq += _dot(w_base, w_base)
        if square:
            transposed = np.ravel(sum(u.factors.transposed_rows(start, stop) for u in updates
                                      if isinstance(u.factors, Factors)))
            along_t += _dot(change, transposed)
            transposed_sq += _dot(transposed, transposed)  # |U^T| = |U| over whole rows only
        # The rounding floors, the share of the update rounded away and where it vanished are
        # statistics of every value alike: a systematic sample of the block estimates them
        # (unbiased, to ~1/sqrt(sample) relative), at a fraction of the cost of every value.
        step = max(1, delta.size // _SAMPLE)
        reference = w_base[::step] + delta[::step]
        with np.errstate(over="ignore", invalid="ignore"):  # float16 overflows to inf: an infinite floor
            for dtype in floors:
                lost = round_to(reference, dtype) - reference
                floors[dtype] += _dot(lost, lost) * step
            perfect = round_to(reference, perfect_dtype) - w_base[::step]
        sampled = delta[::step]
        kept += _dot(perfect, sampled) * step
        kept_sq += _dot(perfect, perfect) * step
        sampled_sq += _dot(sampled, sampled) * step
        sampled_n += sampled.size
        touched = delta[::step] != 0
        moved += int(np.count_nonzero(touched))
        vanished += int(np.count_nonzero(touched & (w_cand[::step] == w_base[::step])))
    gram = np.triu(gram) + np.triu(gram, 1).T
    update_sq = float(gram.sum())
    return ModuleFigures(
        tensor=name, dtype=info.dtype, base_dtype=base_dtype, values=values, update_sq=update_sq,
        change_sq=change_sq, error_sq=error_sq, base_sq=base_sq, base_along=tuple(float(v) for v in base_along),
        perfect=(kept, kept_sq, sampled_sq, sampled_n),
        gram=tuple(tuple(float(v) for v in row) for row in gram), along=tuple(float(v) for v in along),
        along_transposed=along_t if square else None, transposed_sq=transposed_sq if square else None,
        floors={dtype: math.sqrt(value) if math.isfinite(value) else math.inf for dtype, value in floors.items()},
        adapters=tuple(u.adapter for u in updates), scales=tuple(ScaleOf(u.rank, u.alpha, u.rslora) for u in updates),
        nonfinite=nonfinite, vanished=vanished / moved if moved else 0.0)


def _update_rows(update: Update, start: int, stop: int, columns: int,
                 w_base: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Rows start:stop of one adapter's update, flat: its LoRA product, or its saved copy of the
    whole weight minus the base's (modules_to_save)."""
    if isinstance(update.factors, Replacement):
        values: np.ndarray[Any, Any] = update.factors.values(start, stop, columns) - w_base
        return values
    rows: np.ndarray[Any, Any] = update.factors.rows(start, stop).ravel()
    return rows


def levels_per_block(values: np.ndarray[Any, Any], jitter: np.ndarray[Any, Any]) -> float:
    """The median number of levels in consecutive blocks of GRID_BLOCK values: sorted, a new level
    starts wherever two neighbours lie further apart than their `jitter` (how far the storage
    rounding may have moved each) allows, so values on a grid that rounding moved stay one level."""
    import numpy as np

    usable = values.size // GRID_BLOCK * GRID_BLOCK
    if not usable:
        return float(GRID_BLOCK)
    blocks = values.ravel()[:usable].reshape(-1, GRID_BLOCK)
    order = np.argsort(blocks, axis=1)
    ordered = np.take_along_axis(blocks, order, axis=1)
    moved = np.take_along_axis(jitter.ravel()[:usable].reshape(-1, GRID_BLOCK), order, axis=1)
    apart = np.diff(ordered, axis=1) > moved[:, 1:] + moved[:, :-1]
    return float(np.median(1 + np.count_nonzero(apart, axis=1)))


def _half_ulp(stored: np.ndarray[Any, Any], dtype: str) -> np.ndarray[Any, Any]:
    """Half a unit in the last place of each stored value: how far its rounding moved it."""
    import numpy as np

    _, exponent = np.frexp(stored)
    half: np.ndarray[Any, Any] = np.ldexp(1.0, exponent - MANTISSA_BITS.get(dtype, 24) - 1)
    return half


def _grid(reader: TensorReader, where: Where, updates: Sequence[Update]) -> float | None:
    """levels_per_block of W_candidate - U over the first chunk of a weight matrix: a base rounded
    to a quantization grid shows through the update added to it.  None for vectors (a norm's
    weights sit near 1.0 on few levels by nature)."""
    import numpy as np

    info = where[2]
    if len(info.shape) != 2 or not all(isinstance(u.factors, Factors) for u in updates):
        return None
    for rows in _row_blocks(reader, where):
        stored = rows.astype(np.float64)
        delta = sum(u.factors.rows(0, rows.shape[0]) for u in updates if isinstance(u.factors, Factors)) \
            if updates else 0.0
        return levels_per_block(stored - delta, _half_ulp(stored, info.dtype))
    return float(GRID_BLOCK)


def _untouched(diagnosis: Diagnosis, scan: WeightScan, skip: Callable[[str], bool], reader: TensorReader,
               cand_at: dict[str, Where]) -> None:
    """Tensors no adapter updates that changed beyond rounding, from the weight scan's norms."""
    compared = 0
    identical = True
    for name, stats in sorted(scan.tensors.items()):
        if stats.diff_sumsq is None or stats.base_sumsq is None:
            continue
        identical = identical and stats.diff_sumsq == 0
        if skip(name):
            continue
        compared += 1
        found = untouched_verdict(name, stats.dtype, stats.base_sumsq, stats.diff_sumsq, slack=rounding_slack(0))
        if found is not None and found.verdict == "changed" and name in cand_at:
            found = replace(found, grid=_grid(reader, cand_at[name], ()))
        if found is not None:
            diagnosis.untouched.append(found)
    diagnosis.untouched_compared = compared
    diagnosis.identical_to_base = identical and compared > 0


def diagnose(candidate: Checkpoint, base: Checkpoint, adapters: Sequence[Path], *,
             scan: WeightScan | None = None, progress: Callable[[str], None] | None = None) -> Diagnosis:
    """Every weight the adapters update, classified; with `scan` (the weight scan of the
    candidate against the base) the tensors they do not update too.  Raises AuditError when
    the adapters do not fit the base."""
    say = progress or (lambda message: None)
    started = time.monotonic()
    updates, notes, replaced = chain_updates(adapters)
    diagnosis = Diagnosis(not_audited=notes)
    cand_at, cand_unread = locations(candidate)
    base_at, _ = locations(base)
    # A LoRA on lm_head of a tied model updates the one matrix saved as the embedding.
    for located in (base_at, cand_at):
        embedding = embedding_name(located)
        for name in updates:
            if name not in located and name.endswith(LM_HEAD_SUFFIXES) and embedding is not None:
                located[name] = located[embedding]
    missing = sorted(n for n in updates if n not in base_at)
    if missing:
        raise AuditError(f"the adapters update {len(missing)} tensor(s) the base does not hold (wrong base, or "
                         f"a model with another naming): {', '.join(missing[:4])}", base.path / CONFIG)
    slack = rounding_slack(len(adapters))
    readers = (TensorReader(candidate), TensorReader(base))
    say(f"merge diagnosis: {len(updates)} weights updated by {len(adapters)} adapter(s)")
    try:
        for number, (name, ups) in enumerate(sorted(updates.items()), 1):
            if name not in cand_at:
                why = cand_unread.get(name, "is missing from the candidate (WGT007)")
                diagnosis.unreadable.append(f"{name}: {why}")
                continue
            info, base_info = cand_at[name][2], base_at[name][2]
            flat = (info.shape[0], math.prod(info.shape[1:])) if info.shape else (1, 1)
            wrong = next((u for u in ups if u.factors.shape != flat), None)
            if info.shape != base_info.shape or wrong is not None:
                at_fault = cand_at[name][0] if info.shape != base_info.shape or wrong is None else \
                    Path(adapters[wrong.adapter]) / ADAPTER_WEIGHTS
                shown = f", adapter {wrong.adapter + 1} update {list(wrong.factors.shape)}" if wrong else ""
                raise AuditError(f"{name}: candidate {list(info.shape)}, base {list(base_info.shape)}{shown}: "
                                 "shapes do not fit", at_fault)
            figures = _figures(name, cand_at[name], base_at[name], ups, readers)
            if figures.update_sq == 0:
                diagnosis.not_audited.append(f"{name}: the adapters' update is exactly zero")
                continue
            verdict: ModuleVerdict = classify(figures, slack=slack)
            if verdict.verdict == "foreign":
                verdict = replace(verdict, grid=_grid(readers[0], cand_at[name], ups))
            diagnosis.modules.append(verdict)
            if number % 50 == 0:
                say(f"merge diagnosis: {number}/{len(updates)} weights")
        if scan is not None:
            def skip(name: str) -> bool:
                return name in updates or any(name.startswith(module + ".") for module in replaced)

            _untouched(diagnosis, scan, skip, readers[0], cand_at)
        else:
            diagnosis.identical_to_base = all(m.change == 0 for m in diagnosis.modules)
    finally:
        for reader in readers:
            reader.close()
    diagnosis.seconds = time.monotonic() - started
    return diagnosis

