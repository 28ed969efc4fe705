"""`integrity::stop_sets`: every serving path stops at the chat template's end-of-turn token.

The stop ids of HF generate, vLLM offline (with `--llm-vllm-arg`'s flags) and vLLM served with
the deployment's flags (`--llm-serve-arg`) are resolved from the files
(:mod:`pytest_llmmerge.stop_sets`), no model loaded, and tabled for the reports.  A gap of the
checkpoint's own files is reported once, by GEN004/GEN005; GEN008 is what the deployment's
flags change: a `--generation-config` or `--hf-config-path` folder, tokenizer or chat template
that loses the end-of-turn id (an error, whatever the base does: the deployment breaks it), a
folder vLLM cannot start with, or an `--override-generation-config` that tries in vain to
restore a lost id (a warning beside the file's own finding).
"""

from __future__ import annotations

from typing import Any

from ..checkpoint import Checkpoint
from ..file_names import GENERATION_CONFIG
from ..stop_sets import OFFLINE_PATH, SERVED_PATH, StopPath, VllmStopFlags, end_of_turn_of, resolve
from .base import Context, Finding
from .files import eos_fix, ids_label, token_label

_MEMO = "stop_sets"
# How each vLLM path is given an engine argument.
_SPELLING = {OFFLINE_PATH: "--llm-vllm-arg {key}={value}", SERVED_PATH: "--llm-serve-arg='--{flag} {value}'"}


def _paths(ctx: Context, ckpt: Checkpoint, default: bool = False) -> list[StopPath]:
    if default:
        return resolve(ckpt)
    return resolve(ckpt, offline=ctx.offline_stop_flags, served=ctx.served_stop_flags)


def check_stop_sets(ctx: Context) -> list[Finding]:
    paths = _paths(ctx, ctx.model)
    ctx.memo[_MEMO] = paths
    by_default = {p.name: p for p in _paths(ctx, ctx.model, default=True)}
    findings = []
    for path in paths:
        flags = _flags_of(ctx, path)
        if flags is None or flags == VllmStopFlags():
            continue  # HF generate and vLLM's defaults: the files' own gaps are GEN004/GEN005's
        if path.unusable is not None:
            findings.append(Finding("GEN008", "error", f"{path.name}: {path.unusable}", _file_of(ctx, path, flags)))
            continue
        if path.stops_at_end_of_turn is not False:
            continue
        assert path.end_of_turn_id is not None
        stops = "no id at all" if path.ids is None else ids_label(ctx.model, path.ids)
        said = (f"{path.name} stops at {stops} (from {path.source}), not at the chat template's end-of-turn "
                f"{token_label(ctx.model, path.end_of_turn_id)}: chat answers run to max_tokens there. ")
        if by_default[path.name].stops_at_end_of_turn is not False:
            findings.append(Finding("GEN008", "error", said + _fix(ctx, path, flags), _file_of(ctx, path, flags)))
        elif path.ignored_override:
            # The files lose the id already (GEN005 fails for that); the flag meant to repair it cannot.
            findings.append(Finding("GEN008", "warning", said + _override_note(path), _file_of(ctx, path, flags)))
    return findings


def _flags_of(ctx: Context, path: StopPath) -> VllmStopFlags | None:
    """The deployment flags a path runs with; None for HF generate, which takes none."""
    return {OFFLINE_PATH: ctx.offline_stop_flags, SERVED_PATH: ctx.served_stop_flags}.get(path.name)


def _file_of(ctx: Context, path: StopPath, flags: VllmStopFlags) -> str:
    """The file the finding is about: the deployed template, or the generation config read."""
    if flags.chat_template is not None and path.end_of_turn != end_of_turn_of(ctx.model):
        return flags.chat_template if len(flags.chat_template) < 200 else "--chat-template (inline)"
    folder = flags.generation_config if flags.generation_config not in ("auto", "vllm") else flags.hf_config_path
    return f"{folder}/{GENERATION_CONFIG}" if folder is not None else GENERATION_CONFIG


def _override_note(path: StopPath) -> str:
    return (f"The --override-generation-config eos_token_id {list(path.ignored_override)} does not help: vLLM "
            "applies no eos id from it (vLLM #45591); fix the file (GEN005) or point --generation-config at a "
            f"folder whose {GENERATION_CONFIG} lists the id")


def _fix(ctx: Context, path: StopPath, flags: VllmStopFlags) -> str:
    token_id = path.end_of_turn_id
    assert token_id is not None
    spelling = _SPELLING[path.name]
    notes = []
    own = end_of_turn_of(ctx.model)
    if flags.chat_template is not None and path.end_of_turn != own:
        notes.append(f"The chat template deployed ends assistant turns with {path.end_of_turn}, the checkpoint's "
                     f"own with {own}: deploy the checkpoint's template, or make {token_id} an eos id")
    folder = flags.generation_config if flags.generation_config not in ("auto", "vllm") else None
    option = "generation_config" if folder is not None else "hf_config_path"
    folder = folder or flags.hf_config_path
    if folder is not None:
        notes.append(f"Fix: add {token_id} to eos_token_id in {folder}/{GENERATION_CONFIG} (the folder "
                     f"{spelling.format(key=option, flag=option.replace('_', '-'), value=folder)} names), or "
                     "deploy without that flag: the checkpoint's own file lists it")
    if flags.tokenizer is not None:
        notes.append(f"The tokenizer deployed ({flags.tokenizer}) moves vLLM's eos: deploy the checkpoint's own, or "
                     f"add {token_id} to eos_token_id in {GENERATION_CONFIG}")
    if not notes:
        notes.append(eos_fix(ctx.model, token_id))
    return "; ".join(notes)


def stop_set_figures(ctx: Context) -> list[tuple[str, Any]]:
    """The table of stop ids per serving path, for the reports."""
    paths: list[StopPath] | None = ctx.memo.get(_MEMO)
    return [] if paths is None else [("stop_sets", [p.row() for p in paths])]
