"""Merge-precision audit: how much of the adapters' update the merged candidate really holds.

For every weight a LoRA adapter touches, the exact merge is W_ref = W_base + dW with
dW = sum over the chain's adapters of scale_k * B_k @ A_k, computed here in float64 from the
adapters' own factors.  Per tensor the audit reports

- ``error`` = ||W_candidate - W_ref|| / ||dW||: the share of the update the candidate lost
  (or got wrong).  A float32 merge loses ~1e-5 of it; a merge rounded through bfloat16 loses
  tens of per cent, the "adapter fine, merged model worse" reports (peft #1388);
- ``floor`` = ||round(W_ref) - W_ref|| / ||dW|| with round() to the candidate's own storage
  dtype: what even a perfect merge saved in that dtype must lose;
- ``vanished``: the fraction of the update's non-zero entries where the candidate still holds
  the base's value, the update rounded away entirely.

Everything is computed in row blocks of at most CHUNK_ELEMENTS values, so memory is a few
blocks plus the adapters' (small) factors, whatever the size of the model.  The check that
judges the figures is :mod:`.checks.audit`.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import LORA_DEFAULT_ALPHA, LORA_DEFAULT_RANK, Checkpoint, adapter_config, lora_factor
from .file_names import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .safetensors_header import HeaderError, SafetensorsHeader, TensorInfo
from .tensor_scan import CHUNK_ELEMENTS, TensorReader, locations, read_whole

if TYPE_CHECKING:
    import numpy as np

_PEFT_PREFIX = "base_model.model."


def rounding_slack(adapters: int) -> float:
    """How many storage-dtype floors a sound merge of `adapters` sequential adapters may lose.

    Each merge step rounds once to the storage dtype and the update's own product rounds too;
    independent roundings add in quadrature, so such a chain lands near sqrt(n + 1) floors
    (measured on the fixtures in float32: 1.67-2.03 for n = 2, sqrt(3) = 1.73; a bf16 base
    merged in bf16 rounds the base and the sum, about sqrt(2) floors).  Twice that is never
    counted as a loss: it is what the dtype forces, not what the merge did.
    """
    return 2.0 * math.sqrt(adapters + 1)


class AuditError(ValueError):
    """An adapter that cannot be audited against this base and candidate (the message says why)."""


@dataclass(frozen=True)
class Factors:
    """delta = left @ right in the stored layout of the target weight (scale folded into left)."""

    left: Any  # (out, r) float64
    right: Any  # (r, in) float64


@dataclass(frozen=True)
class LayerAudit:
    tensor: str
    dtype: str  # the candidate's storage dtype of this tensor
    error: float
    floor: float
    floor_f32: float  # the same for float32 storage: what any float32 merge's own rounding costs
    vanished: float
    delta_norm: float  # ||dW|| / ||W_base||

    def as_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "error": self.error, "floor": self.floor, "floor_f32": self.floor_f32,
                "vanished": self.vanished, "delta_over_weight": self.delta_norm}

    def over(self, limit: float, slack: float) -> bool:
        """Lost more than `limit`, and more than `slack` floors of the candidate's own storage dtype
        (what a sound merge saved in that dtype loses by rounding alone)."""
        return self.error > max(limit, slack * self.floor, slack * self.floor_f32)


@dataclass
class AuditResult:
    layers: list[LayerAudit] = field(default_factory=list)
    not_audited: list[str] = field(default_factory=list)  # what was left out, and why
    seconds: float = 0.0

    def overall_error(self) -> float:
        """The update-weighted error over every audited tensor."""
        lost = sum((layer.error * layer.delta_norm) ** 2 for layer in self.layers)
        total = sum(layer.delta_norm ** 2 for layer in self.layers)
        return math.sqrt(lost / total) if total else 0.0


# --- the adapters' updates --------------------------------------------------------------------

def _pattern_value(patterns: Any, module: str, default: float) -> float:
    """peft's rank_pattern / alpha_pattern: keys matched against the end of the module name."""
    if isinstance(patterns, dict):
        for key, value in patterns.items():
            if re.search(rf"(^|\.){key}$", module) and isinstance(value, (int, float)):
                return float(value)
    return default


