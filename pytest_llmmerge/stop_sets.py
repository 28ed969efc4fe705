"""The token ids each serving path stops at, resolved from the files the way each library does,
without loading a model.

- **HF generate** stops at the generation config's eos ids only: generation_config.json's, or,
  without that file, config.json's (transformers builds the generation config from it).
- **vLLM** (offline `LLM` and `vllm serve` alike) stops at the tokenizer's eos id and at every
  eos id of the generation config it loads.  `--generation-config auto` and `vllm` both load
  the model directory's (vLLM 0.32: "vllm" only neutralises the sampling defaults, the eos ids
  are still read from the model); `--generation-config DIR` loads DIR's instead (its
  generation_config.json, else its config.json).  `--override-generation-config` changes
  sampling defaults only: its `eos_token_id` never reaches the stop ids (vLLM #45591), so it
  cannot repair a lost end-of-turn id.  `--hf-config-path DIR` moves the generation config
  read in "auto" and "vllm" modes to DIR's; `--tokenizer DIR` moves the tokenizer eos (and
  the chat template) to DIR's; a `--config FILE.yaml` gives flags the command line overrides.
- The **end-of-turn token** is what the chat template writes after an assistant message; a
  server given `--chat-template` renders with that template instead of the tokenizer's.

A path whose set lacks the end-of-turn id runs every chat answer to its token budget.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import chat_template
from .checkpoint import Checkpoint, token_id_set
from .file_names import CONFIG, GENERATION_CONFIG
from .text_files import read_text
from .tokenizer_files import MAX_TEMPLATE_BYTES
from .yaml_reader import read_yaml

HF_PATH = "HF generate"
OFFLINE_PATH = "vLLM offline"
SERVED_PATH = "vLLM served"


class ServeArgsError(ValueError):
    """A deployment flag this module reads cannot be understood; the message names it."""


@dataclass(frozen=True)
class VllmStopFlags:
    """The engine arguments that decide a vLLM path's stop ids and chat template."""

    generation_config: str = "auto"  # "auto", "vllm" or a directory
    override_generation_config: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    chat_template: str | None = None  # a file, or the template itself (as vLLM takes it)
    hf_config_path: str | None = None  # where vLLM reads config and generation config instead of the model


_SERVE_FLAGS = {"generation-config": "generation_config", "override-generation-config": "override_generation_config",
                "tokenizer": "tokenizer", "chat-template": "chat_template", "hf-config-path": "hf_config_path"}
# vLLM reads `--config FILE.yaml` as flags given before the command line's own.
MAX_CONFIG_BYTES = 1024 * 1024


def flags_from_serve_args(argv: Sequence[str]) -> VllmStopFlags:
    """The stop-relevant flags of a `vllm serve` command line (`--flag value` or `--flag=value`;
    vLLM also accepts underscores), after those of a `--config` YAML file, which the command
    line overrides.  The last occurrence wins, as with argparse."""
    pairs = _flag_pairs(list(argv))
    values: dict[str, Any] = {}
    for name, value in pairs:
        if name == "config":
            values.update(_config_file(value))
    for name, value in pairs:
        key = _SERVE_FLAGS.get(name)
        if key is not None:
            values[key] = value
    return _flags(values)


def _flag_pairs(args: list[str]) -> list[tuple[str, str]]:
    """(flag name with dashes, value) for each flag this module reads or `--config`."""
    pairs = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--"):
            continue
        name, has_value, value = arg[2:].partition("=")
        name = name.replace("_", "-")
        if name not in _SERVE_FLAGS and name != "config":
            continue
        if not has_value:
            if i >= len(args):
                raise ServeArgsError(f"--{name} needs a value")
            value = args[i]
            i += 1
        pairs.append((name, value))
    return pairs


