"""--llm-baseline-save: a release's outputs and figures with the provenance that explains later
differences, written whole and valid against its schema."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

import release_merges
from conftest import ADAPTERS, BASE, MERGED, REPO
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
    assert "example_suites/smoke.yaml" in saved["provenance"]["suites"], "named relative to the root"
    assert not list((pytester.path / "release-1.0").glob(".*.tmp")), "written whole, no temp file left"


def test_baseline_save_is_refused_inside_the_checkpoint(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(f"--llm-model={MERGED}", f"--llm-baseline-save={MERGED / 'baseline'}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--llm-baseline-save*lies inside the checkpoint directory*"])


# --- --llm-baseline: a candidate against a release's baseline, on releases written in bfloat16 by
# save_pretrained (tests/release_merges.py) ----------------------------------------------------

SUITES = [str(REPO / "example_suites" / "smoke.yaml"), str(REPO / "example_suites" / "chat.yaml")]


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("releases")
    return {name: release_merges.build(name, BASE, ADAPTERS, root / name) for name in release_merges.RECIPES}


@pytest.fixture(scope="module")
def saved_baseline(releases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The release's baseline, saved by the plugin (suite cases and corpus perplexity on HF)."""
    out = tmp_path_factory.mktemp("baseline") / "release-1.0"
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                             f"--llm-model={releases['release']}", "--llm-backend=hf", "-m",
                             "llmmerge_suite or llmmerge_baseline", *SUITES, f"--llm-baseline-save={out}"],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert (out / "baseline.json").is_file(), result.stdout[-3000:] + result.stderr[-2000:]
    return out


def _compare(pytester: pytest.Pytester, model: Path, saved: Path, *more: str) -> pytest.RunResult:
    # Run from the repository root, so the suites' node ids match the baseline's.
    pytester.chdir()
    return pytester.runpytest_subprocess(f"--rootdir={REPO}", "-p", "no:cacheprovider", f"--llm-model={model}",
                                         "--llm-backend=hf", "-m", "llmmerge_baseline", *SUITES,
                                         f"--llm-baseline={saved}", *more)


def test_the_saved_baseline_holds_top_k_and_documents(saved_baseline: Path) -> None:
    saved = json.loads((saved_baseline / "baseline.json").read_text())
    jsonschema.validate(saved, baseline.schema())
    case = next(iter(saved["cases"].values()))
    assert len(case["output_top_ids"]) == case["new_tokens"] and all(len(row) == 5 for row in case["output_top_ids"])
    assert case["output_top_ids"][0][0] == case["output_token_ids"][0], "greedy: the output is its own top 1"
    documents = saved["documents"]["merged-hf"]
    assert len(documents) >= 10 and all(len(d["top"]) <= 64 and d["nll"] > 0 for d in documents)
    assert saved["provenance"]["dtype"] == "auto" and "example_suites/smoke.yaml" in saved["provenance"]["suites"]
    assert (saved_baseline / "baseline.json").stat().st_size < 400_000, "small enough to commit"


def test_a_healthy_respin_of_the_release_passes(pytester: pytest.Pytester, releases: dict[str, Path],
                                                saved_baseline: Path) -> None:
    """The same release merged in float32 and cast to bf16: other bytes, same model up to rounding."""
    result = _compare(pytester, releases["respin"], saved_baseline, "-v")
    result.assert_outcomes(passed=len(_cases(saved_baseline)) + 2)  # + perplexity and provenance
    assert "baseline::perplexity[merged-hf]" in result.stdout.str()


def _cases(saved: Path) -> dict[str, object]:
    cases: dict[str, object] = json.loads((saved / "baseline.json").read_text())["cases"]
    return cases


@pytest.mark.parametrize("recipe", ["one-more", "scale-x2"])
def test_a_release_with_an_adapter_more_or_merged_wrongly_fails_naming_cases_and_figures(
        pytester: pytest.Pytester, releases: dict[str, Path], saved_baseline: Path, recipe: str) -> None:
    result = _compare(pytester, releases[recipe], saved_baseline)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "*case '*' on merged-hf differs from the baseline:",
        "*greedy output parts from the baseline's at token *: baseline token *, now *not in the*top 5*",
        "perplexity of merged-hf differs from the baseline's:",
        "*mean per-token KL(baseline || now) * > limit * = max(floor *, 10 x noise *)*",
    ])
    result.stdout.fnmatch_lines(["FAILED *baseline::*[[]merged-hf[]]*", "FAILED *baseline::perplexity[[]merged-hf[]]*"],
                                consecutive=False)


def test_changed_tokenizer_files_are_a_provenance_difference_and_strict_fails(
        pytester: pytest.Pytester, releases: dict[str, Path], saved_baseline: Path, tmp_path: Path) -> None:
    candidate = tmp_path / "candidate"
    shutil.copytree(releases["release"], candidate)
    config = json.loads((candidate / "tokenizer_config.json").read_text())
    config["model_max_length"] = 123
    (candidate / "tokenizer_config.json").write_text(json.dumps(config))
    relaxed = _compare(pytester, candidate, saved_baseline, "-k", "provenance", "-v")
    relaxed.assert_outcomes(passed=1)
    relaxed.stdout.fnmatch_lines(["llmmerge baseline: * 1 provenance difference(s)",
                                  "  tokenizer file tokenizer_config.json sha256 * -> * (explains *)"])
    strict = _compare(pytester, candidate, saved_baseline, "-k", "provenance", "--llm-baseline-strict")
    strict.assert_outcomes(failed=1)
    strict.stdout.fnmatch_lines(["*baseline provenance differs*--llm-baseline-strict*",
                                 "*provenance: tokenizer file tokenizer_config.json sha256*"])
    assert "tensor headers" not in strict.stdout.str(), "only the tokenizer file changed"


def test_a_baseline_file_with_a_bad_field_is_a_usage_error_naming_it(pytester: pytest.Pytester,
                                                                    saved_baseline: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    saved = json.loads((saved_baseline / "baseline.json").read_text())
    next(iter(saved["cases"].values()))["finish_reason"] = "maybe"
    (bad / "baseline.json").write_text(json.dumps(saved))
    result = pytester.runpytest_subprocess(f"--llm-model={MERGED}", f"--llm-baseline={bad}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--llm-baseline: *bad/baseline.json: field .cases.*.finish_reason: 'maybe' is not one of*"])
    missing = pytester.runpytest_subprocess(f"--llm-model={MERGED}", f"--llm-baseline={tmp_path}")
    missing.stderr.fnmatch_lines(["*--llm-baseline: *baseline.json does not exist (write it with --llm-baseline-save*"])
