"""Resolve the plugin's settings from the command line, the environment and the ini file.

Precedence is CLI > environment > ini > default, decided in exactly one place
(:func:`resolve_settings`).  Every option is described once in :data:`OPTIONS`; the pytest
wiring, the README's options table and the tests all read that table, so they cannot drift.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

OptionKind = Literal["path", "paths", "bool"]


class SettingsError(ValueError):
    """A bad option value; the message names where the value came from."""


@dataclass(frozen=True)
class OptionSpec:
    """One setting with its three spellings: CLI flag, ini key and environment variable."""

    dest: str
    flag: str
    ini: str
    env: str
    kind: OptionKind
    help: str
    metavar: str | None = None


OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec(
        "model", "--llm-model", "llm_model", "LLMMERGE_MODEL", "path",
        "checkpoint directory under test (the merged model); turns the plugin's items on",
        "PATH",
    ),
    OptionSpec(
        "base", "--llm-base", "llm_base", "LLMMERGE_BASE", "path",
        "base model directory the checkpoint was fine-tuned from; checks that compare with "
        "it are skipped without it",
        "PATH",
    ),
    OptionSpec(
        "adapters", "--llm-adapter", "llm_adapters", "LLMMERGE_ADAPTERS", "paths",
        "LoRA adapter directory; repeat in merge order (env: separated by the OS path "
        "separator, ini: one per line)",
        "PATH",
    ),
    OptionSpec(
        "allow_pickle", "--llm-allow-pickle", "llm_allow_pickle", "LLMMERGE_ALLOW_PICKLE",
        "bool", "accept pickle-only weight files (.bin/.pt), which can run code when loaded",
    ),
    OptionSpec(
        "trust_remote_code", "--llm-trust-remote-code", "llm_trust_remote_code",
        "LLMMERGE_TRUST_REMOTE_CODE", "bool",
        "accept checkpoints whose config has auto_map (custom Python code)",
    ),
)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Settings:
    """The resolved, validated settings of one run; immutable."""

    model: Path | None = None
    base: Path | None = None
    adapters: tuple[Path, ...] = ()
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @property
    def enabled(self) -> bool:
        return self.model is not None


def parse_bool(raw: str, where: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingsError(f"{where}: {raw!r} is not a boolean (use one of 1/0, true/false, yes/no, on/off)")


def _paths_from(raw: object, where: str, relative_to: Path, kind: OptionKind) -> object:
    """Turn a raw path value into absolute Path(s), relative paths taken from `relative_to`."""
    if kind == "path":
        text = str(raw).strip()
        if not text:
            raise SettingsError(f"{where}: empty path")
        return (relative_to / Path(text).expanduser()).resolve()
    items = list(raw) if isinstance(raw, (list, tuple)) else str(raw).split(os.pathsep)
    return tuple((relative_to / Path(str(p).strip()).expanduser()).resolve()
                 for p in items if str(p).strip())


def resolve_settings(
    *,
    cli: Mapping[str, object],
    env: Mapping[str, str],
    ini: Callable[[str], object],
    invocation_dir: Path,
    ini_dir: Path,
) -> Settings:
    """Resolve every option: a value given on the CLI wins, then the environment, then the ini.

    `cli` maps dest -> value (None / False / empty means "not given"); `ini` returns the ini
    value for an ini key (None / empty when unset).  Relative paths are taken from the
    invocation directory for CLI and environment values and from the ini file's directory for
    ini values, as a user reading each source would expect.
    """
    values: dict[str, object] = {}
    for spec in OPTIONS:
        cli_value = cli.get(spec.dest)
        if spec.kind == "bool":
            if cli_value:
                values[spec.dest] = True
            elif spec.env in env:
                values[spec.dest] = parse_bool(env[spec.env], f"environment variable {spec.env}")
            else:
                raw = ini(spec.ini)
                if isinstance(raw, bool):
                    values[spec.dest] = raw
                elif raw not in (None, ""):
                    values[spec.dest] = parse_bool(str(raw), f"ini option {spec.ini}")
            continue
        if cli_value:
            values[spec.dest] = _paths_from(cli_value, spec.flag, invocation_dir, spec.kind)
        elif env.get(spec.env, "").strip():
            values[spec.dest] = _paths_from(
                env[spec.env], f"environment variable {spec.env}", invocation_dir, spec.kind)
        else:
            raw = ini(spec.ini)
            if raw:
                values[spec.dest] = _paths_from(raw, f"ini option {spec.ini}", ini_dir, spec.kind)
    settings = Settings(**values)  # type: ignore[arg-type]
    validate_paths(settings)
    return settings


def validate_paths(settings: Settings) -> None:
    """Fail early, naming the option, when a given directory is missing or holds nothing."""
    named: list[tuple[str, Path]] = []
    if settings.model is not None:
        named.append(("--llm-model", settings.model))
    if settings.base is not None:
        named.append(("--llm-base", settings.base))
    named.extend(("--llm-adapter", p) for p in settings.adapters)
    for flag, path in named:
        if not path.exists():
            raise SettingsError(f"{flag}: {path} does not exist")
        if not path.is_dir():
            raise SettingsError(f"{flag}: {path} is not a directory (give the checkpoint directory)")
        if not any(path.iterdir()):
            raise SettingsError(f"{flag}: {path} is empty (no config.json, no weights)")
    if settings.base is None and settings.adapters:
        raise SettingsError("--llm-adapter needs --llm-base: adapters are applied to the base model")


def describe(settings: Settings) -> Sequence[str]:
    """Lines for pytest's report header."""
    lines = [f"llmmerge model: {settings.model}"]
    lines.append(f"llmmerge base: {settings.base if settings.base else '(none: base checks skipped)'}")
    for i, adapter in enumerate(settings.adapters, 1):
        lines.append(f"llmmerge adapter {i}: {adapter}")
    return lines
