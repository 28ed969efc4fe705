"""What a merge did to each weight, named from the arithmetic of its change.

For a weight the adapters update, with the observed change D = W_candidate - W_base and the
adapters' exact update U = U_1 + ... + U_m (adapter i's U_i in float64), the streamed figures
(:mod:`.merge_diagnosis`) are |D|^2, |D - U|^2, the Gram matrix G_ij = <U_i, U_j>, the
projections b_i = <D, U_i>, the projection on the transpose <D, U^T> (square weights) and, per
storage dtype c, the rounding floor |round_c(W_base + U) - (W_base + U)|: what even a perfect
merge saved in c loses.  Each explanation is a least-squares fit, and it holds when its
residual is within what rounding forces:

- **exact**: D = U;
- **missing**: D = 0 (no change where the update is not zero);
- **scaled**: D = sum_i k_i U_i with some k_i != 1, each k_i printed and named when it is a
  known mistake (2: merged twice; sqrt(r) or 1/sqrt(r): rsLoRA's alpha/sqrt(r) confused with
  alpha/r; r/alpha: the scale never applied; 0: that adapter never merged here);
- **transposed**: D = k U^T (square weights only);
- **rounded**: D = U within the rounding of a coarser float (bfloat16, float16) than the one
  the candidate is stored in: the merge ran in that dtype; the share it lost is printed;
- **foreign**: none of these: a change unrelated to the update (a quantization-rounded base,
  another adapter, another base), with its correlation to the update;
- **overflow**: the weight holds Inf/NaN.

"Within rounding" is slack x the floor, with slack = rounding_slack(m), in the coarser of the
candidate's and the base's dtypes (a merge at the base's own precision is no fault), grown with
the values for a large factor: the same rule for every explanation, so a class is never a
tuned cut.  Where the whole update is smaller than that rounding, D = U and D = 0 both fit value
by value; then the share of the update the candidate keeps (its least-squares factor over all
values) is set against the share a perfect merge keeps: none, where a perfect merge keeps some,
is missing.  (A share lost under --llm-audit-max-error makes a rounded weight a warning, not an
error: what a float16 or TF32 product costs a large update is real but small.)  Tensors the
adapters do not touch are judged from the weight scan's norms: **changed** when |D| exceeds
what rounding the base to the candidate's dtype could make, **rounded** when it stays within a
16-bit rounding the candidate's dtype does not force.

Pure: numbers in, verdicts and sentences out; numpy only for the small least-squares solve.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .merge_audit import DTYPE_NAMES, MANTISSA_BITS, coarser_of

ADAPTED_CLASSES = ("overflow", "missing", "scaled", "transposed", "rounded", "foreign", "exact")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")
# A block of GRID_BLOCK consecutive values that sits on at most GRID_MAX_LEVELS levels lies on
# a quantization grid: real weights hold ~64 levels per 64 values, a 4-bit grid at most 16.
GRID_BLOCK = 64
GRID_MAX_LEVELS = 16
# Standard errors a least-squares factor must lie from 0 to count as a share of the update kept.
SIGNIFICANCE = 5.0


@dataclass(frozen=True)
class ScaleOf:
    """What an adapter's scale was made of, to name a wrong factor."""

    rank: float
    alpha: float
    rslora: bool


@dataclass(frozen=True)
class ModuleFigures:
    """The streamed sums of one adapted weight (see the module docstring)."""

    tensor: str
    dtype: str  # the candidate's storage dtype
    update_sq: float  # |U|^2
    change_sq: float  # |D|^2
    error_sq: float  # |D - U|^2
    gram: tuple[tuple[float, ...], ...]  # <U_i, U_j>
    along: tuple[float, ...]  # <D, U_i>
    along_transposed: float | None  # <D, U^T>; None unless square
    floors: dict[str, float]  # dtype -> |round_dtype(W_base + U) - (W_base + U)|
    adapters: tuple[int, ...]  # the chain places of the adapters updating it
    scales: tuple[ScaleOf, ...]
    base_dtype: str = "F32"  # the base's storage dtype
    values: int = 0  # how many values the sums run over
    base_sq: float = 0.0  # |W_base|^2
    base_along: tuple[float, ...] = ()  # <W_base, U_i>
    # What a perfect merge rounded to the coarser of the two dtypes keeps, on a sample of the
    # values: (<D_perfect, U>, |D_perfect|^2, |U|^2, sampled values), each sum scaled to the whole.
    perfect: tuple[float, float, float, int] = (0.0, 0.0, 0.0, 0)
    transposed_sq: float | None = None  # |U^T|^2 over the rows summed (|U|^2 when all are)
    nonfinite: int = 0
    vanished: float = 0.0  # share of the updated entries still holding the base's value


