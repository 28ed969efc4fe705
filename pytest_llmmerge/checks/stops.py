"""`integrity::stop_sets`: every serving path stops at the chat template's end-of-turn token.

The stop ids of HF generate, vLLM offline (with `--llm-vllm-arg`'s flags) and vLLM served with
the deployment's flags (`--llm-serve-arg`) are resolved from the files
(:mod:`pytest_llmmerge.stop_sets`), no model loaded, and tabled for the reports.  A gap of the
checkpoint's own files is reported once, by GEN004/GEN005; GEN008 is what the deployment's
flags change: a `--generation-config` folder, tokenizer or chat template that loses the
end-of-turn id, or an `--override-generation-config` that cannot restore it.
"""

from __future__ import annotations

from typing import Any

from ..checkpoint import Checkpoint
from ..file_names import GENERATION_CONFIG
from ..stop_sets import OFFLINE_PATH, SERVED_PATH, StopPath, VllmStopFlags, end_of_turn_of, resolve
from .base import Context, Finding, Severity
from .files import eos_fix, ids_label, token_label

_MEMO = "stop_sets"


def _paths(ctx: Context, ckpt: Checkpoint) -> list[StopPath]:
    return resolve(ckpt, offline=ctx.offline_stop_flags, served=ctx.served_stop_flags)


def check_stop_sets(ctx: Context) -> list[Finding]:
    paths = _paths(ctx, ctx.model)
    ctx.memo[_MEMO] = paths
    base_paths = {p.name: p for p in _paths(ctx, ctx.base)} if ctx.base is not None else {}
    findings = []
    for path in paths:
        # The checkpoint's own gaps (a path with vLLM's default flags stops at a superset of
        # HF's ids) are GEN004/GEN005's: one broken file, one failing check.  This check
        # reports what the deployment's flags change.
        if path.stops_at_end_of_turn is not False or _flags_of(ctx, path) in (None, VllmStopFlags()):
            continue
        assert path.end_of_turn_id is not None
        stops = "no id at all" if path.ids is None else ids_label(ctx.model, path.ids)
        findings.append(Finding(
            "GEN008", _severity(path, base_paths.get(path.name)),
            f"{path.name} stops at {stops} (from {path.source}), not at the chat template's end-of-turn "
            f"{token_label(ctx.model, path.end_of_turn_id)}: chat answers run to max_tokens there. {_fix(ctx, path)}",
            GENERATION_CONFIG))
    return findings


def _severity(path: StopPath, base: StopPath | None) -> Severity:
    """The base failing the same way on the same path: inherited, not caused by the merge."""
    if base is not None and base.end_of_turn == path.end_of_turn and base.stops_at_end_of_turn is False:
        return "warning"
    return "error"


def _flags_of(ctx: Context, path: StopPath) -> VllmStopFlags | None:
    """The deployment flags a path runs with; None for HF generate, which takes none."""
    return {OFFLINE_PATH: ctx.offline_stop_flags, SERVED_PATH: ctx.served_stop_flags}.get(path.name)


def _fix(ctx: Context, path: StopPath) -> str:
    token_id = path.end_of_turn_id
    assert token_id is not None
    flags = _flags_of(ctx, path)
    assert flags is not None
    notes = []
    own = end_of_turn_of(ctx.model)
    if flags.chat_template is not None and path.end_of_turn != own:
        notes.append(f"the --chat-template deployed ends assistant turns with {path.end_of_turn}, the checkpoint's "
                     f"own template with {own}: deploy the checkpoint's template, or make {token_id} an eos id")
    if path.ignored_override:
        notes.append(f"--override-generation-config asks for eos_token_id {list(path.ignored_override)}, but vLLM "
                     "applies no eos id from it (vLLM #45591): it cannot restore a stop token")
    if flags.generation_config not in ("auto", "vllm"):
        notes.append(f"Fix: add {token_id} to eos_token_id in {flags.generation_config}/{GENERATION_CONFIG} "
                     "(the directory --generation-config names), or deploy without that flag if the "
                     "checkpoint's own file lists it")
    else:
        notes.append(eos_fix(ctx.model, token_id) + ", or deploy with --generation-config DIR naming a "
                     f"directory whose {GENERATION_CONFIG} lists it")
    return "; ".join(notes)


def stop_set_figures(ctx: Context) -> list[tuple[str, Any]]:
    """The table of stop ids per serving path, for the reports."""
    paths: list[StopPath] | None = ctx.memo.get(_MEMO)
    return [] if paths is None else [("stop_sets", [p.row() for p in paths])]
