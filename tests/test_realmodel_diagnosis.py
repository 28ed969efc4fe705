"""The merge diagnosis on the real model: SmolLM2-135M-Instruct in bf16 and its trained LoRA,
merged by every recipe of tests/bf16_merges.py (transformers + peft + save_pretrained, one
real mistake each), each run through the plugin alone (`-m llmmerge_audit`: no model loads).

The LoRA targets q_proj, v_proj, o_proj, up_proj and down_proj of 30 layers (150 weights);
q_proj and o_proj are the square ones (576 x 576).  Some down_proj updates are smaller than
bfloat16's rounding of their weights: they are judged by the share of the update they keep
against the share a perfect bf16 merge keeps (an unmerged one keeps none).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bf16_merges
import pytest
from test_realmodel import failed, run_plugin, section

pytestmark = [pytest.mark.realmodel, pytest.mark.timeout(1500)]

ITEM = "audit::merge_diagnosis"
# recipe -> (the code of the failure, what the verdict says)
WRONG = {
    "scale-x2": ("MRG005", ["140 of 150 adapted modules scaled (by k = 1.99 to 2 (merged twice or the LoRA scale 2 "
                            "applied twice))", "every up_proj, o_proj, q_proj and v_proj; down_proj in layers",
                            "the other 10 exact (in 10 of them the update is below bfloat16 rounding"]),
    "rslora-confusion": ("MRG005", ["150 of 150 adapted modules scaled (by k = 2.83 (scaled alpha/sqrt(r) (rsLoRA) "
                                    "where the adapter uses alpha/r))"]),
    "modules-skipped": ("MRG007", ["60 of 150 adapted modules missing (no change beyond rounding where the update "
                                   "is not zero): every down_proj and o_proj; the other 90 exact"]),
    "transposed": ("MRG006", ["60 of 150 adapted modules transposed", "every o_proj and q_proj"]),
    "base-4bit": ("MRG008", ["150 of 150 adapted modules foreign", "merged into a quantization-rounded base",
                             "60 of 122 tensors no adapter updates changed",
                             "they lie on a quantization grid: the base was quantized): gate_proj and k_proj"]),
    "base-as-merged": ("MRG007", ["nothing was merged: all 150 adapted modules hold the base's weights",
                                  "(the base saved as the merge)"]),
    "fp16-merge": ("MRG001", ["150 of 150 adapted modules rounded", "the merge ran in float16"]),
}


def _run(pytester: pytest.Pytester, merged: Path, base: Path,
         adapter: Path) -> tuple[str, dict[str, str], dict[str, Any]]:
    result, outcomes = run_plugin(pytester, merged, "-m", "llmmerge_audit", "--llm-report=report.json",
                                  base=base, adapter=adapter, suites=())
    report = json.loads((pytester.path / "report.json").read_text(encoding="utf-8"))
    assert report["summary"]["model_loads"] == 0
    (item,) = report["items"]
    return result.stdout.str(), outcomes, item


@pytest.mark.parametrize("recipe", bf16_merges.DIAGNOSIS_HEALTHY)
def test_healthy_recipes_are_exact(pytester: pytest.Pytester, recipe: str, smollm2_bf16: Path, smollm2_lora: Path,
                                   bf16_merged: Callable[[str], Path]) -> None:
    output, outcomes, item = _run(pytester, bf16_merged(recipe), smollm2_bf16, smollm2_lora)
    assert outcomes == {ITEM: "PASSED"}, output
    verdict = item["metrics"]["merge_diagnosis"]
    assert verdict.startswith("all 150 adapted modules exact"), verdict
    rows = item["metrics"]["merge_diagnosis_modules"]
    assert len(rows) == 150 and {row["verdict"] for row in rows} == {"exact"}


@pytest.mark.parametrize("recipe", WRONG)
def test_each_wrong_recipe_is_named_in_its_failure(pytester: pytest.Pytester, recipe: str, smollm2_bf16: Path,
                                                   smollm2_base: Path, smollm2_lora: Path,
                                                   bf16_merged: Callable[[str], Path]) -> None:
    code, phrases = WRONG[recipe]
    # The float16 merge starts from the float32 original: judged against it (against the bf16
    # base, whose own rounding is coarser than float16's, it is exact).
    base = smollm2_base if recipe == "fp16-merge" else smollm2_bf16
    output, outcomes, item = _run(pytester, bf16_merged(recipe), base, smollm2_lora)
    assert failed(outcomes) == [ITEM], output
    text = section(output, ITEM)
    assert f"  {code} " in text, text
    for phrase in phrases:
        assert phrase in text and phrase in item["metrics"]["merge_diagnosis"], (phrase, text)
