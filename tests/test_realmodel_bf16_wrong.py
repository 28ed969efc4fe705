"""The real-model tier in bf16: wrong merges, each one real mistake written the way pipelines
write checkpoints (tests/bf16_merges.py), fail parity on HF and on vLLM with the default
tolerances, and the failure blames the merge.  The healthy merges of the same recipes pass:
tests/test_realmodel_bf16.py.  (A file of its own so that pytest-xdist's loadfile runs the two
halves on different workers.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import bf16_merges
from test_realmodel import failed, run_plugin, section

pytestmark = [pytest.mark.realmodel, pytest.mark.timeout(1500)]

PARITY_ITEMS = ("parity::stage1[hf]", "parity::stage1[vllm]")
# recipe -> what the merge diagnosis under the parity failure says of it (the whole verdicts:
# tests/test_realmodel_diagnosis.py)
DIAGNOSED = {"scale-x2": "(merged twice or the LoRA scale 2 applied twice)", "modules-skipped": "60 of 150 adapted modules missing",
             "base-4bit": "150 of 150 adapted modules foreign", "base-as-merged": "nothing was merged"}


@pytest.mark.parametrize("recipe", bf16_merges.WRONG)
def test_wrong_bf16_merge_fails_parity_on_hf_and_vllm(pytester: pytest.Pytester, recipe: str, smollm2_bf16: Path,
                                                      smollm2_lora: Path,
                                                      bf16_merged: Callable[[str], Path]) -> None:
    """Stage-1 parity fails on both backends, names the figures it judged and blames the merge
    (the same fine-tune unmerged, in bf16 on the same backend, stays within the noise)."""
    merged = bf16_merged(recipe)
    result, outcomes = run_plugin(pytester, merged, "-k", "parity and stage1", base=smollm2_bf16,
                                  adapter=smollm2_lora, suites=())
    output = result.stdout.str()
    assert failed(outcomes) == list(PARITY_ITEMS), output
    for item in PARITY_ITEMS:
        text = section(output, item)
        assert "mean per-token KL" in text and "x noise" in text, text
        assert "To blame: the merge of adapter 1" in text, text
        assert "merge diagnosis of the merge: " in text and DIAGNOSED[recipe] in text, text
