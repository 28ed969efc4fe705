"""The HTML report (--llm-report-html): render() on a hand-made report, then one real run of the
plugin on the fixtures, whose page is opened in headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ADAPTERS, BASE, MERGED, REPO
from pytest_llmmerge import html_report, report

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCRIPT = "<script>alert('owned')</script>"
SVG = "{http://www.w3.org/2000/svg}"


# --- a report with every kind of item, shaped like a real run's ---------------------------------

def _documents(scale: float) -> list[dict[str, Any]]:
    return [{"document": "The morning train left the station a few minutes late", "kl": 1.8 * scale},
            {"document": "Prices in $ and $ again <b>bold</b>", "kl": 2.5 * scale},
            {"document": "春天来的时候，山坡上的草慢慢变绿，小河里的冰也开始融化。", "kl": 0.0}]


def _comparison(kl_ratio: Any, ppl_ratio: float, scale: float) -> dict[str, Any]:
    return {"kl_mean": 1e-3 * scale, "kl_mean_noise": 0.0, "kl_mean_limit": 0.001, "kl_mean_ratio": kl_ratio,
            "log_ppl_shift": -0.01 * ppl_ratio, "log_ppl": 0.01 * ppl_ratio, "log_ppl_limit": 0.00995,
            "log_ppl_ratio": ppl_ratio, "greedy_equal": "7/7", "kl_per_document": _documents(scale)}


def records() -> list[report.ItemRecord]:
    item = report.ItemRecord
    modules = [
        {"tensor": "model.layers.0.self_attn.q_proj.weight", "verdict": "exact", "error": 1e-7, "floor": 5e-8,
         "factors": [1.0000000012, 0.9999999997], "adapters": [1, 2], "correlation": 1.0, "hints": []},
        {"tensor": "model.layers.0.self_attn.v_proj.weight", "verdict": "scaled", "error": 0.5, "floor": 5e-8,
         "factors": [2.0, 1.0], "adapters": [1, 2], "correlation": 0.99, "hints": ["alpha applied twice"]},
        {"tensor": "model.layers.1.mlp.up_proj.weight", "verdict": "exact", "error": 0.0, "floor": 4e-8,
         "factors": [1.0, 1.0], "adapters": [1, 2], "correlation": 1.0, "hints": []},
    ]
    return [
        item("integrity::config", "integrity", "passed", 0.002),
        item("weights::finite", "weights", "failed", 0.2, message=f"tensor {SCRIPT} holds NaN\nsecond line",
             findings=[{"code": "WGT013", "severity": "error", "file": "model.safetensors",
                        "message": "NaN in <b>lm_head</b>"}]),
        item("weights::change_vs_base", "weights", "passed", 0.01,
             metrics={"weight_change:model.layers.10": 0.2, "weight_change:model.layers.2": 0.5,
                      "weight_change:model.embed_tokens.weight": 0.0}),
        item("audit::merge_diagnosis", "audit", "passed", 0.1,
             metrics={"merge_diagnosis": "1 of 3 adapted modules scaled", "merge_diagnosis_modules": modules}),
        item("smoke.yaml::repeat-en[merged-hf]", "suite", "passed", 1.0, "merged", "hf",
             metrics={"finish_reason": "stop", "new_tokens": 5, "output_text": " apple river stone"}),
        item("smoke.yaml::repeat-en[merged-vllm]", "suite", "passed", 1.0, "merged", "vllm",
             metrics={"finish_reason": "stop", "new_tokens": 5, "output_text": " apple river stone"}),
        item("smoke.yaml::greet[merged-hf]", "suite", "failed", 1.0, "merged", "hf",
             message="case 'greet' did not stop", metrics={"finish_reason": "length", "new_tokens": 24,
                                                          "output_text": SCRIPT}),
        item("smoke.yaml::greet[merged-vllm]", "suite", "skipped", 0.0, "merged", "vllm",
             message="backend 'vllm' needs the vllm package"),
        item("parity::stage1[hf]", "parity", "passed", 20.0, "stage1", "hf", metrics=_comparison(2e-9, 1.6e-6, 1e-9)),
        item("parity::stage2[hf]", "parity", "skipped", 0.0, "stage2", "hf", message="no second adapter"),
        item("parity::merged-vs-reference[hf]", "parity", "failed", 15.0, "merged", "hf",
             message="KL over the limit", metrics=_comparison(3.0, 0.5, 3.0)),
        item("agreement::merged[hf-vs-vllm]", "agreement", "passed", 9.0, "merged", "hf-vs-vllm",
             metrics=_comparison(0.2, 0.1, 0.2)),
        item("parity::nan[hf]", "parity", "failed", 1.0, "merged", "hf", message="logits hold NaN or Inf",
             metrics={"kl_mean": "nan", "kl_mean_ratio": "nan", "log_ppl_ratio": "nan"}),
        item("baseline::repeat-en[merged-hf]", "baseline", "passed", 0.01, "merged", "hf",
             metrics={"baseline_text": " apple river stone", "output_text": " apple river stone",
                      "baseline_new_tokens": 5, "new_tokens": 5, "baseline_finish_reason": "stop",
                      "finish_reason": "stop", "divergence": None, "greedy": "equal", "growth": 1.0}),
        item("baseline::greet[merged-hf]", "baseline", "failed", 0.02, "merged", "hf",
             message="case 'greet' on merged-hf differs from the baseline:\n  - greedy output parts at token 0",
             metrics={"baseline_text": "Hello there", "output_text": SCRIPT, "baseline_new_tokens": 3,
                      "new_tokens": 24, "baseline_finish_reason": "stop", "finish_reason": "length",
                      "divergence": 0, "greedy": "diverged", "growth": 8.0}),
        item("baseline::perplexity[merged-hf]", "baseline", "failed", 3.6, "merged", "hf",
             message="perplexity of merged-hf differs from the baseline's",
             metrics={"measure": "perplexity", "ppl_baseline": 36045.2, "ppl_now": 26907.0, "documents": 3,
                      **_comparison(591.0, 29.4, 591.0)}),
        item("baseline::provenance", "baseline", "passed", 0.01,
             metrics={"provenance_differences": ["tokenizer file tokenizer_config.json sha256 c7a3 -> de70"],
                      "new_cases": ["smoke.yaml::greet[merged-hf]"],
                      "gone_cases": ["field-failures.yaml::never-stops-raw[merged-hf]"]}),
        item("tests/test_own.py::test_mine", "test", "passed", 0.5),
    ]


def built(items: list[report.ItemRecord], exit_status: int = 1) -> dict[str, Any]:
    settings = {"model": "/models/merged", "base": "/models/base", "adapters": ["/a/lora1", "/a/lora2"],
                "audit_max_error": 0.001, "max_weight_change": 0.6}
    workers = {"merged-hf": {"loads": 1, "load_seconds": 7.6, "requests": 10, "kills": 0, "deaths": 0}}
    return report.build(items, settings=settings, workers=workers, exit_status=exit_status,
                        created="2026-12-03T21:10:13+00:00")


@pytest.fixture(scope="module")
def page() -> str:
    return html_report.render(built(records()))


def svgs(text: str) -> dict[str, ET.Element]:
    """Each inlined plot by its name, parsed: matplotlib's SVG stays well-formed XML in the page."""
    return {m.group(1): ET.fromstring(m.group(0))
            for m in re.finditer(r'<svg data-plot="([\w-]+)".*?</svg>', text, flags=re.S)}


