"""Load YAML prompt suites into validated, immutable cases.

A suite file is parsed with PyYAML's safe loader, validated against ``suite.schema.json``
(shipped in the package, so editors can use the same file), checked for what a schema cannot
say (unique case ids, regexes that compile), and its ``defaults`` are merged into every case.
Every problem raises :class:`SuiteError` with one line per problem in the form
``<file>: <json path>: <message>``, for example
``smoke.yaml: cases[3].max_new_tokens: -1 is less than the minimum of 1``, so a user can go
straight to the spot.  No torch and no pytest here: the plugin turns cases into items.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .backends.base import DEFAULT_MAX_NEW_TOKENS
from .text_files import FileRefused, read_text
from .yaml_reader import YamlRefused, json_path, node_problems, read_yaml

_PACKAGE = "pytest_llmmerge"
SCHEMA_FILE = "suite.schema.json"
DEFAULT_SUITE_FILE = "default_suite.yaml"

# Defaults of the case fields a suite leaves out (the budget is every request's).  The deadline
# is generous because a CPU-only CI machine may load a 7B model into the first request.
DEFAULT_TIMEOUT_S = 120.0
VARIANTS = ("merged", "adapter", "reference")  # the schema's enum; a test keeps the two equal
DEFAULT_VARIANTS = ("merged",)
DEFAULT_BACKENDS: tuple[str, ...] = ()  # empty: every backend the run selects (--llm-backend)

# Keys that only make sense per case: a default for them would give every case the same prompt.
_PER_CASE_KEYS = ("id", "prompt", "messages")
# A suite of a thousand cases is well under a megabyte.
MAX_SUITE_BYTES = 16 * 1024 * 1024
_CASES_LINE = re.compile(r"""^["']?cases["']?\s*:""", re.MULTILINE)


class SuiteError(ValueError):
    """A suite file that cannot be used; one line per problem, ``<file>: <json path>: <message>``."""


@dataclass(frozen=True)
class NgramLimit:
    """No token n-gram of length `n` may occur more than `max_count` times in an output."""

    n: int
    max_count: int


@dataclass(frozen=True)
class Expect:
    """What one generation must satisfy; the empty Expect accepts any output."""

    contains: tuple[str, ...] = ()
    not_contains: tuple[str, ...] = ()
    regex: tuple[str, ...] = ()
    max_repeated_ngram: NgramLimit | None = None
    min_new_tokens: int = 0
    equals: str | None = None


@dataclass(frozen=True)
class Case:
    """One prompt of a suite with its defaults already merged in."""

    id: str
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) pairs
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    must_terminate: bool = True
    timeout_s: float = DEFAULT_TIMEOUT_S
    expect: Expect = field(default_factory=Expect)
    tags: tuple[str, ...] = ()
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    note: str = ""
    line: int | None = None  # 1-based line of the case in its YAML file, for failure reports

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError(f"case {self.id!r} needs exactly one of prompt and messages")


@dataclass(frozen=True)
class Suite:
    """A loaded suite: its cases in file order."""

    name: str
    path: Path
    description: str
    cases: tuple[Case, ...]
    corpus: tuple[str, ...] = ()


