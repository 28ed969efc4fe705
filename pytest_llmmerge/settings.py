"""Resolve the plugin's settings from the command line, the environment and the ini file.

Precedence is CLI > environment > ini > default, decided in exactly one place
(:func:`resolve_settings`).  Every option is described once in :data:`OPTIONS`; the pytest
wiring, the README's options table and the tests all read that table, so they cannot drift.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

OptionKind = Literal["path", "paths", "bool", "int", "float", "str", "names"]


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
    # Past this a number is a typo, and would fail late (a wait of 1e46 s overflows the clock).
    maximum: float | None = None


A_WEEK_S = 7 * 24 * 3600.0

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
        "stages", "--llm-stage", "llm_stages", "LLMMERGE_STAGES", "paths",
        "your own merged checkpoint after adapter k, repeat in order for k = 1..n-1 (stage n is "
        "--llm-model); stages not given are built",
        "PATH",
    ),
    OptionSpec(
        "build_merged", "--llm-build-merged", "llm_build_merged", "LLMMERGE_BUILD_MERGED", "bool",
        "build the merged model from --llm-base and --llm-adapter (into --llm-model's path when given, "
        "which must not exist yet) and gate it",
    ),
    OptionSpec(
        "merge_dtype", "--llm-merge-dtype", "llm_merge_dtype", "LLMMERGE_MERGE_DTYPE", "str",
        "dtype the built merges are computed in: float32 (default), bfloat16, float16", "DTYPE",
    ),
    OptionSpec(
        "corpus", "--llm-corpus", "llm_corpus", "LLMMERGE_CORPUS", "path",
        "text file (documents separated by blank lines) for perplexity checks against the reference; "
        "default: the built-in English and Chinese corpus", "PATH",
    ),
    OptionSpec(
        "ppl_rtol", "--llm-ppl-rtol", "llm_ppl_rtol", "LLMMERGE_PPL_RTOL", "float",
        "fixed max relative perplexity difference, merged vs adapter-only and HF vs vLLM (default: calibrated "
        "on the measured noise, see --llm-noise-factor)", "RTOL",
    ),
    OptionSpec(
        "kl_max", "--llm-kl-max", "llm_kl_max", "LLMMERGE_KL_MAX", "float",
        "fixed max mean per-token KL from the float32 truth, in nats (default: calibrated, max(1e-3, "
        "noise factor x the KL that the dtype and backend alone cause))", "NATS",
    ),
    OptionSpec(
        "max_ppl_ratio", "--llm-max-ppl-ratio", "llm_max_ppl_ratio", "LLMMERGE_MAX_PPL_RATIO", "float",
        "max perplexity (or bits per byte) of the merged model over the base's on general text: a "
        "forgetting limit (default: off; the merge is judged against the unmerged fine-tune instead)", "RATIO",
    ),
    OptionSpec(
        "noise_factor", "--llm-noise-factor", "llm_noise_factor", "LLMMERGE_NOISE_FACTOR", "float",
        "calibrated limits are max(floor, F x the noise measured in the run) for the KL and the "
        "log-perplexity shift from the float32 truth (default 10)", "F",
    ),
    OptionSpec(
        "top_k", "--llm-top-k", "llm_top_k", "LLMMERGE_TOP_K", "int",
        "greedy outputs that differ pass when, at the first divergence, each side's token is in the "
        "other's top k (default 5)", "K", maximum=1_000_000,
    ),
    OptionSpec(
        "max_weight_change", "--llm-max-weight-change", "llm_max_weight_change", "LLMMERGE_MAX_WEIGHT_CHANGE",
        "float", "fail weights::change_vs_base when a layer's ||W - W_base|| / ||W_base|| exceeds this "
        "(default: off, the table is only reported)", "RATIO",
    ),
    OptionSpec(
        "audit_merge", "--llm-audit-merge", "llm_audit_merge", "LLMMERGE_AUDIT_MERGE", "bool",
        "add audit::merge_precision: per layer, how much of the adapters' fp32 update the candidate lost "
        "(needs --llm-base and --llm-adapter)",
    ),
    OptionSpec(
        "audit_max_error", "--llm-audit-max-error", "llm_audit_max_error", "LLMMERGE_AUDIT_MAX_ERROR", "float",
        "max ||W_candidate - (W_base + dW_fp32)|| / ||dW|| of any tensor the adapters update (default 0.001; "
        "a float32 merge's own rounding is never counted)", "RATIO",
    ),
    OptionSpec(
        "bisect", "--llm-bisect", "llm_bisect", "LLMMERGE_BISECT", "bool",
        "when a suite case fails on the merged model of a chain, find the first stage that fails it by "
        "bisection (about log2(n) builds, cached) and name that stage's adapter",
    ),
    OptionSpec(
        "report", "--llm-report", "llm_report", "LLMMERGE_REPORT", "path",
        "write the run's report as JSON to PATH (schema: pytest_llmmerge/report.schema.json)", "PATH",
    ),
    OptionSpec(
        "report_md", "--llm-report-md", "llm_report_md", "LLMMERGE_REPORT_MD", "path",
        "write the report as Markdown to PATH, and append it to $GITHUB_STEP_SUMMARY when that is set", "PATH",
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
    OptionSpec(
        "backends", "--llm-backend", "llm_backends", "LLMMERGE_BACKENDS", "names",
        "backends that run the suites and parity, comma-separated: hf, vllm, or module:Class of your own "
        "(default: hf,vllm; vLLM items are skipped with the reason where vllm does not import)",
        "NAMES",
    ),
    OptionSpec(
        "suite_globs", "--llm-suite-glob", "llm_suite_globs", "LLMMERGE_SUITE_GLOBS", "names",
        "file-name patterns of YAML suites to collect anywhere under the test paths, comma-separated "
        "(suites named on the command line or inside a directory named there are always collected)",
        "PATTERNS",
    ),
    OptionSpec(
        "batch_size", "--llm-batch-size", "llm_batch_size", "LLMMERGE_BATCH_SIZE", "int",
        "prompts generated together per worker (default 8; 1 pins every hang to its prompt at once)",
        "N", maximum=65_536,
    ),
    OptionSpec(
        "load_timeout_s", "--llm-load-timeout", "llm_load_timeout", "LLMMERGE_LOAD_TIMEOUT", "float",
        "seconds a worker may take to load its model (default 900)", "SECONDS", maximum=A_WEEK_S,
    ),
    OptionSpec(
        "merge_timeout_s", "--llm-merge-timeout", "llm_merge_timeout", "LLMMERGE_MERGE_TIMEOUT", "float",
        "seconds one merge build may take (it runs in its own process, killed at the deadline; the items "
        "needing it fail with the reason) (default 3600)", "SECONDS", maximum=A_WEEK_S,
    ),
    OptionSpec(
        "call_timeout_s", "--llm-call-timeout", "llm_call_timeout", "LLMMERGE_CALL_TIMEOUT", "float",
        "seconds parity and agreement give a worker per text scored or prompt generated; a call of n gets "
        "n times it, and a worker that misses it is killed and the item fails (default 120)", "SECONDS",
        maximum=A_WEEK_S,
    ),
    OptionSpec(
        "tensor_parallel_size", "--llm-tensor-parallel-size", "llm_tensor_parallel_size",
        "LLMMERGE_TENSOR_PARALLEL_SIZE", "int", "GPUs vLLM splits each model over (default 1)", "N",
        maximum=4096,
    ),
    OptionSpec(
        "kv_cache_gib", "--llm-kv-cache-gib", "llm_kv_cache_gib", "LLMMERGE_KV_CACHE_GIB", "float",
        "vLLM KV cache size in GiB (default: on CPU, room for two full-length sequences; on GPU, "
        "vLLM's own sizing)", "GIB", maximum=1_048_576,
    ),
    OptionSpec(
        "vllm_args", "--llm-vllm-arg", "llm_vllm_args", "LLMMERGE_VLLM_ARGS", "names",
        "extra vllm.LLM() argument as key=value, repeatable (e.g. tensor_parallel_size=2, "
        "gpu_memory_utilization=0.5, max_model_len=4096)", "KEY=VALUE",
    ),
    OptionSpec(
        "dtype", "--llm-dtype", "llm_dtype", "LLMMERGE_DTYPE", "str",
        "dtype the backends load models in: auto (the checkpoint's), float32, bfloat16, float16 (default auto)",
        "DTYPE",
    ),
    OptionSpec(
        "device", "--llm-device", "llm_device", "LLMMERGE_DEVICE", "str",
        "device of the HF backend: cpu, cuda, cuda:1 ... (default cpu)", "DEVICE",
    ),
)
DTYPES = ("auto", "float32", "bfloat16", "float16")
KNOWN_BACKENDS = ("hf", "vllm")

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
    allow_pickle: bool = False
    trust_remote_code: bool = False
    backends: tuple[str, ...] = ("hf", "vllm")
    vllm_args: tuple[str, ...] = ()
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


def _path(text: str, relative_to: Path, where: str) -> Path:
    """The absolute path `text` names, probed once, so that a name no file system takes (a
    symlink loop, an unknown ~user, a name too long, a NUL byte) is a usage error here."""
    shown = repr(text if len(text) <= 80 else text[:80] + "...")
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
    if spec.kind in ("int", "float"):
        text = str(raw).strip()
        shown = repr(text if len(text) <= 40 else text[:40] + "...")
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
    for dest in ("report", "report_md"):
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


def describe(settings: Settings) -> Sequence[str]:
    """Lines for pytest's report header."""
    lines = [f"llmmerge model: {settings.model or '(built from base + adapters)'}"
             + (" (built from base + adapters)" if settings.build_merged and settings.model else "")]
    lines.append(f"llmmerge base: {settings.base if settings.base else '(none: base checks skipped)'}")
    for i, adapter in enumerate(settings.adapters, 1):
        lines.append(f"llmmerge adapter {i}: {adapter}")
    lines.append(f"llmmerge backends: {', '.join(settings.backends)}; device {settings.device}; dtype {settings.dtype}; "
                 f"merges built in {settings.merge_dtype}")
    return lines
