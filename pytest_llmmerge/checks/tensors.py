"""The `weights::` checks, on the tensor data: non-finite values, constant tensors, the tie flag
against the tensors, and the change against the base.  All four read one scan
(:func:`pytest_llmmerge.tensor_scan.scan`), made once per Context.
"""

from __future__ import annotations

from typing import Any

from ..checkpoint import LM_HEAD_SUFFIXES, embedding_name, is_lora_key, lm_head_name
from ..file_names import CONFIG
from ..tensor_scan import WeightScan, change_table, scan
from .base import CheckSkipped, Context, Finding, shard_of

_SCAN_KEY = "weights.scan"


def shared_scan(ctx: Context) -> WeightScan:
    """The scan of ctx.model against ctx.base, made once per Context."""
    cached = ctx.memo.get(_SCAN_KEY)
    if cached is None:
        if not ctx.model.loaded_weight_files():
            raise CheckSkipped("no safetensors weights to read (see WGT001 / SAF001)")
        cached = ctx.memo[_SCAN_KEY] = scan(ctx.model, ctx.base, progress=ctx.progress)
    assert isinstance(cached, WeightScan)
    return cached


def _listed(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


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


def change_figures(ctx: Context) -> list[tuple[str, Any]]:
    """The change table per layer group, when a check of this Context scanned the weights."""
    result = ctx.memo.get(_SCAN_KEY)
    if not isinstance(result, WeightScan):
        return []
    return [(f"weight_change:{row.group}", row.relative_change) for row in change_table(result)]