def series(svg: ET.Element, gid: str) -> int:
    """How many marks the series with that id draws: a marker is a <use> of a shape defined once
    (or a <path> of its own, where matplotlib finds that shorter), a bar a <path>."""
    (group,) = [e for e in svg.iter() if e.get("id") == gid]
    return _marks_in(group)


def _marks_in(element: ET.Element) -> int:
    return sum(0 if child.tag == SVG + "defs" else int(child.tag in (SVG + "use", SVG + "path")) + _marks_in(child)
               for child in element)


# --- render() ------------------------------------------------------------------------------------

def test_the_verdict_and_the_counts_head_the_page(page: str) -> None:
    assert '<h1 id="verdict">gated: do not ship</h1>' in page and 'class="verdict v-fail"' in page
    assert "<title>pytest-llmmerge: gated: do not ship</title>" in page
    counts = dict((key, int(n)) for n, key in re.findall(r'<span class="count o-\w+">(\d+) (\w+)</span>', page))
    assert counts == {"passed": 10, "failed": 6, "skipped": 2, "xfailed": 0}
    assert "Failures (6)" in page

    passing = [r for r in records() if r.outcome != "failed"]
    clean = html_report.render(built(passing, exit_status=0))
    assert '<h1 id="verdict">passed</h1>' in clean and "v-pass" in clean and "Failures" not in clean
    # A collection error fails no item but fails the run: the page must not say "passed".
    broken = html_report.render(built(passing, exit_status=2))
    assert '<h1 id="verdict">gated: do not ship</h1>' in broken and "pytest exit status 2" in broken