@dataclass(frozen=True)
class ModuleVerdict:
    tensor: str
    verdict: str  # one of ADAPTED_CLASSES
    dtype: str  # the candidate's storage dtype
    precision: str  # the dtype whose rounding the explanation fits within (coarser than dtype: rounded)
    error: float  # |D - U| / |U|: the share of the update lost or wrong
    floor: float  # |round_dtype(W_base + U) - (W_base + U)| / |U|: what the dtype forces
    factors: tuple[float, ...]  # least-squares k_i per adapter updating it
    adapters: tuple[int, ...]
    scale: float  # one least-squares k for the whole update
    transposed_scale: float | None
    correlation: float  # <D, U> / (|D| |U|)
    change: float  # |D| / |U|
    nonfinite: int
    vanished: float
    resolved: bool = True  # the update exceeds what rounding to the candidate's dtype may hide
    hints: tuple[str, ...] = ()  # what a factor k_i means, when it is a known mistake
    grid: float | None = None  # median levels per GRID_BLOCK values of W_candidate - U (foreign only)

    def as_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "part": "adapted", "verdict": self.verdict, "dtype": self.dtype,
                "precision": self.precision,
                "error": self.error, "floor": self.floor, "factors": list(self.factors),
                "adapters": [a + 1 for a in self.adapters], "scale": self.scale,
                "transposed_scale": self.transposed_scale, "correlation": self.correlation, "change": self.change,
                "nonfinite": self.nonfinite, "vanished": self.vanished, "resolved": self.resolved,
                "hints": list(self.hints), "grid": self.grid}


@dataclass(frozen=True)
class UntouchedVerdict:
    """A tensor no adapter updates that changed anyway."""

    tensor: str
    verdict: str  # changed | rounded
    dtype: str
    change: float  # |D| / |W_base|
    tolerance: float  # what rounding to the candidate's dtype may change, same unit
    grid: float | None = None  # median levels per GRID_BLOCK values of W_candidate

    def as_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "part": "untouched", "verdict": self.verdict, "dtype": self.dtype,
                "change": self.change,
                "tolerance": self.tolerance, "grid": self.grid}


# --- one adapted weight -----------------------------------------------------------------------

def coarser_dtypes(dtype: str) -> list[str]:
    """The 16-bit floats coarser than `dtype`, finest first: where a merge that rounded ran."""
    bits = MANTISSA_BITS.get(dtype, 24)
    return [c for c in ("F16", "BF16") if MANTISSA_BITS[c] < bits]


def _least_squares(gram: Sequence[Sequence[float]], along: Sequence[float]) -> tuple[float, ...]:
    import numpy as np

    matrix = np.array(gram, dtype=np.float64)
    solution, *_ = np.linalg.lstsq(matrix, np.array(along, dtype=np.float64), rcond=None)
    return tuple(float(k) for k in solution)


