"""The `audit::` check: the merge diagnosis (:func:`pytest_llmmerge.merge_diagnosis.diagnose`) of
the candidate against the base and the adapters merged into it, one finding per kind of fault.
"""

from __future__ import annotations

from typing import Any

from ..file_names import ADAPTER_CONFIG
from ..merge_audit import DTYPE_NAMES, AuditError
from ..merge_diagnosis import diagnose
from ..merge_verdicts import Diagnosis, ModuleVerdict, class_part
from .base import CheckSkipped, Context, Finding, shard_of
from .tensors import shared_scan

_DIAGNOSIS_KEY = "audit.diagnosis"

# verdict -> (code, what to do about it)
_FIXES = {
    "overflow": ("MRG010", "merge in float32 (or bfloat16, whose range is float32's), never float16"),
    "missing": ("MRG007", "the merge skipped these modules: check how the script matches module names "
                          "(a suffix strip like rstrip('.weight') eats names) and that every target was merged"),
    "scaled": ("MRG005", "apply each adapter once with its own scale: alpha/r, or alpha/sqrt(r) when "
                         "adapter_config.json sets use_rslora"),
    "transposed": ("MRG006", "the update was merged transposed: fan_in_fan_out must match the layer "
                             "(true only for Conv1D weights stored (in, out))"),
    "rounded": ("MRG001", "lost more than --llm-audit-max-error of the update: merge in float32 (load the base in "
                          "float32, merge_and_unload, then cast), e.g. "
                          "--llm-merge-dtype float32 for merges this plugin builds"),
    "foreign": ("MRG008", "the change is not the adapters' update: merge into the unquantized base "
                          "(dequantizing a 4-bit base first bakes its rounding in), and check that --llm-base and "
                          "--llm-adapter are the ones merged"),
}


def diagnosis_of(ctx: Context) -> Diagnosis:
    """The diagnosis of ctx.model against ctx.base and ctx.adapters, made once per Context."""
    base = ctx.require_base()
    if not ctx.adapters:
        raise CheckSkipped("needs the --llm-adapter(s) that were merged")
    found = ctx.memo.get(_DIAGNOSIS_KEY)
    if found is None:
        try:
            scan = shared_scan(ctx)
        except CheckSkipped:
            scan = None  # no readable weights: the modules' own verdicts still say what they can
        found = ctx.memo[_DIAGNOSIS_KEY] = diagnose(ctx.model, base, ctx.adapters, scan=scan, progress=ctx.progress)
    assert isinstance(found, Diagnosis)
    return found


