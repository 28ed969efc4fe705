"""The run's report as one self-contained HTML file (`--llm-report-html`).

One page that loads nothing: inline CSS, a small inline script that filters the item table, and
the plots inlined as SVG.  The plots need matplotlib (the `html` extra), imported only while a
page is rendered; without it the page says so and shows the same figures as tables.

Each plot's ``<svg>`` carries ``data-plot="<name>"`` and each of its series the id
``<name>-<series>``: parity-kl, parity-ppl, parity-limit; weights-change, weights-limit;
diagnosis-error, diagnosis-floor, diagnosis-limit, diagnosis-factor-<adapter>; documents-kl-<n>
(one per comparison, in the legend's order).  Tests and readers of the SVG find them there.
"""

from __future__ import annotations

import html
import io
import math
import re
import unicodedata
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.artist import Artist
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

INSTALL_PLOTS = "pip install 'pytest-llmmerge[html]'"
_OUTCOMES = ("passed", "failed", "skipped", "xfailed")
_MAX_PLOT_ROWS = 60  # tensors or documents in one plot; the tables below the plots list them all
_KL_COLOR, _PPL_COLOR, _FAIL_COLOR, _PASS_COLOR, _MUTED_COLOR = "#2f6fdf", "#e07b00", "#cf222e", "#1a7f37", "#8c959f"
_SERIES_COLORS = ("#2f6fdf", "#e07b00", "#1a7f37", "#8250df", "#cf222e", "#0a7ea4", "#bf8700", "#57606a")
# Merge-diagnosis verdicts that mean the merge is right (up to the storage dtype's rounding).
_GOOD_VERDICTS = {"exact": _PASS_COLOR, "rounded": "#0a7ea4", "untouched": _MUTED_COLOR}
_STOPS_THERE = {True: "yes", False: "no", None: "(no end-of-turn token)"}


@dataclass(frozen=True)
class _Section:
    key: str  # the anchor the navigation links to
    title: str
    body: str


def render(report: Mapping[str, Any]) -> str:
    """The report (report.build's dict) as one HTML page that needs no network."""
    items = _items(report)
    settings = _mapping(report.get("settings"))
    plots = _plots_available()
    sections = [section for section in (
        _failures_section(items),
        _parity_section(items, plots),
        _suite_section(items),
        _baseline_section(items),
        _weights_section(items, settings, plots),
        _diagnosis_section(items, settings, plots),
        _documents_section(items, plots),
        _stop_sets_section(items),
        _items_section(items),
    ) if section is not None]
    passed, headline = _verdict(report)
    title = f"pytest-llmmerge: {headline}"
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n",
        f"<title>{_text(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n",
        _header(report, passed, headline, plots),
        _navigation(sections),
        "<main class=\"wrap\">\n",
        "".join(f"<section id=\"{s.key}\">\n<h2>{_text(s.title)}</h2>\n{s.body}</section>\n" for s in sections),
        "</main>\n",
        _footer(report),
        f"<script>{_SCRIPT}</script>\n</body>\n</html>\n",
    ])


# --- reading the report defensively: a skipped or failed item may lack any figure ---------------

def _items(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    found = report.get("items")
    return [i for i in found if isinstance(i, Mapping)] if isinstance(found, list) else []


def _mapping(found: Any) -> Mapping[str, Any]:
    return found if isinstance(found, Mapping) else {}


def _list(found: Any) -> list[Any]:
    return found if isinstance(found, list) else []


def _metrics(item: Mapping[str, Any]) -> Mapping[str, Any]:
    return _mapping(item.get("metrics"))


def _number(value: Any) -> float | None:
    """A finite number, or None: the JSON report writes NaN and Inf as strings."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _count(summary: Mapping[str, Any], key: str) -> int:
    value = summary.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _outcome(item: Mapping[str, Any]) -> str:
    return str(item.get("outcome") or "unknown")


def _kind(item: Mapping[str, Any]) -> str:
    return str(item.get("kind") or "test")


def _run(item: Mapping[str, Any]) -> str:
    """The variant and backend an item ran on, as its node id's parameter writes them."""
    parts = [str(item[key]) for key in ("variant", "backend") if item.get(key)]
    return "-".join(parts)


def _short(nodeid: str) -> str:
    """The node id less the suite file's directory (a parameter may hold a slash: keep it)."""
    path, sep, rest = nodeid.partition("::")
    return path.rsplit("/", 1)[-1] + sep + rest


def _case(item: Mapping[str, Any]) -> str:
    """A suite case's node id without its [variant-backend] parameter: one row per case."""
    nodeid = str(item.get("nodeid", ""))
    suffix = f"[{_run(item)}]"
    return _short(nodeid.removesuffix(suffix) if _run(item) else nodeid)


# --- HTML pieces ---------------------------------------------------------------------------------

def _text(value: Any) -> str:
    """Escaped for text and attribute values alike: outputs and messages come from models and users."""
    return "" if value is None else html.escape(str(value), quote=True)


def _figure(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_figure(v) for v in value)
    return str(value)


def _cell(value: Any) -> str:
    return _text(_figure(value))


def _code(value: Any) -> str:
    return f"<code>{_text(value)}</code>"


def _badge(outcome: str) -> str:
    return f"<span class=\"badge o-{_text(outcome)}\">{_text(outcome)}</span>"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, numeric: Iterable[int] = (),
           css: str = "") -> str:
    """A table whose cells are HTML already escaped; columns in `numeric` align right."""
    right = set(numeric)

    def attributes(n: int) -> str:
        return ' class="num"' if n in right else ""

    head = "".join(f"<th{attributes(n)}>{_text(h)}</th>" for n, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td{attributes(n)}>{cell}</td>" for n, cell in enumerate(row)) + "</tr>\n"
                   for row in rows)
    return (f"<div class=\"scroll\"><table class=\"{css}\"><thead><tr>{head}</tr></thead>\n"
            f"<tbody>{body}</tbody></table></div>\n")


