"""The merge-precision audit on real merges of the fixture chain (base + lora1 + lora2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import ADAPTERS, BASE, MERGED
from pytest_llmmerge.checkpoint import Checkpoint
from pytest_llmmerge.checks import checks_of
from pytest_llmmerge.checks.base import Context, Finding, run_check
from pytest_llmmerge.merge import MergeSpec, cached_merge
from pytest_llmmerge.merge_audit import audit, rounding_slack, round_to


@pytest.fixture(scope="module")
def merges(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    cache = tmp_path_factory.mktemp("audit-merges")
    return {
        # peft merge computed in bfloat16, saved in the base's float32: the merge rounded the update.
        "bf16-compute": cached_merge(MergeSpec(BASE, ADAPTERS, compute_dtype="bfloat16"), cache)[0],
        # merged in float32 and saved as bfloat16: the storage dtype rounds it.
        "bf16-storage": cached_merge(MergeSpec(BASE, ADAPTERS, output_dtype="bfloat16"), cache)[0],
    }


def run(model: Path, adapters: tuple[Path, ...] = ADAPTERS, **ctx: float) -> tuple[list[Finding], str | None]:
    context = Context(Checkpoint(model), Checkpoint(BASE), adapters=adapters, **ctx)  # type: ignore[arg-type]
    outcome = run_check(checks_of("audit")[0], context)
    return list(outcome.findings), outcome.skipped


def test_float32_merge_passes_at_its_rounding_floor() -> None:
    found, skipped = run(MERGED)
    assert (found, skipped) == ([], None)
    result = audit(Checkpoint(MERGED), Checkpoint(BASE), ADAPTERS)
    assert len(result.layers) == 14  # 7 projections x 2 layers, summed over both adapters
    assert max(layer.error for layer in result.layers) < 1e-6
    # Two sequential float32 merges: about sqrt(3) float32 floors, well inside the allowed slack.
    assert all(layer.error <= 1.25 * 3 ** 0.5 * layer.floor_f32 for layer in result.layers)
    assert max(layer.error / layer.floor_f32 for layer in result.layers) < rounding_slack(2) / 1.5


def test_bfloat16_merge_fails_naming_layers_and_advising_float32(merges: dict[str, Path]) -> None:
    (finding,) = run(merges["bf16-compute"])[0]
    assert finding.code == "MRG001"
    assert "14 of 14 updated tensors lost more than --llm-audit-max-error=0.001" in finding.message
    assert "Worst: model.layers." in finding.message
    assert "merge in float32" in finding.message
    assert "float32 storage alone loses" in finding.message  # the candidate is float32: not storage-bound
    result = audit(Checkpoint(merges["bf16-compute"]), Checkpoint(BASE), ADAPTERS)
    worst = max(layer.error for layer in result.layers)
    assert 0.002 < worst < 0.05  # bfloat16 keeps 8 bits: ~0.4 % of |W|, on updates ~45 % of |W|
    # The threshold is an option: raised above the measured loss, the same merge passes.
    assert run(merges["bf16-compute"], audit_max_error=0.05)[0] == []


def test_a_perfect_merge_stored_in_bfloat16_passes_with_the_storage_loss_shown(merges: dict[str, Path]) -> None:
    """Merged in float32, saved as bfloat16: all it lost is what bfloat16 storage forces, so it
    passes; a warning says how much the dtype cannot hold."""
    (finding,) = run(merges["bf16-storage"])[0]
    assert finding.code == "MRG004" and finding.severity == "warning"
    assert "stored in bfloat16, which cannot hold their update exactly" in finding.message
    result = audit(Checkpoint(merges["bf16-storage"]), Checkpoint(BASE), ADAPTERS)
    # Merged in float32 and rounded to bfloat16 after each of the two adapters (as saving each
    # stage does): between one and about sqrt(2) bfloat16 floors.
    assert all(layer.dtype == "BF16" and layer.floor <= layer.error <= 1.5 * layer.floor for layer in result.layers)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_peft_merge_on_a_half_precision_base_passes_and_a_doubled_scale_fails(tmp_path: Path, dtype: str) -> None:
    """The usual recipe on a base that ships in bf16/fp16: PEFT merge_and_unload in that dtype,
    save_pretrained.  It rounds twice (the base, then the sum) and stays inside the slack; the
    same recipe with the LoRA scale doubled does not."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    half = getattr(torch, dtype)
    base = tmp_path / f"base-{dtype}"
    AutoModelForCausalLM.from_pretrained(str(BASE), dtype=torch.float32).to(half).save_pretrained(str(base))
    outputs = {}
    for scale in (1, 2):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=half),
                                          str(ADAPTERS[0]))
        for module in model.modules():
            if hasattr(module, "scaling") and isinstance(module.scaling, dict):
                for key in module.scaling:
                    module.scaling[key] *= scale
        outputs[scale] = tmp_path / f"merged-x{scale}"
        model.merge_and_unload().save_pretrained(str(outputs[scale]))
    context = Context(Checkpoint(outputs[1]), Checkpoint(base), adapters=ADAPTERS[:1])
    assert [f.code for f in run_check(checks_of("audit")[0], context).errors] == []
    context = Context(Checkpoint(outputs[2]), Checkpoint(base), adapters=ADAPTERS[:1])
    assert [f.code for f in run_check(checks_of("audit")[0], context).errors] == ["MRG001"]


def test_base_saved_as_the_merge_lost_everything() -> None:
    (finding,) = run(BASE)[0]
    assert finding.code == "MRG001" and "overall 100 %" in finding.message
    assert "100 % of the updated entries still hold the base's value" in finding.message


def test_adapters_that_do_not_fit_the_base(tmp_path: Path) -> None:
    other = shutil.copytree(ADAPTERS[0], tmp_path / "ia3")
    config = json.loads((other / "adapter_config.json").read_text())
    config["peft_type"] = "IA3"
    (other / "adapter_config.json").write_text(json.dumps(config))
    (finding,) = run(MERGED, adapters=(other,))[0]
    assert finding.code == "MRG002" and "'IA3' is not audited" in finding.message


def test_round_to_bfloat16_rounds_to_nearest_even() -> None:
    import torch

    values = np.random.default_rng(3).standard_normal(10_000) * 7
    expected = torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16).double().numpy()
    assert np.array_equal(round_to(values, "BF16"), expected)
    assert np.array_equal(round_to(values, "F16"), values.astype(np.float16).astype(np.float64))


def test_plugin_audits_a_merge_it_built_in_bfloat16(pytester: pytest.Pytester) -> None:
    adapters = [f"--llm-adapter={a}" for a in ADAPTERS]
    result = pytester.runpytest_subprocess(f"--llm-base={BASE}", *adapters, "--llm-merge-dtype=bfloat16",
                                           "--llm-audit-merge", "-m", "llmmerge_audit", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*audit check 'merge_precision' failed on *",
                                 "*MRG001 model*.safetensors: 14 of 14 updated tensors lost more than*"])
    passing = pytester.runpytest_subprocess(f"--llm-base={BASE}", *adapters, "--llm-audit-merge",
                                            "-m", "llmmerge_audit", "-p", "no:cacheprovider")
    passing.assert_outcomes(passed=1)
