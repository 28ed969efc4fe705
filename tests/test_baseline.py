"""--llm-baseline-save: a release's outputs and figures with the provenance that explains later
differences, written whole and valid against its schema."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest

from conftest import BASE, MERGED, REPO
from pytest_llmmerge import baseline
from pytest_llmmerge.provenance import provenance


def _provenance(model: Path) -> dict[str, object]:
    return provenance(model, dtype="auto", device="cpu", backends=["hf"], suites=[], corpus=None)


def test_provenance_changes_with_the_tokenizer_files_and_nothing_else(tmp_path: Path) -> None:
    copy = tmp_path / "merged"
    shutil.copytree(MERGED, copy)
    before = _provenance(copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["model_max_length"] = 4096
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    after = _provenance(copy)
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"tokenizer_files"}
    assert before["tokenizer_files"]["tokenizer.json"] == after["tokenizer_files"]["tokenizer.json"]  # type: ignore[index]
    assert before["tokenizer_files"]["tokenizer_config.json"] != after["tokenizer_files"]["tokenizer_config.json"]  # type: ignore[index]


def test_provenance_tells_a_different_checkpoint_by_its_headers() -> None:
    ours, base = _provenance(MERGED), _provenance(BASE)
    assert ours["tensor_headers"] is not None and ours["chat_template"] is not None
    assert ours["tensor_headers"] == base["tensor_headers"]  # same names, dtypes and shapes: a merge
    assert "transformers" in ours["versions"]  # type: ignore[operator]


def test_baseline_save_writes_every_case_with_its_output_and_provenance(pytester: pytest.Pytester) -> None:
    smoke = REPO / "example_suites" / "smoke.yaml"
    result = pytester.runpytest_subprocess(f"--llm-model={MERGED}", f"--llm-base={BASE}", "--llm-backend=hf", "-m",
                                           "llmmerge_suite or llmmerge_weights", str(smoke),
                                           "--llm-baseline-save=release-1.0")
    result.assert_outcomes(passed=10)
    saved = json.loads((pytester.path / "release-1.0" / "baseline.json").read_text())
    jsonschema.validate(saved, baseline.schema())
    cases = saved["cases"]
    assert len(cases) == 6 and all(c["backend"] == "hf" and c["variant"] == "merged" for c in cases.values())
    repeat = next(c for nodeid, c in cases.items() if "repeat-en" in nodeid)
    assert repeat["finish_reason"] == "stop" and repeat["output_token_ids"][-1] == repeat["stop_token_id"]
    assert repeat["new_tokens"] == len(repeat["output_token_ids"]) and repeat["output_text"]
    assert saved["weight_change"], "the per-layer change against the base"
    assert str(smoke) in saved["provenance"]["suites"]
    assert not list((pytester.path / "release-1.0").glob(".*.tmp")), "written whole, no temp file left"


def test_baseline_save_is_refused_inside_the_checkpoint(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(f"--llm-model={MERGED}", f"--llm-baseline-save={MERGED / 'baseline'}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--llm-baseline-save*lies inside the checkpoint directory*"])