def _message(item: Mapping[str, Any], summary: str = "message") -> str:
    message = item.get("message")
    if not message:
        return ""
    return f"<details><summary>{_text(summary)}</summary><pre>{_text(message)}</pre></details>"


def _figures_table(table: str, plots: bool) -> str:
    """The plotted figures as a table: folded under a plot, open where no plot could be drawn."""
    return f"<details{'' if plots else ' open'}><summary>figures as a table</summary>{table}</details>\n"


# --- the page's frame ----------------------------------------------------------------------------

def _verdict(report: Mapping[str, Any]) -> tuple[bool, str]:
    """Passed only when no item failed and pytest exited 0 (a collection error fails no item); a
    report whose summary does not say so passes nothing."""
    summary = _mapping(report.get("summary"))
    passed = summary.get("failed") == 0 and summary.get("exit_status") == 0
    return passed, "passed" if passed else "gated: do not ship"


def _header(report: Mapping[str, Any], passed: bool, headline: str, plots: bool) -> str:
    summary = _mapping(report.get("summary"))
    settings = _mapping(report.get("settings"))
    counts = " · ".join(f"<span class=\"count o-{key}\">{_count(summary, key)} {key}</span>" for key in _OUTCOMES)
    exit_status = summary.get("exit_status")
    extra = f", pytest exit status {_text(exit_status)}" if exit_status not in (0, None) else ""
    subject = [f"model {_code(settings.get('model'))}"] if settings.get("model") else []
    if settings.get("base"):
        subject.append(f"base {_code(settings.get('base'))}")
    adapters = settings.get("adapters")
    if isinstance(adapters, list) and adapters:
        subject.append("adapters " + ", ".join(_code(a) for a in adapters))
    notice = "" if plots else (
        "<p class=\"notice\">Plots need matplotlib, which is not installed: "
        f"<code>{_text(INSTALL_PLOTS)}</code>. The figures are shown as tables.</p>\n")
    return (f"<header class=\"verdict {'v-pass' if passed else 'v-fail'}\"><div class=\"wrap\">\n"
            f"<p class=\"eyebrow\">pytest-llmmerge report · {_text(report.get('created', ''))}</p>\n"
            f"<h1 id=\"verdict\">{_text(headline)}</h1>\n"
            f"<p class=\"counts\">{counts} <span class=\"muted\">({_count(summary, 'items')} items, "
            f"{_count(summary, 'model_loads')} model loads{extra})</span></p>\n"
            f"<p class=\"subject\">{' · '.join(subject)}</p>\n{notice}</div></header>\n")


def _navigation(sections: Sequence[_Section]) -> str:
    links = "".join(f"<a href=\"#{s.key}\">{_text(s.title)}</a>" for s in sections)
    return f"<nav><div class=\"wrap\">{links}</div></nav>\n"


def _footer(report: Mapping[str, Any]) -> str:
    versions = _mapping(report.get("versions"))
    workers = _mapping(report.get("workers"))
    settings = _mapping(report.get("settings"))
    rows = [[_code(label), _cell(stats.get("loads")), _cell(_number(stats.get("load_seconds"))),
             _cell(stats.get("requests")), _cell(stats.get("kills")), _cell(stats.get("deaths"))]
            for label, stats in workers.items() if isinstance(stats, Mapping)]
    loads = _table(["worker", "loads", "load seconds", "requests", "killed at a deadline", "died"], rows,
                   numeric=(1, 2, 3, 4, 5)) if rows else ""
    given = [[_code(key), _cell(value)] for key, value in settings.items()
             if value is not None and value is not False and value != [] and value != ""]
    return ("<footer class=\"wrap\">\n"
            + (f"<details><summary>model loads per worker</summary>{loads}</details>\n" if loads else "")
            + (f"<details><summary>settings</summary>{_table(['setting', 'value'], given)}</details>\n"
               if given else "")
            + f"<p class=\"muted\">{_text(', '.join(f'{k} {v}' for k, v in versions.items()))}"
            + f" · schema {_text(report.get('schema', ''))}</p>\n</footer>\n")


# --- sections ------------------------------------------------------------------------------------

def _failures_section(items: Sequence[Mapping[str, Any]]) -> _Section | None:
    failed = [(n, i) for n, i in enumerate(items) if _outcome(i) == "failed"]
    if not failed:
        return None
    entries = []
    for n, item in failed:
        lines = [line.strip() for line in str(item.get("message") or "").splitlines() if line.strip()]
        first = lines[0] if lines else "(no message)"
        # A message that opens with "...:" lists its reasons below: the first one says most.
        reason = lines[1].removeprefix("- ") if len(lines) > 1 and first.endswith(":") else ""
        entries.append(f"<li><a href=\"#item-{n}\">{_code(_short(str(item.get('nodeid', ''))))}</a> "
                       f"{_text(first[:240])}<div class=\"reason\">{_text(reason[:400])}</div>"
                       f"{_message(item, 'the whole message')}</li>\n")
    return _Section("failures", f"Failures ({len(failed)})", f"<ul class=\"failures\">\n{''.join(entries)}</ul>\n")


def _ratio(metrics: Mapping[str, Any], name: str) -> float | None:
    """measured / limit of one comparison figure (kl_mean or log_ppl): below 1 passes."""
    ratio = _number(metrics.get(f"{name}_ratio"))
    if ratio is None:
        value, limit = _number(metrics.get(name)), _number(metrics.get(f"{name}_limit"))
        ratio = abs(value) / limit if value is not None and limit else None
    return ratio


