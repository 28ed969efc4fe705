"""The `audit::` check: judges the merge-precision audit (:func:`pytest_llmmerge.merge_audit.audit`)
of the candidate against the base and the adapters merged into it.
"""

from __future__ import annotations

from typing import Any

from ..file_names import ADAPTER_CONFIG
from ..merge_audit import AuditError, audit, rounding_slack
from .base import CheckSkipped, Context, Finding, shard_of

_LAYERS_KEY = "audit.layers"

_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _pct(value: float) -> str:
    return f"{100 * value:.3g} %"


def check_merge_precision(ctx: Context) -> list[Finding]:
    base = ctx.require_base()
    if not ctx.adapters:
        raise CheckSkipped("needs the --llm-adapter(s) that were merged")
    try:
        result = audit(ctx.model, base, ctx.adapters, progress=ctx.progress)
    except AuditError as exc:
        return [Finding("MRG002", "error", f"{exc}", ADAPTER_CONFIG)]
    ctx.memo[_LAYERS_KEY] = {layer.tensor: layer.as_dict() for layer in result.layers}
    findings = []
    if result.not_audited:
        findings.append(Finding("MRG003", "warning", f"{len(result.not_audited)} part(s) not audited: "
                                + "; ".join(result.not_audited[:5]), ADAPTER_CONFIG))
    if not result.layers:
        raise CheckSkipped("no tensor could be audited: " + "; ".join(result.not_audited[:3]))
    worst = sorted(result.layers, key=lambda layer: -layer.error)
    slack = rounding_slack(len(ctx.adapters))
    over = [layer for layer in worst if layer.over(ctx.audit_max_error, slack)]
    if over:
        shown = "; ".join(f"{layer.tensor} lost {_pct(layer.error)} of its update ({_pct(layer.vanished)} of the "
                          f"updated entries still hold the base's value; {_DTYPE_NAMES.get(layer.dtype, layer.dtype)} "
                          f"storage alone loses {_pct(layer.floor)})" for layer in over[:5])
        findings.append(Finding(
            "MRG001", "error",
            f"{len(over)} of {len(result.layers)} updated tensors lost more than --llm-audit-max-error="
            f"{ctx.audit_max_error:g} of the adapters' float32 update, beyond the {slack:.2g} storage-dtype roundings "
            f"a sound merge may cost (overall {_pct(result.overall_error())}). Worst: {shown}. Fix: the merge "
            "rounded the update: merge in float32 (load the base in float32, merge_and_unload, then cast), "
            "e.g. --llm-merge-dtype float32 for merges this plugin builds", shard_of(ctx.model, over[0].tensor)))
    storage_bound = [layer for layer in worst if layer.floor > ctx.audit_max_error and layer not in over]
    if storage_bound:
        storage_bound.sort(key=lambda layer: -layer.floor)
        dtype = _DTYPE_NAMES.get(storage_bound[0].dtype, storage_bound[0].dtype)
        findings.append(Finding(
            "MRG004", "warning",
            f"{len(storage_bound)} of {len(result.layers)} updated tensors are stored in {dtype}, which cannot hold "
            f"their update exactly: a perfect merge saved in {dtype} loses up to {_pct(storage_bound[0].floor)} of it "
            f"({storage_bound[0].tensor}), and this merge loses no more than that. Not a merge error; save in float32 "
            "or serve the adapter unmerged if parity shows the difference", shard_of(ctx.model, storage_bound[0].tensor)))
    return findings


def audit_figures(ctx: Context) -> list[tuple[str, Any]]:
    """The audit's error per tensor, when the check of this Context ran the audit."""
    layers: dict[str, dict[str, Any]] = ctx.memo.get(_LAYERS_KEY, {})
    return [(f"merge_audit_error:{tensor}", layer["error"]) for tensor, layer in layers.items()]