def _config_file(path: str) -> dict[str, Any]:
    try:
        data, _ = read_yaml(read_text(Path(path), MAX_CONFIG_BYTES))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ServeArgsError(f"--config {path} cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise ServeArgsError(f"--config {path} is not a YAML mapping of flags")
    return {key: data[k] for k in data
            if (key := _SERVE_FLAGS.get(str(k).replace("_", "-"))) is not None and data[k] is not None}


def flags_from_engine_args(kwargs: dict[str, Any]) -> VllmStopFlags:
    """The same from `vllm.LLM()` keyword arguments (`--llm-vllm-arg key=value`)."""
    return _flags({k: kwargs[k] for k in _SERVE_FLAGS.values() if k in kwargs})


def _flags(values: dict[str, Any]) -> VllmStopFlags:
    override = values.get("override_generation_config", {})
    if isinstance(override, str):
        try:
            override = json.loads(override)
        except json.JSONDecodeError as exc:
            raise ServeArgsError(f"--override-generation-config is not JSON ({exc.msg} at character "
                                 f"{exc.pos}): {override[:80]!r}") from None
    if not isinstance(override, dict):
        raise ServeArgsError(f"--override-generation-config must be a JSON object, got {override!r}")
    texts = {k: None if values.get(k) is None else str(values[k])
             for k in ("tokenizer", "chat_template", "hf_config_path")}
    return VllmStopFlags(generation_config=str(values.get("generation_config", "auto")),
                         override_generation_config=override, **texts)


@dataclass(frozen=True)
class StopPath:
    """One serving path: the ids it stops at (None: none at all) and where they come from."""

    name: str
    ids: frozenset[int] | None
    source: str
    end_of_turn: str | None  # the token its chat template ends an assistant turn with
    end_of_turn_id: int | None
    ignored_override: tuple[int, ...] = ()  # eos ids an --override-generation-config asked for in vain
    unusable: str | None = None  # why vLLM would not start with these flags at all

    @property
    def stops_at_end_of_turn(self) -> bool | None:
        """None when there is no end-of-turn token to stop at (no chat template, or it writes none)."""
        if self.end_of_turn_id is None:
            return None
        return self.ids is not None and self.end_of_turn_id in self.ids

    def row(self) -> dict[str, Any]:
        """The report's row."""
        return {"path": self.name, "stop_ids": None if self.ids is None else sorted(self.ids), "source": self.source,
                "end_of_turn": self.end_of_turn, "end_of_turn_id": self.end_of_turn_id,
                "stops_at_end_of_turn": self.stops_at_end_of_turn, "unusable": self.unusable}


def resolve(model: Checkpoint, *, offline: VllmStopFlags = VllmStopFlags(),
            served: VllmStopFlags = VllmStopFlags()) -> list[StopPath]:
    """HF generate, vLLM offline and vLLM served, for one checkpoint."""
    end_of_turn = end_of_turn_of(model)
    hf_ids = model.effective_eos_ids()
    hf_source = (f"{GENERATION_CONFIG} eos_token_id" if model.json(GENERATION_CONFIG).exists
                 else f"{CONFIG} eos_token_id (no {GENERATION_CONFIG})")
    paths = [StopPath(HF_PATH, None if hf_ids is None else frozenset(hf_ids), hf_source, end_of_turn,
                      _id_of(model, end_of_turn))]
    for name, flags in ((OFFLINE_PATH, offline), (SERVED_PATH, served)):
        paths.append(_vllm_path(name, model, flags, end_of_turn))
    return paths


def _vllm_path(name: str, model: Checkpoint, flags: VllmStopFlags, end_of_turn: str | None) -> StopPath:
    tokenizer = Checkpoint(Path(flags.tokenizer)) if flags.tokenizer else model
    ids: set[int] = set()
    sources = []
    tokenizer_eos = tokenizer.tokenizer_eos()
    if tokenizer_eos is not None and tokenizer_eos[1] is not None:
        ids.add(tokenizer_eos[1])
        sources.append("tokenizer eos" + (f" ({flags.tokenizer})" if flags.tokenizer else ""))
    if flags.generation_config not in ("auto", "vllm"):
        folder, where = Checkpoint(Path(flags.generation_config)), f" of --generation-config {flags.generation_config}"
    elif flags.hf_config_path is not None:
        folder, where = Checkpoint(Path(flags.hf_config_path)), f" of --hf-config-path {flags.hf_config_path}"
    else:
        folder, where = model, ""
    if folder is not model and not folder.path.is_dir():
        unusable = f"{where.removeprefix(' of ')} is not a directory: vLLM refuses to start"
    else:
        unusable = None
    if folder.json(GENERATION_CONFIG).exists:
        found = folder.generation_eos_ids()
        sources.append(f"{GENERATION_CONFIG} eos_token_id{where}")
    else:
        found = token_id_set(folder.config_value("eos_token_id"))
        sources.append(f"{CONFIG} eos_token_id{where} (no {GENERATION_CONFIG})")
    ids |= found or set()
    if flags.chat_template is not None:
        template = _served_template(flags.chat_template)
        end_of_turn = None if template is None else _end_of_turn_in(tokenizer, template)
    elif flags.tokenizer:  # the chat template comes with the tokenizer vLLM loads
        end_of_turn = end_of_turn_of(tokenizer)
    asked = token_id_set(flags.override_generation_config.get("eos_token_id")) or set()
    return StopPath(name, frozenset(ids) if ids else None, " + ".join(sources), end_of_turn,
                    _id_of(tokenizer, end_of_turn), tuple(sorted(asked - ids)), unusable)


def end_of_turn_of(ckpt: Checkpoint) -> str | None:
    """The token the checkpoint's own chat template ends an assistant turn with, if any."""
    found = ckpt.chat_template()
    return None if found is None else _end_of_turn_in(ckpt, found[0])


def _end_of_turn_in(ckpt: Checkpoint, template: str) -> str | None:
    known = [t["content"] for t in ckpt.added_tokens()] + list(ckpt.special_tokens().values())
    return chat_template.end_of_turn_token(template, ckpt.special_tokens(), known)


def _served_template(value: str) -> str | None:
    """vLLM reads `--chat-template` as a file when one exists there, else as the template text."""
    path = Path(value)
    try:
        if path.is_file():
            return read_text(path, MAX_TEMPLATE_BYTES)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if any(mark in value for mark in ("{{", "{%")) else None


def _id_of(ckpt: Checkpoint, token: str | None) -> int | None:
    return None if token is None else ckpt.token_ids.get(token)