def _comparisons(items: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Parity and agreement items, and any other item with a calibrated limit (baseline::perplexity)."""
    return [i for i in items if _kind(i) in ("parity", "agreement")
            or any(key in _metrics(i) for key in ("kl_mean_ratio", "log_ppl_ratio"))]


def _parity_section(items: Sequence[Mapping[str, Any]], plots: bool) -> _Section | None:
    comparisons = _comparisons(items)
    if not comparisons:
        return None
    points = [(_short(str(i.get("nodeid", ""))), _outcome(i), _ratio(_metrics(i), "kl_mean"),
               _ratio(_metrics(i), "log_ppl")) for i in comparisons]
    plot = _plot("parity", "Parity margins: measured / limit per comparison",
                 (8.0, 1.4 + 0.42 * len(points)), lambda fig: _draw_parity(fig, points), plots,
                 drawn=any(p[2] is not None or p[3] is not None for p in points))
    rows = [[_code(_short(str(i.get("nodeid", "")))) + _message(i), _badge(_outcome(i))]
            + [_cell(_metrics(i).get(key)) for key in ("kl_mean", "kl_mean_noise", "kl_mean_limit")]
            + [_cell(_ratio(_metrics(i), "kl_mean"))]
            + [_cell(_metrics(i).get(key)) for key in ("log_ppl_shift", "log_ppl_limit")]
            + [_cell(_ratio(_metrics(i), "log_ppl")), _cell(_metrics(i).get("greedy_equal"))] for i in comparisons]
    table = _table(["item", "outcome", "KL mean", "KL noise", "KL limit", "KL / limit", "log-ppl shift",
                    "log-ppl limit", "ppl / limit", "greedy equal"], rows, numeric=range(2, 10))
    intro = ("<p class=\"lead\">Each limit is max(floor, factor × the noise that the dtype and backend alone "
             "cause); a ratio below 1 passes. Ratios of 0 are drawn at the left edge.</p>\n")
    return _Section("parity", "Parity margins", intro + plot + _figures_table(table, plots))


def _suite_section(items: Sequence[Mapping[str, Any]]) -> _Section | None:
    suites = [i for i in items if _kind(i) == "suite"]
    if not suites:
        return None
    runs = sorted({_run(i) for i in suites})
    cases = list(dict.fromkeys(_case(i) for i in suites))
    by_cell = {(_case(i), _run(i)): i for i in suites}
    rows = [[_code(case)] + [_suite_cell(by_cell.get((case, run))) for run in runs] for case in cases]
    totals = []
    for run in runs:
        mine = [i for i in suites if _run(i) == run]
        stopped = sum(1 for i in mine if _metrics(i).get("finish_reason") == "stop")
        passed = sum(1 for i in mine if _outcome(i) == "passed")
        totals.append(f"<strong>{passed}/{len(mine)} passed</strong><br><span class=\"muted\">{stopped} stopped "
                      "at eos</span>")
    rows.append(["<strong>all cases</strong>", *totals])
    intro = "<p class=\"lead\">One row per case, one column per variant and backend.</p>\n"
    return _Section("suite", "Suite outcomes per variant and backend",
                    intro + _table(["case", *runs], rows, css="grid"))


def _suite_cell(item: Mapping[str, Any] | None) -> str:
    if item is None:
        return "<span class=\"muted\">not run</span>"
    metrics = _metrics(item)
    facts = [str(f) for f in (metrics.get("finish_reason"),) if f]
    if metrics.get("new_tokens") is not None:
        facts.append(f"{_figure(metrics.get('new_tokens'))} tokens")
    output = metrics.get("output_text")
    shown = (f"<details><summary>output</summary><pre>{_text(output)}</pre></details>"
             if isinstance(output, str) else "")
    return (f"<div class=\"cell\" data-run=\"{_text(_run(item))}\" data-outcome=\"{_text(_outcome(item))}\">"
            f"{_badge(_outcome(item))} <span class=\"muted\">{_text(' · '.join(facts))}</span>"
            f"{shown}{_message(item, 'why')}</div>")


def _baseline_section(items: Sequence[Mapping[str, Any]]) -> _Section | None:
    found = [i for i in items if _kind(i) == "baseline"]
    if not found:
        return None
    perplexity = [i for i in found if "ppl_baseline" in _metrics(i) or _metrics(i).get("measure") == "perplexity"]
    provenance = [i for i in found if any(k in _metrics(i) for k in ("provenance_differences", "gone_cases",
                                                                       "new_cases"))]
    cases = [i for i in found if i not in perplexity and i not in provenance]
    body = [_baseline_cases(cases) if cases else "", _baseline_perplexity(perplexity) if perplexity else ""]
    body += [_provenance(i) for i in provenance]
    return _Section("baseline", "Against the baseline", "".join(body))


def _baseline_cases(cases: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for item in cases:
        m = _metrics(item)
        greedy = str(m.get("greedy") or "")
        css = "same" if greedy == "equal" else "differs"
        rows.append([
            _code(_case(item)) + f"<div class=\"muted\">{_text(_run(item))}</div>" + _message(item, "why"),
            _badge(_outcome(item)), f"<span class=\"greedy {css}\">{_text(greedy)}</span>",
            _cell(m.get("divergence")),
            f"{_cell(m.get('baseline_new_tokens'))} → {_cell(m.get('new_tokens'))}",
            f"{_cell(m.get('baseline_finish_reason'))} → {_cell(m.get('finish_reason'))}",
            _cell(m.get("growth")),
            f"<pre class=\"out\">{_text(m.get('baseline_text', ''))}</pre>",
            f"<pre class=\"out {css}\">{_text(m.get('output_text', ''))}</pre>",
        ])
    intro = ("<p class=\"lead\">Each case's greedy output in the baseline and now, side by side; divergence is "
             "the first token where they part.</p>\n")
    return intro + _table(["case", "outcome", "greedy", "divergence", "tokens", "finish", "growth",
                           "baseline output", "output now"], rows, numeric=(3, 6), css="side-by-side")


def _baseline_perplexity(found: Sequence[Mapping[str, Any]]) -> str:
    rows = [[_code(_short(str(i.get("nodeid", "")))), _badge(_outcome(i))]
            + [_cell(_metrics(i).get(key)) for key in ("ppl_baseline", "ppl_now", "log_ppl_shift", "kl_mean",
                                                        "kl_mean_limit")]
            + [_cell(_ratio(_metrics(i), "kl_mean")), _cell(_ratio(_metrics(i), "log_ppl")),
               _cell(_metrics(i).get("documents"))] for i in found]
    return ("<h3>Perplexity against the baseline</h3>\n"
            + _table(["item", "outcome", "ppl baseline", "ppl now", "log-ppl shift", "KL mean", "KL limit",
                      "KL / limit", "ppl / limit", "documents"], rows, numeric=range(2, 10)))


def _provenance(item: Mapping[str, Any]) -> str:
    m = _metrics(item)
    differences = [str(d) for d in _list(m.get("provenance_differences"))]
    listed = "".join(f"<li>{_text(d)}</li>" for d in differences) or "<li class=\"muted\">none</li>"
    parts = [f"<h3>Provenance {_badge(_outcome(item))}</h3>\n",
             f"<p>What changed since the baseline was saved:</p>\n<ul class=\"provenance\">{listed}</ul>\n"]
    for key, label in (("new_cases", "new cases (not in the baseline)"), ("gone_cases", "gone cases (in the baseline, "
                                                                                      "not run now)")):
        names = [str(n) for n in _list(m.get(key))]
        entries = "".join(f"<li>{_code(_short(n))}</li>" for n in names)
        parts.append(f"<details class=\"{key.replace('_', '-')}\"><summary>{len(names)} {_text(label)}</summary>"
                     f"<ul>{entries}</ul></details>\n" if names else f"<p class=\"muted\">no {_text(label)}</p>\n")
    return "".join(parts)


def _weight_changes(items: Sequence[Mapping[str, Any]]) -> list[tuple[str, float | None]]:
    """The per-layer relative change against the base, in layer order (numbers compared as numbers)."""
    found = next((_metrics(i) for i in items if any(str(k).startswith("weight_change:") for k in _metrics(i))), {})
    rows = [(str(key).split(":", 1)[1], _number(value)) for key, value in found.items()
            if str(key).startswith("weight_change:")]
    return sorted(rows, key=lambda row: [(0, int(p), "") if p.isdigit() else (1, 0, p)
                                         for p in re.split(r"(\d+)", row[0])])


def _weights_section(items: Sequence[Mapping[str, Any]], settings: Mapping[str, Any], plots: bool) -> _Section | None:
    rows = _weight_changes(items)
    if not rows:
        return None
    limit = _number(settings.get("max_weight_change"))
    plot = _plot("weights", "Relative change against the base, per layer", (8.0, 1.2 + 0.3 * len(rows)),
                 lambda fig: _draw_weights(fig, rows, limit), plots, drawn=any(v is not None for _, v in rows))
    table = _table(["layer", "‖W − W_base‖ / ‖W_base‖"],
                   [[_code(name), _cell(value)] for name, value in rows], numeric=(1,))
    limit_text = f" The limit (--llm-max-weight-change) is {limit:.4g}." if limit is not None else ""
    intro = f"<p class=\"lead\">‖W − W_base‖ / ‖W_base‖ for each layer.{_text(limit_text)}</p>\n"
    return _Section("weights", "Per-layer weight change", intro + plot + _figures_table(table, plots))


def _diagnosis_section(items: Sequence[Mapping[str, Any]], settings: Mapping[str, Any],
                       plots: bool) -> _Section | None:
    found = next((_metrics(i) for i in items if "merge_diagnosis" in _metrics(i)
                  or "merge_diagnosis_modules" in _metrics(i)), None)
    if found is None:
        return None
    modules = [row for row in _list(found.get("merge_diagnosis_modules")) if isinstance(row, Mapping)]
    limit = _number(settings.get("audit_max_error"))
    plot = _plot("diagnosis", "Merge diagnosis per tensor", (9.0, 1.5 + 0.26 * min(len(modules), _MAX_PLOT_ROWS)),
                 lambda fig: _draw_diagnosis(fig, modules, limit), plots,
                 drawn=any(_number(row.get("error")) is not None for row in modules))
    rows = [[_code(row.get("tensor")), _cell(row.get("verdict")), _cell(row.get("error")), _cell(row.get("floor")),
             _text(", ".join(f"{f:.4g}" for f in _list(row.get("factors")) if _number(f) is not None)),
             _cell(row.get("correlation")), _text("; ".join(str(h) for h in _list(row.get("hints"))))]
            for row in modules]
    table = _table(["tensor", "verdict", "share of the update lost", "rounding floor", "factor per adapter",
                    "correlation", "hints"], rows, numeric=(2, 3, 5))
    sentence = f"<p class=\"diagnosis\"><strong>{_text(found.get('merge_diagnosis', ''))}</strong></p>\n"
    intro = ("<p class=\"lead\">Per adapted tensor: the share of the adapters' update the merged weight lost, "
             "‖W − (W_base + ΔW)‖ / ‖ΔW‖, and the factor each adapter's update was applied with "
             "(1 is right).</p>\n")
    return _Section("diagnosis", "Merge diagnosis", sentence + intro + plot + _figures_table(table, plots))


def _document_series(items: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[tuple[str, float | None]]]]:
    series = []
    for item in items:
        found = _metrics(item).get("kl_per_document")
        if isinstance(found, list) and found:
            points = [(str(d.get("document", "")), _number(d.get("kl"))) for d in found if isinstance(d, Mapping)]
            series.append((_short(str(item.get("nodeid", ""))), points))
    return series


def _documents_section(items: Sequence[Mapping[str, Any]], plots: bool) -> _Section | None:
    series = _document_series(items)
    if not series:
        return None
    documents = list(dict.fromkeys(doc for _, points in series for doc, _ in points))
    plot = _plot("documents", "Mean KL per document", (8.0, 1.6 + 0.3 * min(len(documents), _MAX_PLOT_ROWS)),
                 lambda fig: _draw_documents(fig, series, documents), plots,
                 drawn=any(kl is not None for _, points in series for _, kl in points))
    values = [{doc: kl for doc, kl in points} for _, points in series]
    rows = [[f"<span class=\"doc\">{_text(doc)}</span>"] + [_cell(v.get(doc)) for v in values] for doc in documents]
    table = _table(["document", *(name for name, _ in series)], rows, numeric=range(1, len(series) + 1))
    intro = "<p class=\"lead\">Mean per-token KL of each corpus document, for every comparison that measured it.</p>\n"
    return _Section("documents", "KL per document", intro + plot + _figures_table(table, plots))


def _stop_sets_section(items: Sequence[Mapping[str, Any]]) -> _Section | None:
    found = next((_metrics(i)["stop_sets"] for i in items if isinstance(_metrics(i).get("stop_sets"), list)), None)
    if not found:
        return None
    rows = [[_text(row.get("path")), _cell(row.get("stop_ids")), _text(row.get("source")),
             f"{_code(row.get('end_of_turn'))} {_cell(row.get('end_of_turn_id'))}",
             _text(_STOPS_THERE.get(row.get("stops_at_end_of_turn"), row.get("stops_at_end_of_turn")))]
            for row in found if isinstance(row, Mapping)]
    intro = ("<p class=\"lead\">The token ids each serving path stops at, and whether the chat template's "
             "end-of-turn token is one of them.</p>\n")
    return _Section("stop-sets", "Stop sets", intro + _table(["path", "stops at", "from", "end-of-turn",
                                                              "stops there"], rows))


def _items_section(items: Sequence[Mapping[str, Any]]) -> _Section:
    present = list(dict.fromkeys([*_OUTCOMES, *(_outcome(i) for i in items)]))
    boxes = "".join(f"<label><input type=\"checkbox\" class=\"outcome-filter\" value=\"{_text(o)}\" checked> "
                    f"{_badge(o)} {sum(1 for i in items if _outcome(i) == o)}</label>" for o in present)
    controls = ("<div class=\"controls\"><input id=\"filter\" type=\"search\" autocomplete=\"off\" "
                "placeholder=\"filter by node id, kind or outcome\" aria-label=\"filter the items\">"
                f"{boxes}<span id=\"shown\" class=\"muted\"></span></div>\n")
    rows = "".join(_item_row(n, item) for n, item in enumerate(items))
    table = ("<div class=\"scroll\"><table id=\"items\"><thead><tr><th>node id</th><th>kind</th><th>outcome</th>"
             "<th>variant-backend</th><th class=\"num\">seconds</th><th>details</th></tr></thead>\n"
             f"<tbody>\n{rows}</tbody></table></div>\n")
    return _Section("all-items", f"All items ({len(items)})", controls + table)


def _item_row(n: int, item: Mapping[str, Any]) -> str:
    nodeid, kind, outcome, run = str(item.get("nodeid", "")), _kind(item), _outcome(item), _run(item)
    search = " ".join((nodeid, kind, outcome, run)).lower()
    findings = [f for f in _list(item.get("findings")) if isinstance(f, Mapping)]
    listed = "".join(f"<li>{_code(f.get('code'))} {_text(f.get('severity'))}: {_text(f.get('message'))}</li>"
                     for f in findings)
    scalars = [(k, v) for k, v in _metrics(item).items() if isinstance(v, (str, int, float, bool)) or v is None]
    figures = "".join(f"<tr><th>{_text(k)}</th><td>{_text(_figure(v)[:300])}</td></tr>" for k, v in scalars)
    details = (_message(item, "failure" if outcome == "failed" else "reason")
               + (f"<ul class=\"findings\">{listed}</ul>" if listed else "")
               + (f"<details><summary>figures ({len(scalars)})</summary><table class=\"kv\">{figures}</table>"
                  "</details>" if scalars else ""))
    return (f"<tr id=\"item-{n}\" data-outcome=\"{_text(outcome)}\" data-search=\"{_text(search)}\">"
            f"<td>{_code(nodeid)}</td><td>{_text(kind)}</td><td>{_badge(outcome)}</td><td>{_text(run)}</td>"
            f"<td class=\"num\">{_cell(_number(item.get('seconds')))}</td><td>{details}</td></tr>\n")


# --- plots: matplotlib's SVG, inlined ------------------------------------------------------------

def _plots_available() -> bool:
    """Whether matplotlib imports; it is an optional extra, never imported with the package."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plot(name: str, title: str, size: tuple[float, float], draw: Callable[[Figure], None], plots: bool, *,
          drawn: bool) -> str:
    """The figure `draw` makes, inlined as SVG, or a line that says why there is none."""
    if not plots:
        return f"<p class=\"no-plot\">plot not drawn: it needs matplotlib ({_text(INSTALL_PLOTS)})</p>\n"
    if not drawn:
        return "<p class=\"no-plot\">nothing to plot: no item recorded these figures</p>\n"
    try:
        svg = _svg(name, title, size, draw)
    except Exception as exc:  # odd figures must not cost the whole page: the table below still has them
        return f"<p class=\"no-plot\">plot not drawn: {_text(type(exc).__name__)}: {_text(exc)}</p>\n"
    return f"<figure class=\"plot\" id=\"plot-{name}\">{svg}<figcaption>{_text(title)}</figcaption></figure>\n"