def load_suite(path: Path) -> Suite:
    """Read, validate and merge one suite file; raises SuiteError naming the file and the spot."""
    where = _display_name(path)
    try:
        text = read_text(path, MAX_SUITE_BYTES)
    except FileRefused as exc:
        raise SuiteError(f"{where}: <root>: cannot read the file: {exc}") from None
    except OSError as exc:
        raise SuiteError(f"{where}: <root>: cannot read the file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise SuiteError(f"{where}: <root>: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_suite(text, path, where)


def looks_like_suite(path: Path) -> bool:
    """Whether a YAML file found in a directory is meant as a suite: it has a top-level `cases`.

    A file that fails to parse still counts when a `cases:` line is visible, so that a broken
    suite is reported instead of silently skipped; other YAML (CI configs, ...) is left alone.
    """
    try:
        text = read_text(path, MAX_SUITE_BYTES)
    except (OSError, UnicodeDecodeError):
        return False
    if "cases" not in text:  # not worth parsing: an 8 MB data file took 38 s
        return False
    try:
        data, _ = read_yaml(text)
    except YamlRefused:
        return _CASES_LINE.search(text) is not None
    return isinstance(data, dict) and "cases" in data


@functools.cache
def default_suite() -> Suite:
    """The built-in suite run when the user gives none: termination and loop checks only."""
    resource = resources.files(_PACKAGE).joinpath(DEFAULT_SUITE_FILE)
    return parse_suite(resource.read_text(encoding="utf-8"), Path(str(resource)), DEFAULT_SUITE_FILE)


@functools.cache
def load_schema() -> dict[str, Any]:
    """The suite JSON Schema shipped with the package."""
    schema: dict[str, Any] = json.loads(
        resources.files(_PACKAGE).joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))
    return schema


def parse_suite(text: str, path: Path, where: str | None = None) -> Suite:
    """Parse suite text; `where` is the file name used in messages (default: `path`'s name)."""
    where = where or path.name
    try:
        data, root = read_yaml(text)
    except YamlRefused as exc:
        raise SuiteError(f"{where}: {exc}") from None
    if data is None:
        raise SuiteError(f"{where}: <root>: the file is empty; a suite needs at least a 'cases' list")
    # Semantic checks assume the shape the schema guarantees, so they run only on valid data.
    problems = node_problems(root) or _schema_problems(data) or _semantic_problems(data)
    if problems:
        raise SuiteError("\n".join(f"{where}: {problem}" for problem in problems))
    defaults: Mapping[str, Any] = data.get("defaults", {})
    lines = _case_lines(root)
    cases = tuple(_make_case(raw, defaults, lines[i] if i < len(lines) else None)
                  for i, raw in enumerate(data["cases"]))
    return Suite(name=str(data.get("suite", path.stem)), path=path,
                 description=str(data.get("description", "")), cases=cases,
                 corpus=tuple(str(t) for t in data.get("corpus", ())))


def _case_lines(root: yaml.Node | None) -> list[int]:
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            if isinstance(key, yaml.ScalarNode) and key.value == "cases" and isinstance(value, yaml.SequenceNode):
                return [item.start_mark.line + 1 for item in value.value]
    return []


# --------------------------------------------------------------------------------------------
# Validation


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_schema())


def _schema_problems(data: Any) -> list[str]:
    errors = list(_validator().iter_errors(data))
    # A value of the wrong type also fails every other keyword at its spot (a case that is a
    # string satisfies both oneOf branches, say); its type error is the one worth reading.
    mistyped = [tuple(e.absolute_path) for e in errors if e.validator == "type"]
    problems: list[str] = []
    for error in sorted(errors, key=lambda e: (_path_key(e.absolute_path), str(e.validator))):
        spot = tuple(error.absolute_path)
        if error.validator != "type" and any(spot[:len(t)] == t for t in mistyped):
            continue
        for problem in _describe(error):
            if problem not in problems:
                problems.append(problem)
    return problems