def scale_hints(k: float, scale: ScaleOf) -> list[str]:
    """The known mistakes a least-squares factor k on an adapter's update stands for."""
    r, alpha = scale.rank, scale.alpha
    known: list[tuple[float, str]] = [
        (0.0, "never merged"), (2.0, "merged twice"), (-1.0, "subtracted instead of added"),
        (0.5, "half the update")]
    if r > 1:
        if scale.rslora:
            known.append((1 / math.sqrt(r), "rsLoRA's alpha/sqrt(r) taken as alpha/r"))
        else:
            known.append((math.sqrt(r), "scaled alpha/sqrt(r) (rsLoRA) where the adapter uses alpha/r"))
    applied = alpha / (math.sqrt(r) if scale.rslora else r) if r > 0 else 0.0
    if applied not in (0.0, 1.0):
        known.append((1 / applied, f"the LoRA scale {applied:.3g} never applied"))
        known.append((applied, f"the LoRA scale {applied:.3g} applied twice"))
    return [name for value, name in known
            if (abs(k) < 0.005 if value == 0 else abs(k - value) <= 0.03 * abs(value))]


def _significant(along: float, along_sq: float, update_sq: float, count: int) -> tuple[float, bool]:
    """(k, k clearly not 0): the least-squares factor of the update in a change, and whether it
    lies more than SIGNIFICANCE standard errors from 0 (the residual taken as the noise)."""
    if update_sq <= 0 or count < 2:
        return 0.0, False
    k = along / update_sq
    error = math.sqrt(max(along_sq - k * along, 0.0) / (count - 1) / update_sq)
    return k, abs(k) > SIGNIFICANCE * error


def classify(fig: ModuleFigures, *, slack: float) -> ModuleVerdict:
    """The explanation of one adapted weight's change that fits within rounding (module docstring)."""
    import numpy as np

    norm = math.sqrt(fig.update_sq)
    total_along = sum(fig.along)
    factors = _least_squares(fig.gram, fig.along) if norm else tuple(0.0 for _ in fig.adapters)
    t_sq = fig.update_sq if fig.transposed_sq is None else fig.transposed_sq
    transposed_scale = fig.along_transposed / t_sq if fig.along_transposed is not None and t_sq else None
    # A merge at the base's own precision is no fault: the coarser of the base's and the
    # candidate's dtypes is the rounding every explanation may cost.
    own = coarser_of(fig.dtype, fig.base_dtype)
    own_reach = max(fig.floors.get(fig.dtype, 0.0), fig.floors.get(own, 0.0), fig.floors.get("F32", 0.0))
    resolved = fig.update_sq > (slack * own_reach) ** 2

    def verdict(name: str, precision: str, hints: Sequence[str] = ()) -> ModuleVerdict:
        return ModuleVerdict(
            tensor=fig.tensor, verdict=name, dtype=fig.dtype, precision=precision,
            error=math.inf if fig.nonfinite else math.sqrt(fig.error_sq) / norm if norm else 0.0,
            floor=fig.floors.get(fig.dtype, 0.0) / norm if norm else 0.0, factors=factors, adapters=fig.adapters,
            scale=total_along / fig.update_sq if norm else math.nan, transposed_scale=transposed_scale,
            correlation=total_along / math.sqrt(fig.change_sq * fig.update_sq) if fig.change_sq and norm else 0.0,
            change=math.sqrt(fig.change_sq) / norm if norm else math.inf, nonfinite=fig.nonfinite,
            vanished=fig.vanished, resolved=resolved, hints=tuple(hints))

    if fig.nonfinite:
        return verdict("overflow", fig.dtype)
    # Residuals of the least-squares fits; |D|^2 - b.k loses nothing that matters in float64
    # (its rounding is 1e-16 of |D|^2, the residuals judged are 1e-14 of it and more).
    scaled_sq = max(fig.change_sq - sum(k * b for k, b in zip(factors, fig.along)), 0.0)
    transposed_sq = math.inf
    if fig.along_transposed is not None and t_sq:
        transposed_sq = max(fig.change_sq - fig.along_transposed ** 2 / t_sq, 0.0)
    # Rounding grows with the values rounded: W + sum k_i U_i against W + U.
    gram = np.array(fig.gram, dtype=np.float64)
    ks = np.array(factors, dtype=np.float64)
    along_base = np.array(fig.base_along or [0.0] * len(factors), dtype=np.float64)
    scaled_size = fig.base_sq + 2 * float(ks @ along_base) + float(ks @ gram @ ks)
    merged_size = fig.base_sq + 2 * float(along_base.sum()) + fig.update_sq
    growth = math.sqrt(max(1.0, scaled_size / merged_size)) if merged_size > 0 else 1.0
    for precision in [own, *coarser_dtypes(own)]:
        reach = max(fig.floors.get(precision, 0.0), own_reach)
        if not math.isfinite(reach):
            continue  # the update overflows that dtype: no merge there stayed finite
        tolerance_sq = (slack * reach) ** 2
        if fig.error_sq <= tolerance_sq:
            if precision == own and fig.change_sq <= tolerance_sq and _unmerged(fig):
                return verdict("missing", precision)
            return verdict("exact" if precision == own else "rounded", precision)
        if fig.change_sq <= tolerance_sq:
            return verdict("missing", precision)
        if scaled_sq <= tolerance_sq * growth ** 2:
            hints = []
            for k, adapter, scale in zip(factors, fig.adapters, fig.scales):
                named = scale_hints(k, scale) if abs(k - 1) > 0.03 else []
                if named:
                    hints.append((f"adapter {adapter + 1}: " if len(fig.adapters) > 1 else "") + " or ".join(named))
            return verdict("scaled", precision, hints)
        if transposed_sq <= tolerance_sq:
            return verdict("transposed", precision)
    return verdict("foreign", fig.dtype)