def _svg(name: str, title: str, size: tuple[float, float], draw: Callable[[Figure], None]) -> str:
    import matplotlib
    from matplotlib.figure import Figure

    # A bare Figure draws without pyplot, so the backend a user's own tests chose stays as it is.
    # The hash salt makes the SVG's generated ids depend on the plot, not on the moment.
    # svg.fonttype none: text stays text, drawn with the browser's fonts, and no glyph is embedded.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": name, "font.size": 9, "legend.fontsize": 8,
                                "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False}), \
            warnings.catch_warnings():
        # Labels may hold CJK text the bundled font lacks; the browser draws it with its own fonts.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
        figure = Figure(figsize=size, layout="constrained")
        draw(figure)
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    return _inline(buffer.getvalue(), name, title)


_TAG = re.compile(r"<[^<>]+>")
_ID = re.compile(r"""(\bid=)(["'])""")
_LINK = re.compile(r"""(href=["']|url\()#""")


def _inline(svg: str, name: str, title: str) -> str:
    """matplotlib's SVG document as an element of the page: no XML prolog, no metadata (it names
    web addresses), and every id prefixed with the plot's name, so ids stay unique across plots."""
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    svg = re.sub(r"<!--.*?-->\s*", "", svg, flags=re.S)

    def prefixed(tag: re.Match[str]) -> str:
        text = _ID.sub(lambda m: f"{m.group(1)}{m.group(2)}{name}-", tag.group(0))
        return _LINK.sub(lambda m: f"{m.group(1)}#{name}-", text)

    # Only inside tags: matplotlib escapes text, so no tag starts inside a label.
    svg = _TAG.sub(prefixed, svg)
    return svg.replace("<svg ", f"<svg data-plot=\"{name}\" role=\"img\" aria-label=\"{_text(title)}\" ", 1)


