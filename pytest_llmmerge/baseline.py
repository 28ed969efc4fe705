"""A run's baseline (`--llm-baseline-save DIR`): what a release produced, small enough to commit,
with the provenance that explains later differences.

Per suite case x variant x backend: the output token ids and text, finish reason, stop token
and token count; the parity and agreement figures; the per-layer weight change; and the
provenance (:mod:`pytest_llmmerge.provenance`).  Written atomically as DIR/baseline.json and
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
# Figures of parity and agreement items whose names start with these are kept.
COMPARISON_FIGURES = ("ppl_", "log_ppl", "kl_mean", "greedy_equal", "termination_agrees", "measure", "reference",
                      "merged", "ratio", "fine_tune_ratio", "tokens", "dtype")


def build(items: Sequence[ItemRecord], *, provenance: Mapping[str, Any], created: str) -> dict[str, Any]:
    cases = {}
    comparisons = {}
    weight_change: dict[str, Any] = {}
    for item in items:
        if item.kind == "suite" and item.outcome in ("passed", "failed") and "output_token_ids" in item.metrics:
            cases[item.nodeid] = {"variant": item.variant, "backend": item.backend, "outcome": item.outcome,
                                  **{k: item.metrics.get(k) for k in CASE_FIGURES}}
        elif item.kind in ("parity", "agreement") and item.outcome in ("passed", "failed"):
            comparisons[item.nodeid] = {"outcome": item.outcome, **{
                k: v for k, v in item.metrics.items() if k.startswith(COMPARISON_FIGURES)}}
        elif item.kind == "weights":
            weight_change.update({k.split(":", 1)[1]: v for k, v in item.metrics.items()
                                  if k.startswith("weight_change:")})
    return {"schema": SCHEMA_ID, "created": created, "provenance": dict(provenance), "cases": cases,
            "comparisons": comparisons, "weight_change": weight_change}


def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        resources.files(__package__).joinpath("baseline.schema.json").read_text(encoding="utf-8"))
    return loaded


def write(baseline: Mapping[str, Any], directory: Path) -> Path:
    """Validate and write DIR/baseline.json whole (a reader never sees half of one)."""
    jsonschema.validate(baseline, schema())
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILE_NAME
    write_text(json.dumps(baseline, indent=1, ensure_ascii=False, sort_keys=True) + "\n", path)
    return path