def _unmerged(fig: ModuleFigures) -> bool:
    """An update smaller than rounding, so D = U and D = 0 both fit value by value: still, a
    perfect merge keeps a share of it (values near a rounding boundary move), which a factor far
    from 0 shows over many values.  Unmerged: that share is clearly not 0, the candidate's is."""
    kept, kept_sq, sampled_sq, count = fig.perfect
    k_perfect, perfect_kept = _significant(kept, kept_sq, sampled_sq, count)
    _, candidate_kept = _significant(sum(fig.along), fig.change_sq, fig.update_sq, fig.values)
    return perfect_kept and k_perfect > 0.02 and not candidate_kept


# --- a tensor no adapter touches --------------------------------------------------------------

def rounding_noise(norm: float, dtype: str) -> float:
    """An upper bound on |round_dtype(W) - W| for a tensor of norm |W|: each value moves at
    most half a unit in its last place, 2^(1-p) |x| / 2, uniformly, so by sqrt(1/12) of the
    unit in the root mean square (p: the dtype's significant bits)."""
    return norm * 2.0 ** (1 - MANTISSA_BITS.get(dtype, 24)) / math.sqrt(12)


def untouched_verdict(tensor: str, dtype: str, base_sq: float, change_sq: float, *,
                      slack: float) -> UntouchedVerdict | None:
    """None when the tensor kept the base's values up to its dtype's rounding; else changed, or
    rounded (within a 16-bit float's rounding the candidate's own dtype does not force)."""
    base_norm = math.sqrt(base_sq)
    change = math.sqrt(change_sq)
    if not math.isfinite(change):
        return None  # non-finite values are weights::finite's
    tolerance = slack * rounding_noise(base_norm, dtype)
    if change <= tolerance:
        return None
    relative = change / base_norm if base_norm else math.inf
    for coarse in coarser_dtypes(dtype):
        if change <= slack * rounding_noise(base_norm, coarse):
            return UntouchedVerdict(tensor, "rounded", dtype, relative, tolerance / base_norm if base_norm else 0.0)
    return UntouchedVerdict(tensor, "changed", dtype, relative, tolerance / base_norm if base_norm else 0.0)


# --- the whole merge, in words --------------------------------------------------------------

