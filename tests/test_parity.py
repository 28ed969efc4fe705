"""Parity items proven both ways on the real fixtures: healthy merges pass, broken ones fail
at the stage where they break, with the numbers and the worst document or layers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import ADAPTERS, BASE, MERGED
from pytest_llmmerge.backends.base import Generation
from pytest_llmmerge.merge import MergeSpec, build_merged

# HF only: the same parity on vLLM is tested with the vLLM backend.
CHAIN = (f"--llm-base={BASE}", f"--llm-adapter={ADAPTERS[0]}", f"--llm-adapter={ADAPTERS[1]}", "--llm-backend=hf")


@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base + lora1, merged in fp32: the first stage of the fixture chain."""
    return build_merged(MergeSpec(BASE, (ADAPTERS[0],)), tmp_path_factory.mktemp("chain") / "stage1")


def parity(pytester: pytest.Pytester, model: Path, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(f"--llm-model={model}", *CHAIN, "-m", "llmmerge_parity", "-rA", *args)


def failed_items(result: pytest.RunResult) -> list[str]:
    return sorted(line.split("::")[1].split()[0] for line in result.stdout.lines if line.startswith("FAILED parity"))


def test_healthy_chain_passes_every_parity_item(pytester: pytest.Pytester) -> None:
    result = parity(pytester, MERGED)
    result.assert_outcomes(passed=3)
    # The candidate is loaded once although two variants (stage2, merged) name it.
    output = result.stdout.str()
    assert "stage2-hf: 1 model load(s)" in output and "merged-hf:" not in output


def test_bfloat16_merge_fails_at_tight_tolerance_with_its_diagnosis(pytester: pytest.Pytester, stage1: Path,
                                                               tmp_path: Path) -> None:
    bf16 = build_merged(MergeSpec(stage1, (ADAPTERS[1],), compute_dtype="bfloat16", output_dtype="float32"),
                        tmp_path / "bf16")
    # The calibrated default accepts bf16 rounding on this tiny model; a tight explicit KL bound does not.
    result = parity(pytester, bf16, "--llm-kl-max=1e-9", "--llm-ppl-rtol=1e-6", "-k", "stage2")
    assert failed_items(result) == ["stage2[hf]"]
    output = result.stdout.str()
    assert "limit 1e-09 = --llm-kl-max 1e-09" in output and "worst document" in output
    assert "merge diagnosis of stage 2: 14 of 14 adapted modules rounded" in output
    assert "the merge ran in bfloat16" in output


def test_doubled_adapter_scale_fails(pytester: pytest.Pytester, stage1: Path, tmp_path: Path) -> None:
    wrong = build_merged(MergeSpec(stage1, (ADAPTERS[1],), scale=2.0), tmp_path / "alpha-x2")
    result = parity(pytester, wrong, "-k", "stage2")
    assert failed_items(result) == ["stage2[hf]"]
    result.stdout.fnmatch_lines([
        "*mean per-token KL(float32 adapter-only || merged (float32, hf)) * > limit * = max(floor 0.001, 10 x noise *)"
        "*To blame: the merge of adapter 2*not the fine-tune*",
        "*perplexity * of the float32 adapter-only model*To blame: the merge of adapter 2*",
        "*merge diagnosis of stage 2: 14 of 14 adapted modules scaled (by k = 2 *"])


def test_merged_that_is_really_the_base_fails(pytester: pytest.Pytester, tmp_path: Path) -> None:
    fake = tmp_path / "fake-merged"
    shutil.copytree(BASE, fake)
    result = parity(pytester, fake)
    assert "stage2[hf]" in failed_items(result)


def test_chain_with_a_skipped_adapter_fails_at_that_stage(pytester: pytest.Pytester, tmp_path: Path) -> None:
    # The user's pipeline forgot lora1: its stage 1 is the base, its stage 2 is base + lora2.
    skipped = tmp_path / "stage1-skipped"
    shutil.copytree(BASE, skipped)
    final = build_merged(MergeSpec(skipped, (ADAPTERS[1],)), tmp_path / "final")
    result = parity(pytester, final, f"--llm-stage={skipped}", "-k", "stage")
    assert failed_items(result) == ["stage1[hf]"]
    result.assert_outcomes(passed=1, failed=1)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_merges_pass_on_their_measured_noise_and_a_wrong_one_fails(
        pytester: pytest.Pytester, stage1: Path, tmp_path: Path, dtype: str) -> None:
    """A float32 merge saved in bf16/fp16 (the shape real releases ship in) passes the default,
    calibrated limits: the noise model (the fine-tune unmerged, computed in that dtype) is
    measured in the run.  The same recipe with the LoRA scale doubled fails."""
    import json

    healthy = build_merged(MergeSpec(stage1, (ADAPTERS[1],), output_dtype=dtype), tmp_path / f"healthy-{dtype}")
    report = tmp_path / "report.json"
    result = parity(pytester, healthy, f"--llm-stage={stage1}", "-k", "stage2", f"--llm-report={report}")
    result.assert_outcomes(passed=1)
    (item,) = [i for i in json.loads(report.read_text())["items"] if i["kind"] == "parity"]
    figures = item["metrics"]
    assert figures["dtype"] == dtype and figures["kl_mean_noise"] > 0, figures
    assert figures["kl_mean_ratio"] < 1 and figures["log_ppl_ratio"] < 1, figures
    wrong = build_merged(MergeSpec(stage1, (ADAPTERS[1],), scale=2.0, output_dtype=dtype), tmp_path / f"x2-{dtype}")
    result = parity(pytester, wrong, f"--llm-stage={stage1}", "-k", "stage2")
    assert failed_items(result) == ["stage2[hf]"]
    result.stdout.fnmatch_lines([f"*mean per-token KL(float32 adapter-only || merged ({dtype}, hf))*> limit*"])


def _gen(ids: tuple[int, ...], finish: str) -> Generation:
    return Generation(text="", token_ids=ids, finish_reason=finish, stop_token_id=ids[-1] if finish == "stop" else None,
                      seconds=0.0)


@pytest.mark.parametrize(("a", "b", "differ"), [
    # The same tokens through the stop token 9, then one engine goes on: stop sets differ.
    (_gen((5, 6, 9), "stop"), _gen((5, 6, 9, 7, 7), "length"), True),
    # ... also when the budget ran out exactly at that token.
    (_gen((5, 6, 9), "stop"), _gen((5, 6, 9), "length"), True),
    # The paths part before the stop (bf16 noise after batching), one ends in budget: not a
    # termination finding; the divergence itself is judged by the top-k rule.
    (_gen((5, 6, 9), "stop"), _gen((5, 8, 7, 7, 7), "length"), False),
    # At the stop token itself one writes eos, the other another token: a near tie, top-k rule.
    (_gen((5, 6, 9), "stop"), _gen((5, 6, 4, 4, 4), "length"), False),
    (_gen((5, 6), "length"), _gen((5, 6), "length"), False),
    (_gen((5, 9), "stop"), _gen((5, 6, 9), "stop"), False),
])
def test_termination_is_judged_only_on_the_same_path(a: Generation, b: Generation, differ: bool) -> None:
    from pytest_llmmerge.parity import stop_sets_differ

    assert stop_sets_differ(a, b) is differ
    assert stop_sets_differ(b, a) is differ
