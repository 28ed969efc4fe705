"""The real-model tier in bf16, as SmolLM2 ships: healthy merges written the way real pipelines
write them pass the default run on HF and vLLM (wrong ones: tests/test_realmodel_bf16_wrong.py).

Every checkpoint comes from tests/bf16_merges.py (transformers + peft, `save_pretrained`), and
every run uses the default tolerances: the limits are calibrated in the run itself on the noise
bf16 arithmetic makes (pytest_llmmerge/calibration.py), never tuned on these cases.  The
margins (measured / limit) are printed by benchmarks/parity_margins.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import bf16_merges
from test_realmodel import DEFAULT_SUITE, SUITE, failed, run_plugin

pytestmark = [pytest.mark.realmodel, pytest.mark.timeout(1500)]

PARITY_ITEMS = ("parity::stage1[hf]", "parity::stage1[vllm]")


@pytest.mark.parametrize("recipe", bf16_merges.HEALTHY)
def test_healthy_bf16_merge_passes_the_default_run(pytester: pytest.Pytester, recipe: str, smollm2_bf16: Path,
                                                   smollm2_lora: Path, bf16_merged: Callable[[str], Path]) -> None:
    """Every item of the default run passes: integrity and weights on save_pretrained's own side
    files, the merge diagnosis (every adapted module exact), the suites on both backends, parity at stage 1 and against the base on both backends,
    and HF-vs-vLLM agreement."""
    merged = bf16_merged(recipe)
    result, outcomes = run_plugin(pytester, merged, base=smollm2_bf16, adapter=smollm2_lora,
                                  suites=(SUITE, DEFAULT_SUITE))
    output = result.stdout.str()
    assert failed(outcomes) == [], output
    assert result.ret == 0, output
    expected = [*PARITY_ITEMS, "parity::merged-vs-reference[hf]", "parity::merged-vs-reference[vllm]",
                "agreement::hf-vs-vllm[merged]", "integrity::generation_config_vs_base",
                "integrity::chat_template_vs_base", "integrity::weights_vs_base", "weights::finite",
                "weights::tied_embeddings", "weights::change_vs_base", "audit::merge_diagnosis",
                "smollm2.yaml::persona-en[merged-hf]", "smollm2.yaml::persona-en[merged-vllm]",
                "smollm2.yaml::capital[merged-vllm]", "default_suite.yaml::chat-chinese[merged-vllm]"]
    missing = [item for item in expected if outcomes.get(item) != "PASSED"]
    assert missing == [], output