@dataclass
class Diagnosis:
    modules: list[ModuleVerdict] = field(default_factory=list)
    untouched: list[UntouchedVerdict] = field(default_factory=list)
    not_audited: list[str] = field(default_factory=list)  # what was left out, and why
    unreadable: list[str] = field(default_factory=list)  # adapted weights the candidate lacks or cannot give
    untouched_compared: int = 0  # tensors no adapter updates that were compared with the base
    identical_to_base: bool = False  # every compared tensor is bit-identical to the base's
    seconds: float = 0.0

    def of(self, verdict: str) -> list[ModuleVerdict]:
        return [m for m in self.modules if m.verdict == verdict]

    def table(self) -> list[dict[str, Any]]:
        return [m.as_dict() for m in self.modules] + [u.as_dict() for u in self.untouched]

    def summary(self) -> str:
        """One sentence: "12 of 120 adapted modules missing: every k_proj and o_proj; the rest exact"."""
        return summarize(self)


def module_kind(tensor: str) -> str:
    """self_attn.k_proj of model.layers.3.self_attn.k_proj.weight: what the summary groups by
    (the path inside a layer; the name itself outside the layers)."""
    inside = _LAYER_INDEX.split(tensor.removesuffix(".weight"))
    return inside[-1] if len(inside) > 1 else tensor.removesuffix(".weight")


def _short_kinds(kinds: Sequence[str]) -> dict[str, str]:
    """k_proj for self_attn.k_proj, unless another kind ends the same (attn.c_proj, mlp.c_proj)."""
    last = [kind.rsplit(".", 1)[-1] for kind in kinds]
    return {kind: short if last.count(short) == 1 else kind for kind, short in zip(kinds, last)}


def _layer(tensor: str) -> str | None:
    found = _LAYER_INDEX.findall(tensor)
    return found[-1] if found else None


