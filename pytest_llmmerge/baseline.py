"""A run's baseline (`--llm-baseline-save DIR`): what a release produced, small enough to commit,
with the provenance that explains later differences.

Per suite case x variant x backend: the output token ids and text, finish reason, stop token,
token count and the top k at every output position; per corpus document and scoring backend
its log-likelihood and bounded top k (baseline_compare.document_record); the parity and
agreement figures; the per-layer weight change; and the provenance
(:mod:`pytest_llmmerge.provenance`).  Written atomically as DIR/baseline.json and
validated against baseline.schema.json first.  Built from the run's item records, like the
report.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from .report import ItemRecord, write_text

SCHEMA_ID = "pytest-llmmerge-baseline/1"
FILE_NAME = "baseline.json"
# The case figures a baseline keeps (recorded by each suite item as user properties).
CASE_FIGURES = ("output_token_ids", "output_text", "finish_reason", "stop_token_id", "new_tokens")
# Recorded only when a baseline is saved (a scoring call per case): the top k at each output position.
TOP_FIGURES = ("output_top_ids", "top_k")
# Figures of parity and agreement items whose names start with these are kept.
COMPARISON_FIGURES = ("ppl_", "log_ppl", "kl_mean", "greedy_equal", "termination_agrees", "measure", "reference",
                      "merged", "ratio", "fine_tune_ratio", "tokens", "dtype")


def build(items: Sequence[ItemRecord], *, provenance: Mapping[str, Any], created: str) -> dict[str, Any]:
    cases = {}
    comparisons = {}
    weight_change: dict[str, Any] = {}
    documents: dict[str, Any] = {}
    for item in items:
        if item.kind == "suite" and item.outcome in ("passed", "failed") and "output_token_ids" in item.metrics:
            cases[item.nodeid] = {"variant": item.variant, "backend": item.backend, "outcome": item.outcome,
                                  **{k: item.metrics.get(k) for k in CASE_FIGURES},
                                  **{k: item.metrics[k] for k in TOP_FIGURES if k in item.metrics}}
        elif item.kind == "baseline" and "documents" in item.metrics:
            documents[f"{item.variant}-{item.backend}"] = item.metrics["documents"]
        elif item.kind in ("parity", "agreement") and item.outcome in ("passed", "failed"):
            comparisons[item.nodeid] = {"outcome": item.outcome, **{
                k: v for k, v in item.metrics.items() if k.startswith(COMPARISON_FIGURES)}}
        elif item.kind == "weights":
            weight_change.update({k.split(":", 1)[1]: v for k, v in item.metrics.items()
                                  if k.startswith("weight_change:")})
    return {"schema": SCHEMA_ID, "created": created, "provenance": dict(provenance), "cases": cases,
            "comparisons": comparisons, "weight_change": weight_change, "documents": documents}


def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        resources.files(__package__).joinpath("baseline.schema.json").read_text(encoding="utf-8"))
    return loaded


def dumps(value: Any, depth: int = 0) -> str:
    """JSON with one key per line (a reviewable diff when a release updates its baseline), but a
    list of numbers, or of such lists, on one line: token ids and top-k rows would take thousands."""
    if isinstance(value, dict) and value:
        pad = " " * (depth + 1)
        rows = [f"{pad}{json.dumps(str(k), ensure_ascii=False)}: {dumps(v, depth + 1)}"
                for k, v in sorted(value.items())]
        return "{\n" + ",\n".join(rows) + "\n" + " " * depth + "}"
    if isinstance(value, list) and value and not all(_flat(v) for v in value):
        pad = " " * (depth + 1)
        return "[\n" + ",\n".join(pad + dumps(v, depth + 1) for v in value) + "\n" + " " * depth + "]"
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def _flat(value: Any) -> bool:
    """A scalar, or a list that holds only scalars or lists of scalars."""
    if isinstance(value, list):
        return all(not isinstance(v, (dict, list)) or (isinstance(v, list) and all(
            not isinstance(w, (dict, list)) for w in v)) for v in value)
    return not isinstance(value, dict)


class BaselineError(ValueError):
    """A baseline that cannot be used; the message names the file and the field."""


def load(directory: Path) -> dict[str, Any]:
    """DIR/baseline.json, validated against the schema."""
    path = directory / FILE_NAME
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise BaselineError(f"{path}: cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise BaselineError(f"{path}: not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if isinstance(loaded, dict) and loaded.get("schema") != SCHEMA_ID:
        raise BaselineError(f"{path}: field 'schema' is {loaded.get('schema')!r}, not {SCHEMA_ID!r} (written by "
                            "another version of pytest-llmmerge: save the baseline again)")
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema()).iter_errors(loaded))
    if error is not None:
        where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path) or "(top level)"
        raise BaselineError(f"{path}: field {where}: {error.message}")
    result: dict[str, Any] = loaded
    return result


def write(baseline: Mapping[str, Any], directory: Path) -> Path:
    """Validate and write DIR/baseline.json whole (a reader never sees half of one)."""
    jsonschema.validate(baseline, schema())
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILE_NAME
    write_text(dumps(baseline) + "\n", path)
    return path