def _label(text: str, width: int = 48) -> str:
    """A tick label at most `width` columns wide (a CJK character takes two), with $ escaped:
    it would start matplotlib's math mode."""
    text = " ".join(text.split())
    columns = [2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text]
    if sum(columns) > width:
        kept = next(n for n in range(len(text)) if sum(columns[:n + 1]) > width - 1)
        text = text[:kept] + "…"
    return text.replace("$", r"\$")


def _log_floor(values: Iterable[float | None]) -> float:
    """Where a 0 sits on a log axis: a decade below the smallest positive value."""
    positive = [v for v in values if v is not None and v > 0]
    return min(positive) / 10 if positive else 1e-12


def _draw_parity(figure: Figure, points: Sequence[tuple[str, str, float | None, float | None]]) -> None:
    ax = figure.add_subplot()
    ratios = [r for _, _, kl, ppl in points for r in (kl, ppl) if r is not None]
    floor = _log_floor(ratios)
    for series, column, offset, marker, color, label in (("kl", 2, -0.14, "o", _KL_COLOR, "KL mean / limit"),
                                                          ("ppl", 3, 0.14, "D", _PPL_COLOR,
                                                           "|log-ppl shift| / limit")):
        shown = [(max(float(p[column] or 0.0), floor), y + offset) for y, p in enumerate(points)
                 if p[column] is not None]
        if shown:
            xs, ys = zip(*shown)
            ax.scatter(xs, ys, marker=marker, s=36, color=color, label=label, gid=series, zorder=3)
    right = max([*ratios, 1.0]) * 10
    ax.axvspan(1.0, right, color=_FAIL_COLOR, alpha=0.06, gid="fails")
    ax.axvline(1.0, color=_FAIL_COLOR, linestyle="--", linewidth=1.2, gid="limit", label="limit (ratio 1)")
    ax.set_xscale("log")
    ax.set_xlim(floor / 3, right)
    _category_axis(ax, [_label(p[0]) for p in points], [p[1] == "failed" for p in points])
    ax.set_xlabel("measured / limit (log scale): right of the dashed line fails")
    ax.grid(axis="x", alpha=0.25)
    figure.legend(loc="outside lower center", ncols=3)