def _and(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def where(chosen: Sequence[str], among: Sequence[str]) -> str:
    """"every k_proj and o_proj", or "k_proj in layers 3, 7 (2 of 30)": where `chosen` lies among
    the tensors `among`, by module kind."""
    kinds: dict[str, list[str]] = {}
    for tensor in chosen:
        kinds.setdefault(module_kind(tensor), []).append(tensor)
    total = {kind: sum(1 for t in among if module_kind(t) == kind) for kind in kinds}
    short = _short_kinds(list(dict.fromkeys(module_kind(t) for t in among)))
    every = [kind for kind, tensors in kinds.items() if len(tensors) == total[kind]]
    parts = ["every " + _and([short[kind] for kind in every])] if every else []
    for kind, tensors in kinds.items():
        if kind not in every:
            layers = [layer for layer in (_layer(t) for t in tensors) if layer is not None]
            at = f" in layers {', '.join(layers[:6])}{' ...' if len(layers) > 6 else ''}" if layers else ""
            parts.append(f"{short[kind]}{at} ({len(tensors)} of {total[kind]})")
    return "; ".join(parts)


def _span(values: Sequence[float], fmt: str = "{:.3g}", decimals: int | None = 3) -> str:
    """"2", or "1.41 to 2": the range of `values`, to three significant digits (and, for factors,
    three decimals: a factor of 1e-9 is a zero that rounding left)."""
    finite = [v if decimals is None else round(v, decimals) + 0.0 for v in values if math.isfinite(v)]
    if not finite:
        return "n/a"
    low, high = min(finite), max(finite)
    return fmt.format(low) if fmt.format(low) == fmt.format(high) else f"{fmt.format(low)} to {fmt.format(high)}"


def _pct(values: Sequence[float]) -> str:
    return _span([100 * v for v in values], decimals=None) + " %"


def _scaled_detail(modules: Sequence[ModuleVerdict]) -> str:
    adapters = sorted({a for m in modules for a in m.adapters})
    if len(adapters) == 1:
        head = f"by k = {_span([m.factors[0] for m in modules])}"
    else:
        per = []
        for a in adapters:
            ks = [m.factors[m.adapters.index(a)] for m in modules if a in m.adapters]
            per.append(f"adapter {a + 1} x {_span(ks)}")
        head = "per adapter: " + ", ".join(per)
    hints = sorted({h for m in modules for h in m.hints})
    return head + (f" ({'; '.join(hints)})" if hints else "")


def class_part(diagnosis: Diagnosis, verdict: str) -> str:
    """The summary's part on one verdict: how many, which, with the figures that name the mistake."""
    modules = diagnosis.of(verdict)
    count = f"{len(modules)} of {len(diagnosis.modules)} adapted modules {verdict}"
    placed = where([m.tensor for m in modules], [m.tensor for m in diagnosis.modules])
    if verdict == "missing":
        detail = "no change beyond rounding where the update is not zero"
    elif verdict == "scaled":
        detail = _scaled_detail(modules)
    elif verdict == "transposed":
        detail = f"W + k U^T with k = {_span([m.transposed_scale or math.nan for m in modules])}: the update merged " \
                 "the wrong way round"
    elif verdict == "rounded":
        coarse = sorted({DTYPE_NAMES.get(m.precision, m.precision) for m in modules})
        detail = (f"lost {_pct([m.error for m in modules])} of the update where {_dtypes(modules)} storage forces "
                  f"{_pct([m.floor for m in modules])}: the merge ran in {' or '.join(coarse)}, or into a base "
                  "rounded to it")
    elif verdict == "overflow":
        detail = f"{sum(m.nonfinite for m in modules)} values Inf/NaN: the merge overflowed its dtype's range"
    else:  # foreign
        detail = (f"correlation {_span([m.correlation for m in modules], '{:.2f}')} with the update, change "
                  f"{_span([m.change for m in modules])} x its size: a change the update does not explain")
        grids = [m.grid for m in modules if m.grid is not None]
        if grids and sorted(grids)[len(grids) // 2] <= GRID_MAX_LEVELS:
            detail += (f"; W_merged - U sits on a median {sorted(grids)[len(grids) // 2]:.0f} levels per "
                       f"{GRID_BLOCK} values (real weights: ~{GRID_BLOCK}): the update was merged into a "
                       "quantization-rounded base")
        else:
            detail += " (another adapter, another base, or a base rounded before the merge)"
    return f"{count} ({detail}): {placed}"


def _dtypes(modules: Sequence[ModuleVerdict]) -> str:
    return "/".join(sorted({DTYPE_NAMES.get(m.dtype, m.dtype) for m in modules}))


def _unresolved(modules: Sequence[ModuleVerdict]) -> str:
    hidden = [m for m in modules if not m.resolved]
    if not hidden:
        return ""
    return (f"; in {len(hidden)} of them the update is below {_dtypes(hidden)} rounding, judged by the share of it "
            "they keep")


def summarize(diagnosis: Diagnosis) -> str:
    if not diagnosis.modules:
        return "no adapted module could be diagnosed"
    if diagnosis.identical_to_base and all(m.verdict == "missing" for m in diagnosis.modules):
        return (f"nothing was merged: all {len(diagnosis.modules)} adapted modules hold the base's weights, and every "
                "tensor is bit-identical to the base (the base saved as the merge)")
    parts = [class_part(diagnosis, verdict) for verdict in ADAPTED_CLASSES[:-1] if diagnosis.of(verdict)]
    exact = diagnosis.of("exact")
    if not parts:
        parts.append(f"all {len(exact)} adapted modules exact (within {_dtypes(exact)} rounding{_unresolved(exact)})")
    elif exact:
        parts.append(f"the other {len(exact)} exact" + (f" ({_unresolved(exact)[2:]})" if _unresolved(exact) else ""))
    changed = [u for u in diagnosis.untouched if u.verdict == "changed"]
    if changed:
        grid = [u.grid for u in changed if u.grid is not None]
        on_grid = grid and sorted(grid)[len(grid) // 2] <= GRID_MAX_LEVELS
        parts.append(f"{len(changed)} of {diagnosis.untouched_compared} tensors no adapter updates changed (by "
                     f"{_span([u.change for u in changed], decimals=None)} of their norm"
                     + ("; they lie on a quantization grid: the base was quantized" if on_grid else "") + "): "
                     + _and(sorted(set(_short_kinds(list(dict.fromkeys(module_kind(u.tensor) for u in changed)))
                                       .values()))))
    return "; ".join(parts)
