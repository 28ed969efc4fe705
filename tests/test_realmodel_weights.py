"""The real-model tier, part two: the tensor-data checks and the merge diagnosis on
SmolLM2-135M-Instruct, its trained LoRA and their merge (fixtures in conftest.py).

The field failures reproduced here: a merge computed in bfloat16 (peft #1388: W_bf16 != W + BA;
the adapter alone is fine, the merged model worse) and tied embeddings that diverge after a
merge while tie_word_embeddings stays true (transformers #45127) — SmolLM2 is a tied model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import realmodel_support
from pytest_llmmerge.checkpoint import Checkpoint
from pytest_llmmerge.merge import MergeSpec, cached_merge
from pytest_llmmerge.merge_diagnosis import diagnose
from test_realmodel import copy_model, failed, run_plugin, section

pytestmark = [pytest.mark.realmodel, pytest.mark.timeout(1500)]
FILE_CHECKS = ("-m", "llmmerge_weights or llmmerge_audit or llmmerge_integrity")


@pytest.fixture(scope="session")
def smollm2_bf16_merge(smollm2_base: Path, smollm2_lora: Path) -> Path:
    """The same merge computed in bfloat16 (peft loads the base in bf16, merges, the builder casts
    back to the base's float32): the rounding of peft #1388, cached like the float32 merge."""
    return cached_merge(MergeSpec(smollm2_base, (smollm2_lora,), compute_dtype="bfloat16"),
                        realmodel_support.cache_root() / "merges")[0]


def test_healthy_merge_passes_weights_and_audit(pytester: pytest.Pytester, smollm2_base: Path,
                                               smollm2_lora: Path, smollm2_merged: Path) -> None:
    result, outcomes = run_plugin(pytester, smollm2_merged, "--llm-audit-merge", "--llm-report=report.json",
                                  *FILE_CHECKS, base=smollm2_base, adapter=smollm2_lora, suites=())
    assert failed(outcomes) == [] and result.ret == 0, result.stdout.str()
    assert {"weights::finite", "weights::tied_embeddings", "weights::change_vs_base",
            "audit::merge_diagnosis"} <= set(outcomes)
    report = json.loads((pytester.path / "report.json").read_text())
    audit_item = next(i for i in report["items"] if i["nodeid"] == "audit::merge_diagnosis")
    rows = audit_item["metrics"]["merge_diagnosis_modules"]
    assert audit_item["metrics"]["merge_diagnosis"] == "all 150 adapted modules exact (within float32 rounding)"
    assert len(rows) == 150 and max(row["error"] for row in rows) < 1e-4  # 30 layers x 5 projections, float32
    change = next(i for i in report["items"] if i["nodeid"] == "weights::change_vs_base")["metrics"]
    layers = {k: v for k, v in change.items() if k.startswith("weight_change:model.layers.")}
    assert len(layers) == 30 and 0 < min(layers.values()) and max(layers.values()) < 0.05


def test_bf16_merge_precision_loss_is_caught(pytester: pytest.Pytester, smollm2_base: Path,
                                            smollm2_lora: Path, smollm2_bf16_merge: Path) -> None:
    """peft #1388 on the real model: merged in bfloat16 and cast back to float32."""
    diagnosis = diagnose(Checkpoint(smollm2_bf16_merge), Checkpoint(smollm2_base), (smollm2_lora,))
    # A real LoRA's update is 0.4-2 % of |W|; bfloat16 keeps 8 bits of |W|: most of it rounds off.
    assert all(m.verdict == "rounded" and m.precision == "BF16" and m.error > 0.05 for m in diagnosis.modules)
    assert max(m.vanished for m in diagnosis.modules) > 0.01  # entries that did not move at all
    result_run, outcomes = run_plugin(pytester, smollm2_bf16_merge, *FILE_CHECKS,
                                      base=smollm2_base, adapter=smollm2_lora, suites=())
    output = result_run.stdout.str()
    assert failed(outcomes) == ["audit::merge_diagnosis"], output
    text = section(output, "audit::merge_diagnosis")
    assert "MRG001" in text and "150 of 150 adapted modules rounded" in text and "merge in float32" in text, text
    assert "the merge ran in bfloat16" in text, text


def test_tied_embedding_divergence(pytester: pytest.Pytester, tmp_path: Path, smollm2_base: Path,
                                   smollm2_merged: Path) -> None:
    """transformers #45127: after a merge that touched the output layer, the save holds an
    lm_head.weight that differs from embed_tokens while the config still says tied; loaders tie
    them again and drop one.  And the other direction: untied on paper, no lm_head on disk."""
    config = json.loads((smollm2_merged / "config.json").read_text(encoding="utf-8"))
    assert config["tie_word_embeddings"] is True
    diverged = shutil.copytree(smollm2_merged, tmp_path / "diverged")
    weights = diverged / "model.safetensors"
    tensors = load_file(str(weights))
    embedding = tensors["model.embed_tokens.weight"]
    rng = np.random.default_rng(0)  # a rank-8 update, as a LoRA on lm_head merged into it alone
    update = rng.standard_normal((embedding.shape[0], 8)) @ rng.standard_normal((8, embedding.shape[1]))
    tensors["lm_head.weight"] = (embedding + 1e-3 * update).astype(embedding.dtype)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    del tensors

    untied = copy_model(smollm2_merged, tmp_path / "untied-without-lm-head")
    (untied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}), encoding="utf-8")

    result, outcomes = run_plugin(pytester, diverged, "-m", "llmmerge_weights", suites=())
    output = result.stdout.str()
    assert failed(outcomes) == ["weights::tied_embeddings"], output
    text = section(output, "weights::tied_embeddings")
    assert "WGT015" in text and "lm_head.weight differs from model.embed_tokens.weight" in text, text

    result, outcomes = run_plugin(pytester, untied, "-m", "llmmerge_weights", suites=())
    output = result.stdout.str()
    assert failed(outcomes) == ["weights::tied_embeddings"], output
    assert "WGT016" in section(output, "weights::tied_embeddings")