def _category_axis(ax: Axes, labels: Sequence[str], failed: Sequence[bool] = ()) -> None:
    """One row per label, the first on top; failed rows' labels in red."""
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    for tick, bad in zip(ax.get_yticklabels(), failed):
        if bad:
            tick.set_color(_FAIL_COLOR)


def _draw_weights(figure: Figure, rows: Sequence[tuple[str, float | None]], limit: float | None) -> None:
    from matplotlib.collections import PolyCollection

    ax = figure.add_subplot()
    bars = [(y, value) for y, (_, value) in enumerate(rows) if value is not None]
    over = [limit is not None and value is not None and value > limit for _, value in rows]
    # One collection: one group in the SVG (id weights-change) with a path per layer.
    ax.add_collection(PolyCollection([[(0, y - 0.35), (v, y - 0.35), (v, y + 0.35), (0, y + 0.35)] for y, v in bars],
                                     facecolors=[_FAIL_COLOR if over[y] else _KL_COLOR for y, _ in bars],
                                     gid="change"))
    top = max([v for _, v in bars] + [limit or 0.0]) or 1.0
    for y, value in bars:
        ax.text(value + top * 0.01, y, f"{value:.3g}", va="center", fontsize=8, color="#24292f")
    if limit is not None:
        ax.axvline(limit, color=_FAIL_COLOR, linestyle="--", linewidth=1.2, gid="limit", label="limit")
        figure.legend(loc="outside lower center")
    ax.set_xlim(0, top * 1.15)
    _category_axis(ax, [_label(name) for name, _ in rows], over)
    ax.set_xlabel("‖W − W_base‖ / ‖W_base‖")
    ax.grid(axis="x", alpha=0.25)