def adapter_factors(adapter: Path) -> tuple[dict[str, Factors], list[str]]:
    """target tensor name -> its update's factors; plus what this adapter holds that is not audited."""
    import numpy as np

    config_path = adapter / ADAPTER_CONFIG
    try:
        config = adapter_config(adapter)
    except ValueError as exc:
        raise AuditError(str(exc)) from None
    if config.get("peft_type") != "LORA":
        raise AuditError(f"{config_path}: peft_type {config.get('peft_type')!r} is not audited (LoRA only)")
    if config.get("use_dora"):
        raise AuditError(f"{config_path}: DoRA rescales the merged weight by a learned magnitude; the audit "
                         "covers plain LoRA only")
    ckpt = Checkpoint(adapter)
    if not ckpt.has(ADAPTER_WEIGHTS):
        raise AuditError(f"{adapter}: no {ADAPTER_WEIGHTS} (pickled adapters are not read)")
    header = ckpt.header(ADAPTER_WEIGHTS)
    if isinstance(header, HeaderError):
        raise AuditError(f"{adapter / ADAPTER_WEIGHTS}: {header}")
    alpha = float(config.get("lora_alpha") or LORA_DEFAULT_ALPHA)
    rank = float(config.get("r") or LORA_DEFAULT_RANK)
    pairs: dict[str, dict[str, str]] = {}
    skipped: list[str] = []
    for key in header.tensors:
        factor = lora_factor(key)
        if factor is None:
            skipped.append(f"{adapter.name}: {key} (not a LoRA factor; e.g. modules_to_save replace the whole "
                           "tensor)")
            continue
        module, kind = factor
        pairs.setdefault(module, {})[kind] = key
    out: dict[str, Factors] = {}
    for module, kinds in sorted(pairs.items()):
        embedding = "lora_embedding_A" in kinds
        a_key = kinds.get("lora_embedding_A" if embedding else "lora_A")
        b_key = kinds.get("lora_embedding_B" if embedding else "lora_B")
        if a_key is None or b_key is None:
            raise AuditError(f"{adapter / ADAPTER_WEIGHTS}: {module} has only one of its two LoRA factors")
        a = read_whole(ckpt, ADAPTER_WEIGHTS, a_key).astype(np.float64)
        b = read_whole(ckpt, ADAPTER_WEIGHTS, b_key).astype(np.float64)
        name = module.removeprefix(_PEFT_PREFIX)
        r = _pattern_value(config.get("rank_pattern"), name, rank)
        scale = _pattern_value(config.get("alpha_pattern"), name, alpha)
        scale /= math.sqrt(r) if config.get("use_rslora") else r
        if embedding or config.get("fan_in_fan_out"):
            # Embedding deltas (and GPT-2 Conv1D weights) are stored transposed: (B @ A).T
            out[f"{name}.weight"] = Factors(a.T * scale, b.T)
        else:
            out[f"{name}.weight"] = Factors(b * scale, a)
    return out, skipped


def chain_factors(adapters: Sequence[Path]) -> tuple[dict[str, Factors], list[str]]:
    """The summed update of a merge chain, per tensor, as one pair of stacked factors."""
    import numpy as np

    stacked: dict[str, list[Factors]] = {}
    notes: list[str] = []
    for adapter in adapters:
        factors, skipped = adapter_factors(adapter)
        notes += skipped
        for name, f in factors.items():
            stacked.setdefault(name, []).append(f)
    # sum_k L_k @ R_k == [L_1 | L_2 | ...] @ [R_1; R_2; ...]
    return {name: Factors(np.concatenate([f.left for f in fs], axis=1), np.concatenate([f.right for f in fs], axis=0))
            for name, fs in stacked.items()}, notes


# --- rounding to a storage dtype --------------------------------------------------------------

def round_to(values: np.ndarray[Any, Any], dtype: str) -> np.ndarray[Any, Any]:
    """float64 values rounded (to nearest even) to a safetensors dtype, back as float64."""
    import numpy as np

    if dtype == "F64":
        return values
    if dtype == "F16":
        return values.astype(np.float16).astype(np.float64)
    single = values.astype(np.float32)
    if dtype == "F32":
        return single.astype(np.float64)
    if dtype == "BF16":
        bits = single.view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
        return rounded.view(np.float32).astype(np.float64)
    raise AuditError(f"dtype {dtype} is not audited")


# --- the audit --------------------------------------------------------------------------------

def _rows(reader: TensorReader, where: tuple[str, SafetensorsHeader, TensorInfo],
          rows_per_block: int) -> Iterator[np.ndarray[Any, Any]]:
    info = where[2]
    columns = math.prod(info.shape[1:]) if len(info.shape) > 1 else 1
    for flat in reader.chunks(*where, elements=rows_per_block * columns):
        yield flat.reshape(-1, columns)


