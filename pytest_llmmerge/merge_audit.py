"""The adapters' exact update of every weight they touch, and rounding to a storage dtype: the
inputs of the merge diagnosis (:mod:`.merge_diagnosis`).

For a LoRA adapter, the update of a target weight is dW = scale * B @ A with scale = alpha / r
(alpha / sqrt(r) for rsLoRA, both per module with rank_pattern / alpha_pattern), computed
here in float64 from the adapter's own factors, never materialised whole: a merge diagnosis
takes it in row blocks.  A chain of adapters merged one after another adds their updates.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import (
    FLOAT_DTYPE_NAMES,
    LORA_DEFAULT_ALPHA,
    LORA_DEFAULT_RANK,
    Checkpoint,
    adapter_config,
    lora_factor,
)
from .file_names import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .safetensors_header import HeaderError, SafetensorsHeader, TensorInfo
from .tensor_scan import TensorReader, locate, read_whole

if TYPE_CHECKING:
    import numpy as np

_PEFT_PREFIX = "base_model.model."
# Significant bits (with the implicit one) of each float storage dtype: what one rounding keeps.
MANTISSA_BITS = {"F64": 53, "F32": 24, "F16": 11, "BF16": 8}
DTYPE_NAMES = {**FLOAT_DTYPE_NAMES, "F64": "float64"}


def coarser_of(*dtypes: str) -> str:
    """The dtype with the fewest significant bits: the one whose rounding bounds them all."""
    return min(dtypes, key=lambda d: MANTISSA_BITS.get(d, 24))


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
    """An adapter that cannot be audited against this base and candidate: the message says why,
    `file` which file is at fault (a path; relative ones are the candidate's own files)."""

    def __init__(self, message: str, file: Path | str = ADAPTER_CONFIG) -> None:
        super().__init__(message)
        self.file = str(file)


@dataclass(frozen=True)
class Factors:
    """delta = left @ right in the stored layout of the target weight (scale folded into left)."""

    left: Any  # (out, r) float64
    right: Any  # (r, in) float64

    @property
    def shape(self) -> tuple[int, int]:
        return self.left.shape[0], self.right.shape[1]

    # einsum, not @: BLAS's threads spin against the other processes of a loaded machine
    # (pytest-xdist on two cores) and a low-rank product gains nothing from them.
    def rows(self, start: int, stop: int) -> np.ndarray[Any, Any]:
        """Rows start:stop of the update."""
        import numpy as np

        result: np.ndarray[Any, Any] = np.einsum("ik,kj->ij", self.left[start:stop], self.right)
        return result

    def transposed_rows(self, start: int, stop: int) -> np.ndarray[Any, Any]:
        """Rows start:stop of the update's transpose (a square weight merged the wrong way round)."""
        import numpy as np

        result: np.ndarray[Any, Any] = np.einsum("ki,jk->ij", self.right[:, start:stop], self.left)
        return result


@dataclass(frozen=True)
class Replacement:
    """modules_to_save: the adapter's own copy of a whole weight, which the merge writes as is.
    Its update of the base is that copy minus the base's weight, read in row blocks."""

    adapter: Path
    key: str  # the tensor in the adapter's weights file

    @property
    def shape(self) -> tuple[int, int]:
        info = self._located[1][2]
        return (info.shape[0], math.prod(info.shape[1:])) if info.shape else (1, 1)

    @cached_property
    def _located(self) -> tuple[Checkpoint, tuple[str, SafetensorsHeader, TensorInfo]]:
        ckpt = Checkpoint(self.adapter)  # its header parsed once, not per row block
        return ckpt, locate(ckpt, ADAPTER_WEIGHTS, self.key)

    def values(self, start: int, stop: int, columns: int) -> np.ndarray[Any, Any]:
        """Rows start:stop of the copy, flat, as float64."""
        ckpt, where = self._located
        reader = TensorReader(ckpt)
        try:
            return next(reader.chunks(*where, elements=(stop - start) * columns,
                                      span=(start * columns, stop * columns))).astype("float64")
        finally:
            reader.close()


@dataclass(frozen=True)
class Update:
    """One adapter's update of one weight, with what its scale was made of (to name a wrong one)."""

    adapter: int  # its place in the chain, from 0
    factors: Factors | Replacement
    rank: float
    alpha: float
    rslora: bool


# --- the adapters' updates --------------------------------------------------------------------

def _pattern_value(patterns: Any, module: str, default: float) -> float:
    """peft's rank_pattern / alpha_pattern: keys matched against the end of the module name."""
    if isinstance(patterns, dict):
        for key, value in patterns.items():
            if re.search(rf"(^|\.){key}$", module) and isinstance(value, (int, float)):
                return float(value)
    return default


def _replaced_module(key: str) -> str:
    """The module a non-LoRA adapter tensor stands for (modules_to_save, trainable tokens)."""
    name = key.removeprefix(_PEFT_PREFIX)
    for marker in (".modules_to_save.", ".token_adapter.", ".original_module."):
        name = name.split(marker, 1)[0]
    return name.removesuffix(".weight").removesuffix(".bias")


def adapter_updates(adapter: Path, index: int = 0) -> tuple[dict[str, Update], list[str], set[str]]:
    """target tensor name -> this adapter's update of it; what it holds that is not a LoRA factor
    (as notes); and the modules such tensors replace (their change is the adapter's, not a fault)."""
    import numpy as np

    config_path = adapter / ADAPTER_CONFIG
    try:
        config = adapter_config(adapter)
    except ValueError as exc:
        raise AuditError(str(exc), config_path) from None
    if config.get("peft_type") != "LORA":
        raise AuditError(f"{config_path}: peft_type {config.get('peft_type')!r} is not audited (LoRA only)",
                         config_path)
    if config.get("use_dora"):
        raise AuditError(f"{config_path}: DoRA rescales the merged weight by a learned magnitude; the audit "
                         "covers plain LoRA only", config_path)
    ckpt = Checkpoint(adapter)
    weights = adapter / ADAPTER_WEIGHTS
    if not ckpt.has(ADAPTER_WEIGHTS):
        raise AuditError(f"{adapter}: no {ADAPTER_WEIGHTS} (pickled adapters are not read)", weights)
    header = ckpt.header(ADAPTER_WEIGHTS)
    if isinstance(header, HeaderError):
        raise AuditError(f"{weights}: {header}", weights)
    alpha = float(config.get("lora_alpha") or LORA_DEFAULT_ALPHA)
    rank = float(config.get("r") or LORA_DEFAULT_RANK)
    rslora = bool(config.get("use_rslora"))
    pairs: dict[str, dict[str, str]] = {}
    skipped: list[str] = []
    replaced: set[str] = set()
    out: dict[str, Update] = {}
    for key in header.tensors:
        factor = lora_factor(key)
        if factor is None:
            module = _replaced_module(key)
            if key == f"{_PEFT_PREFIX}{module}.weight":  # modules_to_save: the whole weight, saved
                out[f"{module}.weight"] = Update(index, Replacement(adapter, key), 0.0, 0.0, False)
            else:
                skipped.append(f"{adapter.name}: {key} (neither a LoRA factor nor a whole weight to save)")
                replaced.add(module)
            continue
        module, kind = factor
        pairs.setdefault(module, {})[kind] = key
    for module, kinds in sorted(pairs.items()):
        embedding = "lora_embedding_A" in kinds
        a_key = kinds.get("lora_embedding_A" if embedding else "lora_A")
        b_key = kinds.get("lora_embedding_B" if embedding else "lora_B")
        if a_key is None or b_key is None:
            raise AuditError(f"{weights}: {module} has only one of its two LoRA factors", weights)
        a = read_whole(ckpt, ADAPTER_WEIGHTS, a_key).astype(np.float64)
        b = read_whole(ckpt, ADAPTER_WEIGHTS, b_key).astype(np.float64)
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise AuditError(f"{weights}: {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not share "
                             "a rank (A is r x in, B is out x r)", weights)
        name = module.removeprefix(_PEFT_PREFIX)
        r = _pattern_value(config.get("rank_pattern"), name, rank)
        module_alpha = _pattern_value(config.get("alpha_pattern"), name, alpha)
        scale = module_alpha / (math.sqrt(r) if rslora else r)
        if embedding or config.get("fan_in_fan_out"):
            # Embedding deltas (and GPT-2 Conv1D weights) are stored transposed: (B @ A).T
            factors = Factors(a.T * scale, b.T)
        else:
            factors = Factors(b * scale, a)
        out[f"{name}.weight"] = Update(index, factors, r, module_alpha, rslora)
    return out, skipped, replaced


def chain_updates(adapters: Sequence[Path]) -> tuple[dict[str, list[Update]], list[str], set[str]]:
    """Every adapter's update per tensor, in chain order; the notes and replaced modules of all."""
    updates: dict[str, list[Update]] = {}
    notes: list[str] = []
    replaced: set[str] = set()
    seen: dict[Path, int] = {}
    for index, adapter in enumerate(adapters):
        first = seen.setdefault(Path(adapter).resolve(), index)
        if first != index:
            raise AuditError(f"--llm-adapter {adapter} is given twice (adapters {first + 1} and {index + 1}): if it "
                             "was merged twice, that is the mistake to find; give each adapter once",
                             Path(adapter) / ADAPTER_CONFIG)
        found, skipped, replaces = adapter_updates(adapter, index)
        notes += skipped
        replaced |= replaces
        for name, update in found.items():
            updates.setdefault(name, []).append(update)
    return updates, notes, replaced


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