def _worst_modules(modules: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The tensors worth a row when there are too many: the largest losses, in their own order."""
    if len(modules) <= _MAX_PLOT_ROWS:
        return list(modules)
    def loss(n: int) -> float:
        error = _number(modules[n].get("error"))
        return -math.inf if error is None else error

    ranked = sorted(range(len(modules)), key=loss, reverse=True)
    return [modules[n] for n in sorted(ranked[:_MAX_PLOT_ROWS])]


def _tensor_label(tensor: Any) -> str:
    return _label(str(tensor).removeprefix("model.").removesuffix(".weight"), 40)


def _draw_diagnosis(figure: Figure, modules: Sequence[Mapping[str, Any]], limit: float | None) -> None:
    from matplotlib.lines import Line2D

    shown = _worst_modules(modules)
    has_factors = any(_list(row.get("factors")) for row in shown)
    if has_factors:
        ax, factors_ax = figure.subplots(1, 2, sharey=True, width_ratios=(3, 2))
    else:
        ax = figure.add_subplot()
    errors = [_number(row.get("error")) for row in shown]
    floors = [_number(row.get("floor")) for row in shown]
    low = _log_floor([*errors, *floors])
    colors = [_GOOD_VERDICTS.get(str(row.get("verdict")), _FAIL_COLOR) for row in shown]
    plotted = [(max(e, low), y, c) for y, (e, c) in enumerate(zip(errors, colors)) if e is not None]
    if plotted:
        xs, ys, cs = zip(*plotted)
        ax.scatter(xs, ys, c=list(cs), s=30, gid="error", zorder=3)
    floor_points = [(max(f, low), y) for y, f in enumerate(floors) if f is not None]
    if floor_points:
        xs, ys = zip(*floor_points)
        ax.scatter(xs, ys, marker="|", s=90, color=_MUTED_COLOR, gid="floor", zorder=2)
    if limit is not None:
        ax.axvline(limit, color=_FAIL_COLOR, linestyle="--", linewidth=1.2, gid="limit")
    ax.set_xscale("log")
    ax.set_xlabel("share of the update lost (log scale)")
    ax.grid(axis="x", alpha=0.25)
    _category_axis(ax, [_tensor_label(row.get("tensor")) for row in shown],
                   [str(row.get("verdict")) not in _GOOD_VERDICTS for row in shown])
    verdicts = list(dict.fromkeys(str(row.get("verdict")) for row in shown))
    handles: list[Artist] = [Line2D([], [], marker="o", linestyle="", color=_GOOD_VERDICTS.get(v, _FAIL_COLOR), label=v)
               for v in verdicts]
    handles.append(Line2D([], [], marker="|", linestyle="", markersize=9, color=_MUTED_COLOR, label="rounding floor"))
    if limit is not None:
        handles.append(Line2D([], [], linestyle="--", color=_FAIL_COLOR, label="--llm-audit-max-error"))
    if has_factors:
        handles += _draw_factors(factors_ax, shown)
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5))


def _draw_factors(ax: Axes, shown: Sequence[Mapping[str, Any]]) -> list[Artist]:
    """The factor each adapter's update was applied with, per tensor (1 is a right merge); the
    legend's entries."""
    adapters: dict[str, list[tuple[float, int]]] = {}
    for y, row in enumerate(shown):
        names = _list(row.get("adapters"))
        for k, factor in enumerate(_list(row.get("factors"))):
            value = _number(factor)
            if value is not None:
                adapters.setdefault(str(names[k] if k < len(names) else k + 1), []).append((value, y))
    spread = 0.3 / max(len(adapters), 1)
    handles: list[Artist] = []
    for k, (adapter, points) in enumerate(adapters.items()):
        offset = (k - (len(adapters) - 1) / 2) * spread
        handles.append(ax.scatter([x for x, _ in points], [y + offset for _, y in points], s=22,
                                  gid=f"factor-{adapter}", color=_SERIES_COLORS[k % len(_SERIES_COLORS)],
                                  label=f"adapter {adapter}", zorder=3))
    ax.axvline(1.0, color=_MUTED_COLOR, linestyle="--", linewidth=1.0, gid="factor-one")
    # At least 0.9 to 1.1: a right merge's factors differ from 1 by rounding, which is no finding.
    values = [x for points in adapters.values() for x, _ in points]
    ax.set_xlim(min([0.9, *values]) - 0.02, max([1.1, *values]) + 0.02)
    ax.ticklabel_format(axis="x", useOffset=False)
    ax.set_xlabel("factor per adapter (1 is right)")
    ax.grid(axis="x", alpha=0.25)
    return handles


def _draw_documents(figure: Figure, series: Sequence[tuple[str, Sequence[tuple[str, float | None]]]],
                    documents: Sequence[str]) -> None:
    ax = figure.add_subplot()
    shown = list(documents[:_MAX_PLOT_ROWS])
    row = {doc: y for y, doc in enumerate(shown)}
    low = _log_floor(kl for _, points in series for _, kl in points)
    markers = "osD^vP*X"
    for n, (name, points) in enumerate(series):
        drawn = [(max(kl, low), row[doc]) for doc, kl in points if kl is not None and doc in row]
        if drawn:
            xs, ys = zip(*drawn)
            ax.plot(xs, ys, linestyle="none", marker=markers[n % len(markers)], markersize=5, alpha=0.85,
                    color=_SERIES_COLORS[n % len(_SERIES_COLORS)], label=_label(name, 60), gid=f"kl-{n}")
    ax.set_xscale("log")
    ax.set_xlabel("mean per-token KL (log scale)")
    ax.grid(axis="x", alpha=0.25)
    _category_axis(ax, [f"{y + 1}. {_label(doc, 32)}" for y, doc in enumerate(shown)])
    figure.legend(loc="outside lower center", ncols=min(len(series), 3))


# --- the page's style and its one script ---------------------------------------------------------

_CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg: #f6f8fa; --pass: #1a7f37; --fail: #cf222e;
  --skip: #59636e; --xfail: #9a6700; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff; line-height: 1.45;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "Helvetica Neue", Arial, sans-serif; }
code, pre { font-family: ui-monospace, SFMono-Regular, "DejaVu Sans Mono", Menlo, Consolas, monospace;
  font-size: 12.5px; }
pre { white-space: pre-wrap; word-break: break-word; margin: 4px 0; }
.wrap { max-width: 1240px; margin: 0 auto; padding: 0 24px; }
header.verdict { padding: 22px 0 16px; color: #fff; }
header.v-pass { background: linear-gradient(135deg, #1a7f37, #116329); }
header.v-fail { background: linear-gradient(135deg, #cf222e, #a40e26); }
header h1 { margin: 2px 0 6px; font-size: 30px; letter-spacing: -0.01em; }
header .eyebrow { margin: 0; opacity: 0.85; font-size: 13px; text-transform: uppercase; letter-spacing: 0.06em; }
header .counts { margin: 0 0 4px; font-size: 15px; }
header .counts .count { font-weight: 600; }
header .muted, header .subject { color: rgba(255, 255, 255, 0.85); }
header code { background: rgba(255, 255, 255, 0.16); padding: 1px 5px; border-radius: 4px; }
header .subject { margin: 0; font-size: 13px; }
.notice { background: #fff8c5; color: #3b2300; border-radius: 6px; padding: 8px 12px; margin: 10px 0 0; }
.notice code { background: rgba(0, 0, 0, 0.06); color: inherit; }
nav { position: sticky; top: 0; z-index: 2; background: #fff; border-bottom: 1px solid var(--line); }
nav .wrap { display: flex; flex-wrap: wrap; gap: 4px 18px; padding-top: 8px; padding-bottom: 8px; }
nav a { color: var(--muted); text-decoration: none; font-size: 13px; font-weight: 500; }
nav a:hover { color: var(--fg); }
section { margin: 26px 0 34px; }
h2 { font-size: 20px; margin: 0 0 8px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 20px 0 6px; }
.lead { color: var(--muted); margin: 4px 0 10px; }
.muted { color: var(--muted); }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; vertical-align: top; padding: 5px 8px; border-bottom: 1px solid var(--line); }
thead th { background: var(--bg); font-weight: 600; position: sticky; top: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:hover { background: #f6f8fa80; }
table.kv th { font-weight: 500; color: var(--muted); width: 1%; white-space: nowrap; }
table.kv td, table.kv th { padding: 2px 6px; border: 0; }
details summary { cursor: pointer; color: #0969da; font-size: 12.5px; }
details[open] summary { margin-bottom: 2px; }
.badge { display: inline-block; padding: 0 7px; border-radius: 10px; font-size: 12px; font-weight: 600;
  color: #fff; background: var(--skip); }
.badge.o-passed { background: var(--pass); }
.badge.o-failed { background: var(--fail); }
.badge.o-xfailed { background: var(--xfail); }
header .count.o-failed { text-decoration: underline; text-decoration-thickness: 1px; }
ul.failures { padding-left: 18px; }
ul.failures li { margin: 4px 0; }
ul.failures a { text-decoration: none; }
.diagnosis { font-size: 15px; }
figure.plot { margin: 8px 0 12px; padding: 10px; border: 1px solid var(--line); border-radius: 8px; }
figure.plot svg { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figure.plot figcaption { color: var(--muted); font-size: 12px; text-align: center; margin-top: 4px; }
.no-plot { color: var(--muted); font-style: italic; }
table.grid { width: auto; min-width: 50%; }
table.grid td { min-width: 170px; }
ul.failures .reason { color: var(--muted); margin-left: 2px; }
#items td:last-child { min-width: 260px; }
.cell details { margin-top: 2px; }
pre.out { background: var(--bg); border-radius: 4px; padding: 4px 6px; min-width: 140px; max-width: 360px;
  margin: 0; }
pre.out.differs { background: #ffebe9; }
.greedy.differs { color: var(--fail); font-weight: 600; }
.greedy.same { color: var(--pass); }
.doc { font-size: 12.5px; }
.controls { display: flex; flex-wrap: wrap; align-items: center; gap: 8px 16px; margin: 6px 0 10px; }
.controls input[type=search] { flex: 1 1 280px; max-width: 420px; padding: 6px 10px; font: inherit;
  border: 1px solid var(--line); border-radius: 6px; }
.controls label { display: inline-flex; align-items: center; gap: 5px; font-size: 13px; }
ul.findings { margin: 2px 0; padding-left: 18px; }
[hidden] { display: none !important; }
footer { margin: 40px auto 30px; font-size: 12.5px; }
"""

_SCRIPT = """
(function () {
  var filter = document.getElementById("filter");
  var boxes = Array.prototype.slice.call(document.querySelectorAll("input.outcome-filter"));
  var rows = Array.prototype.slice.call(document.querySelectorAll("#items > tbody > tr"));
  var shown = document.getElementById("shown");
  function apply() {
    var words = filter.value.toLowerCase().split(/\\s+/).filter(Boolean);
    var allowed = boxes.filter(function (b) { return b.checked; }).map(function (b) { return b.value; });
    var count = 0;
    rows.forEach(function (row) {
      var text = row.getAttribute("data-search");
      var visible = allowed.indexOf(row.getAttribute("data-outcome")) >= 0 &&
        words.every(function (w) { return text.indexOf(w) >= 0; });
      row.hidden = !visible;
      if (visible) { count += 1; }
    });
    shown.textContent = count + " of " + rows.length + " items shown";
  }
  filter.addEventListener("input", apply);
  boxes.forEach(function (b) { b.addEventListener("change", apply); });
  apply();
})();
"""
