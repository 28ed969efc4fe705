"""Resolve the plugin's settings from the command line, the environment and the ini file.

Precedence is CLI > environment > ini > default, decided in exactly one place
(:func:`resolve_settings`).  Every option is described once in :data:`.option_specs.OPTIONS`; the pytest
wiring, the README's options table and the tests all read that table, so they cannot drift.
"""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .option_specs import OPTIONS, OptionSpec
from .stop_sets import ServeArgsError, VllmStopFlags, flags_from_engine_args, flags_from_serve_args


class SettingsError(ValueError):
    """A bad option value; the message names where the value came from."""


DTYPES = ("auto", "float32", "bfloat16", "float16")
KNOWN_BACKENDS = ("hf", "vllm", "vllm-serve")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Settings:
    """The resolved, validated settings of one run; immutable."""

    model: Path | None = None
    base: Path | None = None
    adapters: tuple[Path, ...] = ()
    stages: tuple[Path, ...] = ()
    build_merged: bool = False
    merge_dtype: str = "float32"
    corpus: Path | None = None
    # Explicit tolerances; None means calibrated on the noise measured in the run (calibration.py).
    ppl_rtol: float | None = None
    kl_max: float | None = None
    max_ppl_ratio: float | None = None
    noise_factor: float = 10.0
    top_k: int = 5
    max_weight_change: float | None = None
    audit_merge: bool = False
    # 0.1 % of the update: float32 merges stay at their rounding floor (exempt), merges rounded
    # through bfloat16 lose 0.4-0.7 % on the fixtures (huge updates) and far more on real LoRAs.
    audit_max_error: float = 0.001
    bisect: bool = False
    report: Path | None = None
    report_md: Path | None = None
    baseline_save: Path | None = None
    baseline: Path | None = None
    baseline_strict: bool = False
    baseline_growth: float = 1.5
    report_html: Path | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    backends: tuple[str, ...] = ("hf", "vllm")
    vllm_args: tuple[str, ...] = ()
    serve_args: tuple[str, ...] = ()  # argv tokens for `vllm serve`, in order
    tensor_parallel_size: int = 1
    kv_cache_gib: float | None = None
    suite_globs: tuple[str, ...] = ()
    batch_size: int = 8
    load_timeout_s: float = 900.0
    call_timeout_s: float = 120.0
    merge_timeout_s: float = 3600.0
    dtype: str = "auto"
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        return self.model is not None or (self.base is not None and bool(self.adapters))