def _describe(error: jsonschema.ValidationError) -> list[str]:
    """Lines for one schema error, reworded where jsonschema's message is not actionable."""
    path = json_path(error.absolute_path)
    instance, kind = error.instance, error.validator
    if kind == "additionalProperties" and isinstance(instance, dict):
        schema = error.schema if isinstance(error.schema, Mapping) else {}
        allowed = sorted(schema.get("properties", {}))
        out = []
        for key in sorted((k for k in instance if k not in allowed), key=str):
            if path == "defaults" and key in _PER_CASE_KEYS:
                out.append(f"{path}: {key!r} cannot have a default; give it in each case")
                continue
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "allowed: " + ", ".join(allowed)
            out.append(f"{path}: unknown key {key!r} ({hint})")
        return out
    if kind == "oneOf" and isinstance(instance, dict):  # the schema's one oneOf: prompt | messages
        given = "both given" if "prompt" in instance and "messages" in instance else "neither given"
        return [f"{path}: give exactly one of 'prompt' or 'messages' ({given})"]
    if kind == "anyOf" and len(error.absolute_path) >= 2 and error.absolute_path[-2] == "variants":
        close = difflib.get_close_matches(str(instance), VARIANTS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "use merged, adapter, reference, stage<k> or stage<k>-adapter"
        return [f"{path}: unknown variant {_short(instance)} ({hint})"]
    if kind == "type":
        types = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        return [f"{path}: {_short(instance)} is not of type {', '.join(repr(t) for t in types)}"]
    if kind == "pattern":
        return [f"{path}: {_short(instance)} does not match the pattern {error.validator_value}"]
    return [f"{path}: {error.message}"]


def _semantic_problems(data: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    first: dict[str, int] = {}
    for i, case in enumerate(data["cases"]):
        if case["id"] in first:
            problems.append(f"cases[{i}].id: duplicate id {case['id']!r}, also used by cases[{first[case['id']]}]")
        first.setdefault(case["id"], i)
    expects = [("defaults.expect", data.get("defaults", {}).get("expect", {}))]
    expects += [(f"cases[{i}].expect", case.get("expect", {})) for i, case in enumerate(data["cases"])]
    for where, expect in expects:
        raw = expect.get("regex")
        patterns = [(f"{where}.regex", raw)] if isinstance(raw, str) else \
            [(f"{where}.regex[{j}]", p) for j, p in enumerate(raw or ())]
        for spot, pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append(f"{spot}: invalid regular expression {pattern!r}: {exc}")
    return problems


# --------------------------------------------------------------------------------------------
# Building the dataclasses from validated data


def _make_case(raw: Mapping[str, Any], defaults: Mapping[str, Any], line: int | None) -> Case:
    merged = {**defaults, **raw}
    # expect merges per key, so a suite-wide loop guard survives a case adding `contains`.
    expect = {**defaults.get("expect", {}), **raw.get("expect", {})}
    messages = raw.get("messages")
    return Case(
        id=str(raw["id"]),
        prompt=raw.get("prompt"),
        messages=None if messages is None else tuple((str(m["role"]), str(m["content"])) for m in messages),
        max_new_tokens=int(merged.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
        must_terminate=bool(merged.get("must_terminate", True)),
        timeout_s=float(merged.get("timeout_s", DEFAULT_TIMEOUT_S)),
        expect=_make_expect(expect),
        tags=tuple(str(t) for t in merged.get("tags", ())),
        variants=tuple(str(v) for v in merged.get("variants", DEFAULT_VARIANTS)),
        backends=tuple(str(b) for b in merged.get("backends", DEFAULT_BACKENDS)),
        note=str(raw.get("note", "")),
        line=line,
    )


def _make_expect(raw: Mapping[str, Any]) -> Expect:
    ngram = raw.get("max_repeated_ngram")
    equals = raw.get("equals")
    return Expect(
        contains=_texts(raw.get("contains")),
        not_contains=_texts(raw.get("not_contains")),
        regex=_texts(raw.get("regex")),
        max_repeated_ngram=None if ngram is None else NgramLimit(int(ngram["n"]), int(ngram["max_count"])),
        min_new_tokens=int(raw.get("min_new_tokens", 0)),
        equals=None if equals is None else str(equals),
    )


def _texts(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


# --------------------------------------------------------------------------------------------
# Message helpers


def _path_key(parts: Iterable[str | int]) -> tuple[tuple[int, int, str], ...]:
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in parts)


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _display_name(path: Path) -> str:
    """The path relative to the current directory when it lies below it, else the file name."""
    absolute = Path(os.path.normpath(path.absolute()))
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return path.name