def audit(candidate: Checkpoint, base: Checkpoint, adapters: Sequence[Path], *,
          progress: Any = None) -> AuditResult:
    """Audit every tensor the adapters touch; raises AuditError when they do not fit the base."""
    import numpy as np

    say = progress or (lambda message: None)
    started = time.monotonic()
    factors, notes = chain_factors(adapters)
    result = AuditResult(not_audited=notes)
    cand_at, cand_unread = locations(candidate)
    base_at, _ = locations(base)
    missing = sorted(n for n in factors if n not in base_at)
    if missing:
        raise AuditError(f"the adapters update {len(missing)} tensor(s) the base does not hold (wrong base, or "
                         f"a model with another naming): {', '.join(missing[:4])}")
    readers = (TensorReader(candidate), TensorReader(base))
    say(f"audit: {len(factors)} tensors updated by {len(adapters)} adapter(s)")
    try:
        for number, (name, f) in enumerate(sorted(factors.items()), 1):
            if name not in cand_at:
                why = cand_unread.get(name, "is missing from the candidate (see WGT007)")
                result.not_audited.append(f"{name}: {why}")
                continue
            info = cand_at[name][2]
            if info.shape != base_at[name][2].shape or (info.shape[0], math.prod(info.shape[1:])) != \
                    (f.left.shape[0], f.right.shape[1]):
                raise AuditError(f"{name}: candidate {list(info.shape)}, base {list(base_at[name][2].shape)}, "
                                 f"adapter update {[f.left.shape[0], f.right.shape[1]]}: shapes do not fit")
            columns = f.right.shape[1]
            rows_per_block = max(1, CHUNK_ELEMENTS // max(columns, 1))
            lost = floor = floor_f32 = delta_sq = base_sq = 0.0
            vanished = changed = 0
            start = 0
            for cand_rows, base_rows in zip(_rows(readers[0], cand_at[name], rows_per_block),
                                            _rows(readers[1], base_at[name], rows_per_block)):
                stop = start + cand_rows.shape[0]
                delta = f.left[start:stop] @ f.right
                w_base = base_rows.astype(np.float64)
                reference = w_base + delta
                w_cand = cand_rows.astype(np.float64)
                lost += float(np.sum((w_cand - reference) ** 2))
                floor += float(np.sum((round_to(reference, info.dtype) - reference) ** 2))
                floor_f32 += float(np.sum((round_to(reference, "F32") - reference) ** 2))
                delta_sq += float(np.sum(delta ** 2))
                base_sq += float(np.sum(w_base ** 2))
                moved = delta != 0
                changed += int(np.count_nonzero(moved))
                vanished += int(np.count_nonzero(moved & (w_cand == w_base)))
                start = stop
            norm = math.sqrt(delta_sq)
            if norm == 0:
                result.not_audited.append(f"{name}: the adapters' update is exactly zero")
                continue
            result.layers.append(LayerAudit(
                name, info.dtype, math.sqrt(lost) / norm, math.sqrt(floor) / norm, math.sqrt(floor_f32) / norm,
                vanished / changed if changed else 0.0, norm / math.sqrt(base_sq) if base_sq else math.inf))
            if number % 50 == 0:
                say(f"audit: {number}/{len(factors)} tensors")
    finally:
        for reader in readers:
            reader.close()
    result.seconds = time.monotonic() - started
    return result


def worst_layers(candidate: Checkpoint, before: Checkpoint, adapter: Path,
                 count: int = 5) -> tuple[list[tuple[str, float]], list[str]]:
    """The tensors of `candidate` that lost most of `adapter`'s update merged onto `before`:
    (tensor, error) pairs and the lines that explain them to a person."""
    try:
        result = audit(candidate, before, (adapter,))
    except AuditError as exc:
        return [], [f"no per-layer audit: {exc}"]
    worst = sorted(result.layers, key=lambda layer: -layer.error)[:count]
    if not worst:
        return [], []
    lines = ["layers that lost most of the fine-tuning delta (||W_merged - (W_before + dW_fp32)|| / ||dW||; the "
             f"storage dtype alone loses {worst[0].floor:.3g} of {worst[0].tensor}):"]
    return [(layer.tensor, layer.error) for layer in worst], lines + [f"    {layer.tensor}: {layer.error:.3g}"
                                                                      for layer in worst]