def test_text_from_models_and_users_is_escaped(page: str) -> None:
    assert SCRIPT not in page and "<b>" not in page
    assert html.escape(SCRIPT) in page  # the output, the failure message, the side-by-side text
    assert "NaN in &lt;b&gt;lm_head&lt;/b&gt;" in page
    assert page.count("<script") == 1  # the page's own filter, and nothing a model wrote
    # In the plots too: a document's text is a tick label, escaped by matplotlib's SVG writer.
    documents = ET.tostring(svgs(page)["documents"], encoding="unicode")
    assert "Prices in $ and $ again &lt;b&gt;" in documents


def test_the_page_loads_nothing_from_elsewhere(page: str) -> None:
    lowered = page.lower()
    for reference in ('src="http', "src='http", 'href="http', "href='http", "@import", "url(http", "url('http",
                      'url("http', "<link", "<img", "<iframe", 'src="//', 'href="//'):
        assert reference not in lowered, reference
    # matplotlib's metadata names web addresses; only the SVG namespaces may remain.
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) <= {"http://www.w3.org/2000/svg",
                                                                 "http://www.w3.org/1999/xlink"}


def test_each_plot_holds_one_mark_per_figure(page: str) -> None:
    plots = svgs(page)
    assert set(plots) == {"parity", "weights", "diagnosis", "documents"}
    # KL ratios: stage1, merged-vs-reference, agreement, baseline::perplexity (skipped and NaN: none).
    assert series(plots["parity"], "parity-kl") == 4
    assert series(plots["parity"], "parity-ppl") == 4
    assert [e for e in plots["parity"].iter() if e.get("id") == "parity-limit"]
    assert series(plots["weights"], "weights-change") == 3
    assert [e for e in plots["weights"].iter() if e.get("id") == "weights-limit"]
    assert series(plots["diagnosis"], "diagnosis-error") == 3
    assert series(plots["diagnosis"], "diagnosis-factor-1") == 3
    assert series(plots["diagnosis"], "diagnosis-factor-2") == 3
    assert [series(plots["documents"], f"documents-kl-{n}") for n in range(4)] == [3, 3, 3, 3]
    # Ids are prefixed per plot: four inlined SVGs must not share one.
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))


def test_the_layers_are_plotted_in_their_order() -> None:
    plots = svgs(html_report.render(built(records())))
    labels = [t.text for t in plots["weights"].iter(SVG + "text") if t.text and t.text.startswith("model")]
    assert labels[:3] == ["model.embed_tokens.weight", "model.layers.2", "model.layers.10"]


def test_without_matplotlib_the_page_has_tables_and_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    page = html_report.render(built(records()))
    assert "<svg" not in page
    assert "Plots need matplotlib" in page and "pip install &#x27;pytest-llmmerge[html]&#x27;" in page
    assert page.count("plot not drawn: it needs matplotlib") == 4
    # The plotted figures are still there, as open tables.
    assert page.count("<details open><summary>figures as a table") == 4
    assert "<code>parity::merged-vs-reference[hf]</code>" in page and "<code>model.layers.10</code>" in page
    assert "<td class=\"num\">591</td>" in page  # the failing KL ratio of baseline::perplexity