def check_merge_diagnosis(ctx: Context) -> list[Finding]:
    try:
        diagnosis = diagnosis_of(ctx)
    except AuditError as exc:
        return [Finding("MRG002", "error", f"{exc}", exc.file)]
    findings = []
    where = str(ctx.adapters[0] / ADAPTER_CONFIG)
    if diagnosis.unreadable:
        # A weight the adapters update that the candidate lacks is a merge that lost it, not a pass.
        findings.append(Finding("MRG002", "error", f"{len(diagnosis.unreadable)} weight(s) the adapters update "
                                "cannot be read from the candidate: " + "; ".join(diagnosis.unreadable[:5]),
                                (ctx.model.loaded_weight_files() or [ADAPTER_CONFIG])[0]))
    if not diagnosis.modules:
        if findings:
            return findings
        raise CheckSkipped("no weight could be diagnosed: " + "; ".join(diagnosis.not_audited[:3]))
    if diagnosis.not_audited:
        findings.append(Finding("MRG003", "warning", f"{len(diagnosis.not_audited)} part(s) not diagnosed: "
                                + "; ".join(diagnosis.not_audited[:5]), where))
    for verdict, (code, fix) in _FIXES.items():
        modules = diagnosis.of(verdict)
        if verdict == "rounded":
            # A share lost under the limit is real but small (a float16 or TF32 product of a large update).
            small = [m for m in modules if m.error <= ctx.audit_max_error]
            modules = [m for m in modules if m not in small]
            if small:
                findings.append(Finding(
                    "MRG012", "warning", f"{len(small)} adapted weight(s) rounded, each losing no more than "
                    f"--llm-audit-max-error={ctx.audit_max_error:g} of its update: {class_part(diagnosis, verdict)}. "
                    f"{_worst(small)}", shard_of(ctx.model, small[0].tensor)))
        if modules:
            findings.append(Finding(code, "error", f"{class_part(diagnosis, verdict)}. {_worst(modules)}. Fix: {fix}",
                                    shard_of(ctx.model, modules[0].tensor)))
    changed = [u for u in diagnosis.untouched if u.verdict == "changed"]
    if changed:
        changed.sort(key=lambda u: -u.change)
        findings.append(Finding(
            "MRG009", "error", f"{len(changed)} tensor(s) no adapter updates changed beyond rounding, e.g. "
            + ", ".join(f"{u.tensor} by {u.change:.3g} of its norm" for u in changed[:3])
            + ". Fix: merge only the adapters' modules into the unmodified base",
            shard_of(ctx.model, changed[0].tensor)))
    rounded = [u for u in diagnosis.untouched if u.verdict == "rounded"]
    if rounded:
        findings.append(Finding(
            "MRG011", "warning", f"{len(rounded)} tensor(s) no adapter updates were rounded through a 16-bit float "
            f"their {DTYPE_NAMES.get(rounded[0].dtype, rounded[0].dtype)} storage does not force, e.g. "
            f"{rounded[0].tensor} (changed by {rounded[0].change:.3g} of its norm)",
            shard_of(ctx.model, rounded[0].tensor)))
    storage_bound = sorted((m for m in diagnosis.of("exact") if m.floor > ctx.audit_max_error),
                           key=lambda m: -m.floor)
    if storage_bound:
        dtype = DTYPE_NAMES.get(storage_bound[0].dtype, storage_bound[0].dtype)
        findings.append(Finding(
            "MRG004", "warning",
            f"{len(storage_bound)} of {len(diagnosis.modules)} adapted weights are stored in {dtype}, which cannot "
            f"hold their update exactly: a perfect merge saved in {dtype} loses up to {_pct(storage_bound[0].floor)} "
            f"of it ({storage_bound[0].tensor}), and this merge loses no more than that. Not a merge error; save in "
            "float32 or serve the adapter unmerged if parity shows the difference",
            shard_of(ctx.model, storage_bound[0].tensor)))
    return findings


def _pct(value: float) -> str:
    return f"{100 * value:.3g} %"


def _worst(modules: list[ModuleVerdict]) -> str:
    """The figures of the weight that lost most of its update."""
    worst = max(modules, key=lambda m: m.error)
    return (f"Worst: {worst.tensor}, changed by {worst.change:.3g} x the "
            f"update, least-squares factor per adapter {', '.join(f'{k:.3g}' for k in worst.factors)}, correlation "
            f"{worst.correlation:.3f}, lost {_pct(worst.error)} of the update where "
            f"{DTYPE_NAMES.get(worst.dtype, worst.dtype)} storage forces {_pct(worst.floor)}")


def made_diagnosis(ctx: Context) -> Diagnosis | None:
    """The diagnosis of this Context when the audit item already made it (None: not yet)."""
    found = ctx.memo.get(_DIAGNOSIS_KEY)
    return found if isinstance(found, Diagnosis) else None


def diagnosis_summary(ctx: Context) -> str | None:
    """The one-sentence verdict, when this Context's diagnosis ran."""
    found = ctx.memo.get(_DIAGNOSIS_KEY)
    return found.summary() if isinstance(found, Diagnosis) and found.modules else None


def diagnosis_figures(ctx: Context) -> list[tuple[str, Any]]:
    """The verdict and the per-weight table, when this Context's diagnosis ran."""
    found = ctx.memo.get(_DIAGNOSIS_KEY)
    if not isinstance(found, Diagnosis):
        return []
    return [("merge_diagnosis", found.summary()), ("merge_diagnosis_modules", found.table()),
            ("merge_diagnosis_seconds", round(found.seconds, 3))]