def parse_bool(raw: str, where: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingsError(f"{where}: {raw!r} is not a boolean (use one of 1/0, true/false, yes/no, on/off)")


def _shown(text: str, limit: int) -> str:
    """A raw value for a message, cut short: a hostile one can be megabytes."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _path(text: str, relative_to: Path, where: str) -> Path:
    """The absolute path `text` names, probed once, so that a name no file system takes (a
    symlink loop, an unknown ~user, a name too long, a NUL byte) is a usage error here."""
    shown = _shown(text, 80)
    try:
        path = (relative_to / Path(text).expanduser()).resolve()
        path.exists()
    except (OSError, RuntimeError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SettingsError(f"{where}: {shown} cannot be used as a path: {reason}") from None
    return path


def _convert(spec: OptionSpec, raw: object, where: str, relative_to: Path) -> object:
    """Turn a raw value from one source into the option's type; errors name the source."""
    if spec.kind == "bool":
        return raw if isinstance(raw, bool) else parse_bool(str(raw), where)
    if spec.kind == "path":
        text = str(raw).strip()
        if not text:
            raise SettingsError(f"{where}: empty path")
        return _path(text, relative_to, where)
    items = [str(p) for p in raw] if isinstance(raw, (list, tuple)) else None
    if spec.kind == "paths":
        parts = items if items is not None else str(raw).split(os.pathsep)
        return tuple(_path(p.strip(), relative_to, where) for p in parts if p.strip())
    if spec.kind == "names":
        parts = items if items is not None else [str(raw)]
        return tuple(n.strip() for p in parts for n in p.split(",") if n.strip())
    if spec.kind == "args":
        try:
            return tuple(serve_argv(items) if items is not None else shlex.split(str(raw)))
        except ValueError as exc:  # shlex: an unclosed quote
            raise SettingsError(f"{where}: {_shown(str(raw), 80)} is not a shell-quoted command line: {exc}") \
                from None
    if spec.kind in ("int", "float"):
        text = str(raw).strip()
        shown = _shown(text, 40)
        try:
            number = int(text) if spec.kind == "int" else float(text)
        except ValueError:
            raise SettingsError(f"{where}: {shown} is not {'an integer' if spec.kind == 'int' else 'a number'}") \
                from None
        if (isinstance(number, float) and not math.isfinite(number)) or number <= 0:
            raise SettingsError(f"{where}: {shown} must be a finite number greater than 0")
        if spec.maximum is not None and number > spec.maximum:
            raise SettingsError(f"{where}: {shown} is larger than the most this option takes, {int(spec.maximum)}")
        return number
    return str(raw).strip()


def _entries(where: str, path: Path) -> bool:
    """Whether a directory has entries; an unreadable one is a usage error naming `where`."""
    try:
        return any(path.iterdir())
    except OSError as exc:
        raise SettingsError(f"{where}: {path} cannot be read: {exc.strerror or exc}") from None


def _given(value: object) -> bool:
    return value is not None and value is not False and value != "" and value != [] and value != ()


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
    came_from: dict[str, str] = {}
    for spec in OPTIONS:
        sources = (
            (cli.get(spec.dest), spec.flag, invocation_dir),
            (env.get(spec.env) if spec.kind == "bool" or env.get(spec.env, "").strip() else None,
             f"environment variable {spec.env}", invocation_dir),
            (ini(spec.ini), f"ini option {spec.ini}", ini_dir),
        )
        for raw, where, relative_to in sources:
            if _given(raw):
                values[spec.dest] = _convert(spec, raw, where, relative_to)
                came_from[spec.dest] = where
                break
    settings = Settings(**values)  # type: ignore[arg-type]
    validate(settings, came_from)
    return settings


def validate(settings: Settings, sources: Mapping[str, str] | None = None) -> None:
    """Fail early, naming where the value came from (flag, environment variable or ini option):
    missing, unreadable or empty directories, unknown names, report paths that would overwrite
    a checkpoint's files."""
    given = {spec.dest: spec.flag for spec in OPTIONS} | dict(sources or {})
    if settings.dtype not in DTYPES:
        raise SettingsError(f"{given['dtype']}: {settings.dtype!r} is not one of {', '.join(DTYPES)}")
    if settings.merge_dtype not in DTYPES[1:]:
        raise SettingsError(f"{given['merge_dtype']}: {settings.merge_dtype!r} is not one of {', '.join(DTYPES[1:])}")
    if settings.build_merged and (settings.base is None or not settings.adapters):
        raise SettingsError("--llm-build-merged needs --llm-base and at least one --llm-adapter")
    if len(settings.stages) >= max(len(settings.adapters), 1):
        raise SettingsError(f"{given['stages']}: {len(settings.stages)} stage(s) given for {len(settings.adapters)} "
                            "adapter(s); give the stages after adapters 1..n-1 (stage n is --llm-model)")
    if settings.corpus is not None and not settings.corpus.is_file():
        raise SettingsError(f"{given['corpus']}: {settings.corpus} is not a file")
    for name in settings.backends:
        if name not in KNOWN_BACKENDS and ":" not in name:
            raise SettingsError(f"{given['backends']}: unknown backend {name!r} (use {', '.join(KNOWN_BACKENDS)} "
                                "or module:Class)")
    vllm_kwargs(settings)  # a malformed --llm-vllm-arg fails here, naming itself
    for flag in ("--host", "--port", "--uds"):
        if any(a == flag or a.startswith(flag + "=") for a in settings.serve_args):
            raise SettingsError(f"{given['serve_args']}: {flag} is chosen by the plugin (a free local port), "
                                "leave it out")
    try:
        flags_from_serve_args(settings.serve_args)
    except ServeArgsError as exc:
        raise SettingsError(f"{given['serve_args']}: {exc}") from None
    try:
        flags_from_engine_args(vllm_kwargs(settings))
    except ServeArgsError as exc:
        raise SettingsError(f"{given['vllm_args']}: {exc}") from None
    named: list[tuple[str, Path]] = []
    if settings.model is not None and settings.build_merged:
        if settings.model.exists() and not settings.model.is_dir():
            raise SettingsError(f"{given['model']}: {settings.model} is a file; with --llm-build-merged it is "
                                "the directory the merge is written to: give a new path")
        if settings.model.exists() and _entries(given["model"], settings.model):
            raise SettingsError(f"{given['model']}: {settings.model} exists; with --llm-build-merged it is where "
                                "the merge is written: remove it or give a new path")
    elif settings.model is not None:
        named.append((given["model"], settings.model))
    if settings.base is not None:
        named.append((given["base"], settings.base))
    named.extend((given["adapters"], p) for p in settings.adapters)
    named.extend((given["stages"], p) for p in settings.stages)
    for flag, path in named:
        if not path.exists():
            raise SettingsError(f"{flag}: {path} does not exist")
        if not path.is_dir():
            raise SettingsError(f"{flag}: {path} is not a directory (give the checkpoint directory)")
        if not _entries(flag, path):
            raise SettingsError(f"{flag}: {path} is empty (no config.json, no weights)")
    for dest in ("report", "report_md", "report_html"):
        report: Path | None = getattr(settings, dest)
        if report is None:
            continue
        if report.is_dir():
            raise SettingsError(f"{given[dest]}: {report} is a directory; give the report's file path")
        if report.exists() and not report.is_file():
            raise SettingsError(f"{given[dest]}: {report} is not a regular file (a device or a FIFO); a report "
                                "would replace it: give a file path")
        inside = checkpoint_holding(settings, report)
        if inside is not None:
            raise SettingsError(f"{given[dest]}: {report} lies inside the checkpoint directory {inside}; a report "
                                "there could replace the checkpoint's own files: write it elsewhere")
    if settings.baseline_save is not None:
        if settings.model is None:
            raise SettingsError(f"{given['baseline_save']}: needs --llm-model, the checkpoint the baseline describes")
        if settings.baseline_save.exists() and not settings.baseline_save.is_dir():
            raise SettingsError(f"{given['baseline_save']}: {settings.baseline_save} is a file; give the directory "
                                "the baseline is written to")
        inside = checkpoint_holding(settings, settings.baseline_save)
        if inside is not None:
            raise SettingsError(f"{given['baseline_save']}: {settings.baseline_save} lies inside the checkpoint "
                                f"directory {inside}: write the baseline elsewhere")
    if settings.baseline is not None:
        saved = settings.baseline / "baseline.json"
        if not settings.baseline.is_dir():
            raise SettingsError(f"{given['baseline']}: {settings.baseline} is not a directory (give the directory "
                                "--llm-baseline-save wrote)")
        if not saved.is_file():
            raise SettingsError(f"{given['baseline']}: {saved} does not exist (write it with --llm-baseline-save "
                                "on the release)")
        if settings.model is None:
            raise SettingsError(f"{given['baseline']}: needs --llm-model, the candidate to compare")
    if settings.baseline_growth < 1:
        raise SettingsError(f"{given['baseline_growth']}: {settings.baseline_growth} is below 1 (a factor the token "
                            "count may grow by)")
    if settings.audit_merge and (settings.base is None or not settings.adapters):
        raise SettingsError("--llm-audit-merge needs --llm-base and the --llm-adapter(s) that were merged")
    if settings.bisect and (settings.base is None or not settings.adapters):
        raise SettingsError("--llm-bisect needs --llm-base and the --llm-adapter chain to bisect")
    if settings.base is None and settings.adapters:
        raise SettingsError("--llm-adapter needs --llm-base: adapters are applied to the base model")


def checkpoint_holding(settings: Settings, path: Path) -> Path | None:
    """The checkpoint or adapter directory of the run that `path` lies in, if any: no report
    may be written there (it could replace the checkpoint's own files)."""
    checkpoints = [p for p in (settings.model, settings.base, *settings.adapters, *settings.stages) if p is not None]
    return next((c for c in checkpoints if path.resolve().is_relative_to(c.resolve())), None)


def vllm_kwargs(settings: Settings) -> dict[str, object]:
    """--llm-vllm-arg key=value pairs as vllm.LLM() keyword arguments (ints, floats, booleans parsed)."""
    out: dict[str, object] = {}
    for item in settings.vllm_args:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise SettingsError(f"--llm-vllm-arg: {item!r} is not key=value")
        value: object = raw.strip()
        for convert in (int, float):
            try:
                value = convert(raw)
                break
            except ValueError:
                continue
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE - {""}:
            value = value.lower() in _TRUE
        out[key.strip()] = value
    return out


def stop_flags(settings: Settings) -> tuple[VllmStopFlags, VllmStopFlags]:
    """The flags deciding vLLM's stop ids: offline (--llm-vllm-arg) and served (--llm-serve-arg)."""
    return flags_from_engine_args(vllm_kwargs(settings)), flags_from_serve_args(settings.serve_args)


def serve_argv(values: Sequence[str]) -> list[str]:
    """--llm-serve-arg values as argv tokens: each value is one argument, except a flag followed
    by a space, which is the flag and its value (JSON values keep their own spaces)."""
    argv: list[str] = []
    for value in values:
        head, space, rest = value.strip().partition(" ")
        if head.startswith("-") and space and "=" not in head and rest.strip():
            argv += [head, rest.strip()]
        elif value.strip():
            argv.append(value.strip())
    return argv


def describe(settings: Settings) -> Sequence[str]:
    """Lines for pytest's report header."""
    lines = [f"llmmerge model: {settings.model or '(built from base + adapters)'}"
             + (" (built from base + adapters)" if settings.build_merged and settings.model else "")]
    lines.append(f"llmmerge base: {settings.base if settings.base else '(none: base checks skipped)'}")
    for i, adapter in enumerate(settings.adapters, 1):
        lines.append(f"llmmerge adapter {i}: {adapter}")
    lines.append(f"llmmerge backends: {', '.join(settings.backends)}; device {settings.device}; dtype {settings.dtype}; "
                 f"merges built in {settings.merge_dtype}")
    if "vllm-serve" in settings.backends or settings.serve_args:
        lines.append(f"llmmerge vllm serve flags: {shlex.join(settings.serve_args) or '(none: vLLM defaults)'}")
    return lines