def test_importing_the_plugin_does_not_import_matplotlib() -> None:
    code = ("import sys, pytest_llmmerge.plugin, pytest_llmmerge.html_report; "
            "sys.exit('matplotlib' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_suite_outcomes_form_a_grid_of_cases_and_runs(page: str) -> None:
    section = page[page.index('<section id="suite">'):page.index('<section id="baseline">')]
    assert "<th>merged-hf</th><th>merged-vllm</th>" in section
    cells = re.findall(r'data-run="([\w-]+)" data-outcome="(\w+)"', section)
    assert cells == [("merged-hf", "passed"), ("merged-vllm", "passed"), ("merged-hf", "failed"),
                     ("merged-vllm", "skipped")]
    assert "<code>smoke.yaml::greet</code>" in section and "length · 24 tokens" in section


def test_the_baseline_comparison_is_side_by_side(page: str) -> None:
    section = page[page.index('<section id="baseline">'):page.index('<section id="weights">')]
    row = next(r for r in section.split("<tr>") if "<code>baseline::greet</code>" in r)
    assert '<pre class="out">Hello there</pre>' in row
    assert f'<pre class="out differs">{html.escape(SCRIPT)}</pre>' in row
    assert "diverged" in row and "3 → 24" in row and "stop → length" in row
    assert "<code>baseline::perplexity[merged-hf]</code>" in section and "3.605e+04" in section
    assert "tokenizer file tokenizer_config.json sha256 c7a3 -&gt; de70" in section
    assert "1 new cases" in section and "never-stops-raw[merged-hf]" in section


def test_failure_messages_open_from_the_item_table(page: str) -> None:
    (row,) = re.findall(r'<tr id="item-\d+" data-outcome="failed" data-search="weights::finite.*?</tr>', page,
                        flags=re.S)
    assert f"<details><summary>failure</summary><pre>tensor {html.escape(SCRIPT)} holds NaN\nsecond line" in row
    assert "<code>WGT013</code> error" in row
    # The failures list at the top links to the row.
    index = re.search(r'<tr id="(item-\d+)" data-outcome="failed" data-search="weights::finite', page)
    assert index is not None and f'<a href="#{index.group(1)}">' in page


@pytest.mark.parametrize("odd", [
    {},
    {"summary": {"failed": "many"}, "items": "not a list"},
    {"items": [{"nodeid": "weights::change_vs_base", "kind": "weights", "outcome": "passed",
                "metrics": {"weight_change:a": "nan", "merge_diagnosis": None, "merge_diagnosis_modules": "oops",
                            "kl_per_document": [{"document": 3}, "x"], "provenance_differences": None,
                            "gone_cases": "a string", "stop_sets": [1, {"path": "HF"}], "kl_mean_ratio": "inf",
                            "output_token_ids": [1, 2]}},
               {"nodeid": "suite.yaml::x[merged-hf]", "kind": "suite", "outcome": "error", "variant": "merged",
                "backend": "hf", "metrics": None}]},
], ids=["empty", "wrong-types", "odd-figures"])
def test_a_report_with_missing_or_odd_figures_still_renders(odd: dict[str, Any]) -> None:
    page = html_report.render(odd)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert 'id="items"' in page
    # A summary that does not say that nothing failed and pytest exited 0 is no pass.
    assert '<h1 id="verdict">gated: do not ship</h1>' in page


# --- one real run of the plugin on the fixtures, reused by the browser tests --------------------

@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The plugin on the fixture checkpoints with every plotted kind of item: the HTML page and
    the JSON report of the same run."""
    where = tmp_path_factory.mktemp("html-run")
    shutil.copy(REPO / "example_suites" / "smoke.yaml", where)
    adapters = [f"--llm-adapter={a}" for a in ADAPTERS]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", "-q",
         f"--llm-model={MERGED}", f"--llm-base={BASE}", *adapters, "--llm-backend=hf",
         "-m", "llmmerge_integrity or llmmerge_weights or llmmerge_audit or llmmerge_suite or llmmerge_parity",
         "smoke.yaml", "--llm-report-html=report.html", "--llm-report=report.json"],
        cwd=where, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "HTML report written to" in result.stdout
    return where / "report.html", json.loads((where / "report.json").read_text(encoding="utf-8"))


def test_the_plugin_writes_the_page_of_its_run(fixture_run: tuple[Path, dict[str, Any]]) -> None:
    path, data = fixture_run
    page = path.read_text(encoding="utf-8")
    assert '<h1 id="verdict">passed</h1>' in page
    assert len(re.findall(r'<tr id="item-\d+"', page)) == len(data["items"])
    for item in data["items"]:
        assert f"<code>{html.escape(item['nodeid'])}</code>" in page
    assert set(svgs(page)) == {"parity", "weights", "diagnosis", "documents"}
    assert 'src="http' not in page and 'href="http' not in page and "@import" not in page


# --- the page in headless Chromium ---------------------------------------------------------------

@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium through selenium, with the Debian binaries named so that Selenium
    Manager never tries a download. Missing ones fail the test: the check must not vanish."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: `make test` installs chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver)", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: `make test` installs it (pip install -e '.[test]')", pytrace=False)
    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1400"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def opened(browser: Any, fixture_run: tuple[Path, dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
    path, data = fixture_run
    browser.get(path.as_uri())
    return browser, data


def _rect(driver: Any, css: str) -> dict[str, float]:
    found: dict[str, float] = driver.execute_script(
        "var e = document.querySelector(arguments[0]); return e && e.getBoundingClientRect().toJSON();", css)
    assert found, f"{css}: no such element"
    return found


def _marks(driver: Any, series_id: str) -> int:
    """The marks of a series as the browser sees them (see series() above)."""
    count: int = driver.execute_script(
        "return document.querySelectorAll(arguments[0]).length;",
        f"#{series_id} use, #{series_id} path:not(#{series_id} defs path)")
    return count


def test_every_plot_renders_with_its_series(opened: tuple[Any, dict[str, Any]]) -> None:
    driver, data = opened
    for plot in ("parity", "weights", "diagnosis", "documents"):
        box = _rect(driver, f'svg[data-plot="{plot}"]')
        assert box["width"] > 200 and box["height"] > 100, (plot, box)
    items = data["items"]
    compared = [i for i in items if isinstance(i["metrics"].get("kl_mean_ratio"), (int, float))]
    assert len(compared) >= 3  # stage1, stage2, merged-vs-reference
    assert _marks(driver, "parity-kl") == _marks(driver, "parity-ppl") == len(compared)
    changes = [k for i in items for k in i["metrics"] if k.startswith("weight_change:")]
    assert changes and _marks(driver, "weights-change") == len(changes)
    (diagnosis,) = [i["metrics"] for i in items if "merge_diagnosis_modules" in i["metrics"]]
    assert _marks(driver, "diagnosis-error") == len(diagnosis["merge_diagnosis_modules"])
    per_document = [i["metrics"]["kl_per_document"] for i in items if i["metrics"].get("kl_per_document")]
    assert [_marks(driver, f"documents-kl-{n}") for n in range(len(per_document))] == \
        [len(d) for d in per_document]
    # The marks are drawn, not only present: the series' groups take up room on the page.
    for series_id in ("parity-kl", "weights-change", "diagnosis-error", "documents-kl-0"):
        box = _rect(driver, f"#{series_id}")
        assert box["width"] > 0 or box["height"] > 0, series_id
    # Nothing but the page itself was loaded.
    assert driver.execute_script("return performance.getEntriesByType('resource').length;") == 0


def test_the_filter_hides_rows_that_do_not_match_and_shows_them_again(opened: tuple[Any, dict[str, Any]]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver, data = opened
    rows = driver.find_elements(By.CSS_SELECTOR, "#items > tbody > tr")
    assert len(rows) == len(data["items"]) and all(r.is_displayed() for r in rows)
    matching = [i["nodeid"] for i in data["items"] if "parity" in f"{i['nodeid']} {i['kind']}".lower()]
    field = driver.find_element(By.ID, "filter")
    field.send_keys("parity")
    shown = [r.find_element(By.CSS_SELECTOR, "td code").text for r in rows if r.is_displayed()]
    assert shown == matching and 0 < len(shown) < len(rows)
    assert driver.find_element(By.ID, "shown").text == f"{len(matching)} of {len(rows)} items shown"
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.BACKSPACE)
    assert all(r.is_displayed() for r in rows)
    # Unticking an outcome hides its rows (every item of this run passed).
    driver.find_element(By.CSS_SELECTOR, 'input.outcome-filter[value="passed"]').click()
    assert not any(r.is_displayed() for r in rows)
    driver.find_element(By.CSS_SELECTOR, 'input.outcome-filter[value="passed"]').click()
    assert all(r.is_displayed() for r in rows)


def test_a_screenshot_of_the_page(opened: tuple[Any, dict[str, Any]], tmp_path: Path) -> None:
    driver, _ = opened
    shot = tmp_path / "report.png"
    assert driver.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 1000 and height >= 800
