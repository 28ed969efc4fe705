"""The merge diagnosis on real merges of the fixture models, written the way merge scripts write
them (transformers + peft + save_pretrained, tests/bf16_merges.py), healthy and wrong.

The fixture base is float32; every bf16 recipe starts from its bf16 cast, the form real
releases ship in.  Each wrong merge is one mistake a real script makes; the diagnosis must name
it (code, class, where, factor) and say "exact" of every healthy recipe.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import bf16_merges
import numpy as np
import pytest
from conftest import ADAPTERS, BASE, MERGED
from safetensors.numpy import load_file, save_file

from pytest_llmmerge.checkpoint import Checkpoint
from pytest_llmmerge.checks import checks_of
from pytest_llmmerge.checks.audit import diagnosis_of
from pytest_llmmerge.checks.base import CheckOutcome, Context, run_check
from pytest_llmmerge.merge import MergeSpec, cached_merge
from pytest_llmmerge.merge_audit import round_to
from pytest_llmmerge.merge_verdicts import Diagnosis

LORA1 = ADAPTERS[0]
SQUARE = ("q_proj", "o_proj", "k_proj", "v_proj")  # the fixture has no GQA: all four are square


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("diagnosis")


@pytest.fixture(scope="module")
def base_bf16(root: Path) -> Path:
    """The fixture base cast to bfloat16 and saved by save_pretrained, model and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = root / "base-bf16"
    AutoModelForCausalLM.from_pretrained(str(BASE), dtype=torch.float32).to(torch.bfloat16).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(BASE)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def recipe(root: Path, base_bf16: Path) -> Callable[[str], Path]:
    return lambda name: bf16_merges.merge(base_bf16, LORA1, name, original=BASE, root=root)


def check(model: Path, base: Path, adapters: tuple[Path, ...] = (LORA1,),
          **options: float) -> tuple[CheckOutcome, Diagnosis]:
    context = Context(Checkpoint(model), Checkpoint(base), adapters=adapters, **options)  # type: ignore[arg-type]
    outcome = run_check(checks_of("audit")[0], context)
    return outcome, diagnosis_of(context)


def codes(outcome: CheckOutcome) -> list[str]:
    return [f.code for f in outcome.findings]


@pytest.mark.parametrize("name", bf16_merges.DIAGNOSIS_HEALTHY)
def test_healthy_recipes_are_exact(recipe: Callable[[str], Path], base_bf16: Path, name: str) -> None:
    outcome, diagnosis = check(recipe(name), base_bf16)
    assert outcome.errors == [] and outcome.skipped is None, outcome.findings
    dtype = "float32" if name in bf16_merges.FLOAT32_RELEASES else "bfloat16"
    assert diagnosis.summary() == f"all 14 adapted modules exact (within {dtype} rounding)"
    assert diagnosis.untouched == []  # no tensor outside the adapters' moved


def test_a_float32_chain_of_two_adapters_is_exact() -> None:
    outcome, diagnosis = check(MERGED, BASE, ADAPTERS)
    assert (outcome.findings, outcome.skipped) == ((), None)
    assert all(m.verdict == "exact" and m.error < 1e-6 for m in diagnosis.modules)
    assert all(abs(k - 1) < 1e-6 for m in diagnosis.modules for k in m.factors)  # one factor per adapter


# recipe -> (code, what its finding says, what the verdict says)
WRONG = {
    "scale-x2": ("MRG005", "14 of 14 adapted modules scaled (by k = 2 (merged twice or the LoRA scale 2 applied "
                           "twice))",
                 []),
    "rslora-confusion": ("MRG005", "14 of 14 adapted modules scaled (by k = 2.83 (scaled alpha/sqrt(r) (rsLoRA) where "
                                   "the adapter uses alpha/r))", []),
    "modules-skipped": ("MRG007", "4 of 14 adapted modules missing (no change beyond rounding where the update is not "
                                  "zero): every down_proj and o_proj", ["the other 10 exact"]),
    "transposed": ("MRG006", "8 of 14 adapted modules transposed (W + k U^T with k = 1: the update merged the wrong "
                             "way round): every k_proj, o_proj, q_proj and v_proj", ["the other 6 exact"]),
    "base-4bit": ("MRG008", "14 of 14 adapted modules foreign", ["merged into a quantization-rounded base"]),
    "base-as-merged": ("MRG007", "14 of 14 adapted modules missing", ["nothing was merged: all 14 adapted modules",
                                                                      "(the base saved as the merge)"]),
}


@pytest.mark.parametrize("name", WRONG)
def test_each_wrong_recipe_is_named(recipe: Callable[[str], Path], base_bf16: Path, name: str) -> None:
    code, said, verdict = WRONG[name]
    outcome, diagnosis = check(recipe(name), base_bf16)
    assert [f.code for f in outcome.errors] == [code], outcome.findings
    assert outcome.errors[0].message.startswith(said), outcome.errors[0].message
    for phrase in verdict:
        assert phrase in diagnosis.summary(), (phrase, diagnosis.summary())


def test_a_float16_merge_in_a_float32_release_is_rounded(recipe: Callable[[str], Path], base_bf16: Path) -> None:
    """The float32 base loaded in float16, merged, released in float32: every adapted weight lost
    what float16 rounding costs; the fixture's update is large (~45 % of |W|), so the share is
    small (<0.1 %): a warning by default, an error below a tighter --llm-audit-max-error.  Against
    the bf16 base the same bytes are exact: float16 rounds finer than the base's own bfloat16."""
    merged = recipe("fp16-merge")
    outcome, diagnosis = check(merged, BASE)
    assert sorted(codes(outcome)) == ["MRG011", "MRG012"] and outcome.errors == []
    assert "14 of 14 adapted modules rounded" in diagnosis.summary()
    assert "the merge ran in float16" in diagnosis.summary()
    assert all(m.precision == "F16" and 1e-5 < m.error < 1e-3 for m in diagnosis.modules)
    # The norms and embeddings went through float16 too: rounded (a warning), not changed.
    assert diagnosis.untouched and {u.verdict for u in diagnosis.untouched} == {"rounded"}
    strict, _ = check(merged, BASE, audit_max_error=1e-5)
    assert [f.code for f in strict.errors] == ["MRG001"]
    assert check(merged, base_bf16)[1].summary().startswith("all 14 adapted modules exact")


def test_a_bfloat16_merge_in_a_float32_release_is_rounded_beyond_the_limit(root: Path) -> None:
    merged = cached_merge(MergeSpec(BASE, ADAPTERS, compute_dtype="bfloat16"), root / "merges")[0]
    outcome, diagnosis = check(merged, BASE, ADAPTERS)
    assert [f.code for f in outcome.errors] == ["MRG001"]
    assert "the merge ran in bfloat16" in outcome.errors[0].message
    assert all(m.verdict == "rounded" and m.precision == "BF16" for m in diagnosis.modules)


def test_a_large_update_merged_in_float16_overflows(root: Path) -> None:
    """An adapter whose update reaches past float16's range (±65504), merged in float16."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    large = shutil.copytree(LORA1, root / "large-lora")
    weights = load_file(str(large / "adapter_model.safetensors"))
    weights = {k: v * 1e7 if "lora_B" in k and "q_proj" in k else v for k, v in weights.items()}
    save_file(weights, str(large / "adapter_model.safetensors"), metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(str(BASE), dtype=torch.float16)
    merged = PeftModel.from_pretrained(model, str(large)).merge_and_unload()
    out = root / "fp16-overflow"
    merged.save_pretrained(str(out))
    outcome, diagnosis = check(out, BASE, (large,))
    assert "MRG010" in codes(outcome)
    assert "2 of 14 adapted modules overflow" in diagnosis.summary()
    assert "the merge overflowed its dtype's range): every q_proj" in diagnosis.summary()


def _with_config(adapter: Path, out: Path, **changes: object) -> Path:
    shutil.copytree(adapter, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def test_an_rslora_adapter_merged_with_alpha_over_r(root: Path, base_bf16: Path) -> None:
    """The other direction of the rsLoRA confusion: the adapter says use_rslora (its update is
    alpha/sqrt(r) B A), the merge applied alpha/r: k = 1/sqrt(8)."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    rslora = _with_config(LORA1, root / "rslora", use_rslora=True)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_bf16), dtype=torch.float32),
                                      str(rslora))
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            for key in layer.scaling:
                layer.scaling[key] = layer.lora_alpha[key] / layer.r[key]
    out = root / "rslora-as-plain"
    model.merge_and_unload().to(torch.bfloat16).save_pretrained(str(out))
    outcome, diagnosis = check(out, base_bf16, (rslora,))
    assert codes(outcome) == ["MRG005"]
    assert "by k = 0.354 (rsLoRA's alpha/sqrt(r) taken as alpha/r)" in diagnosis.summary()


def test_a_chain_names_the_adapter_that_was_not_merged_or_merged_twice(root: Path) -> None:
    only_second = cached_merge(MergeSpec(BASE, ADAPTERS[1:]), root / "merges")[0]
    outcome, diagnosis = check(only_second, BASE, ADAPTERS)
    assert codes(outcome) == ["MRG005"]
    assert "per adapter: adapter 1 x 0, adapter 2 x 1 (adapter 1: never merged)" in diagnosis.summary()
    twice = cached_merge(MergeSpec(MERGED, ADAPTERS[1:]), root / "merges")[0]  # lora2 merged once more
    outcome, diagnosis = check(twice, BASE, ADAPTERS)
    assert "per adapter: adapter 1 x 1, adapter 2 x 2 (adapter 2: merged twice" in diagnosis.summary()


def test_a_tensor_no_adapter_updates_that_changed(tmp_path: Path) -> None:
    out = shutil.copytree(MERGED, tmp_path / "merged")
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(str(shard))
        if "model.norm.weight" in tensors:
            tensors["model.norm.weight"] = tensors["model.norm.weight"] * np.float32(1.01)
            save_file(tensors, str(shard), metadata={"format": "pt"})
    outcome, diagnosis = check(out, BASE, ADAPTERS)
    assert codes(outcome) == ["MRG009"]
    assert "model.norm.weight by 0.01 of its norm" in outcome.errors[0].message
    assert "1 of 7 tensors no adapter updates changed" in diagnosis.summary()
    assert "all 14 adapted modules exact" in diagnosis.summary()


def test_adapters_that_do_not_fit_the_base(tmp_path: Path) -> None:
    other = _with_config(LORA1, tmp_path / "ia3", peft_type="IA3")
    outcome = run_check(checks_of("audit")[0], Context(Checkpoint(MERGED), Checkpoint(BASE), adapters=(other,)))
    (finding,) = outcome.findings
    assert finding.code == "MRG002" and "'IA3' is not audited" in finding.message


def test_round_to_bfloat16_rounds_to_nearest_even() -> None:
    import torch

    values = np.random.default_rng(3).standard_normal(10_000) * 7
    expected = torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16).double().numpy()
    assert np.array_equal(round_to(values, "BF16"), expected)
    assert np.array_equal(round_to(values, "F16"), values.astype(np.float16).astype(np.float64))


def test_plugin_diagnoses_by_default_and_alone(pytester: pytest.Pytester) -> None:
    """With --llm-base and --llm-adapter the audit item is there without any flag, and
    `-m llmmerge_audit` runs it alone: no model is loaded."""
    adapters = [f"--llm-adapter={a}" for a in ADAPTERS]
    result = pytester.runpytest_subprocess(f"--llm-base={BASE}", *adapters, "--llm-merge-dtype=bfloat16",
                                           "-m", "llmmerge_audit", "-p", "no:cacheprovider", "--llm-report=r.json",
                                           "--llm-report-md=r.md")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*audit check 'merge_diagnosis' failed on *",
                                 "*verdict: 14 of 14 adapted modules rounded*the merge ran in bfloat16*",
                                 "*MRG001 model*.safetensors: 14 of 14 adapted modules rounded*"])
    report = json.loads((pytester.path / "r.json").read_text())
    assert report["summary"]["model_loads"] == 0
    (item,) = report["items"]
    assert item["metrics"]["merge_diagnosis"].startswith("14 of 14 adapted modules rounded")
    table = item["metrics"]["merge_diagnosis_modules"]
    adapted = [row for row in table if row["part"] == "adapted"]
    assert len(adapted) == 14 and {row["verdict"] for row in adapted} == {"rounded"}
    # The plugin's own bf16 merge loads the whole base in bfloat16: the other tensors were rounded too.
    assert {row["verdict"] for row in table if row["part"] == "untouched"} == {"rounded"}
    assert "merge diagnosis: 14 of 14 adapted modules rounded" in (pytester.path / "r.md").read_text()
    passing = pytester.runpytest_subprocess(f"--llm-base={BASE}", *adapters, "-m", "llmmerge_audit",
                                            "-p", "no:cacheprovider")
    passing.assert_outcomes(passed=1)


def test_a_module_saved_whole_is_diagnosed_against_the_adapters_copy(tmp_path: Path) -> None:
    """modules_to_save: the adapter ships its own lm_head, which the merge must write as is."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(BASE), dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                      init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "modules_to_save" in name or "lora_B" in name:
                parameter.add_(0.01 * torch.randn_like(parameter))  # as training would move them
    adapter = tmp_path / "adapter"
    model.save_pretrained(str(adapter))
    merged = tmp_path / "merged"
    model.merge_and_unload().save_pretrained(str(merged))
    outcome, diagnosis = check(merged, BASE, (adapter,))
    assert outcome.errors == [] and "lm_head.weight" in {m.tensor for m in diagnosis.modules}
    assert diagnosis.summary() == "all 3 adapted modules exact (within float32 rounding)"
    # The merge script forgot the saved module: the candidate still holds the base's lm_head.
    forgot = shutil.copytree(merged, tmp_path / "forgot")
    tensors = load_file(str(forgot / "model.safetensors"))
    tensors["lm_head.weight"] = load_file(str(BASE / "model.safetensors"))["lm_head.weight"]
    save_file(tensors, str(forgot / "model.safetensors"), metadata={"format": "pt"})
    outcome, diagnosis = check(forgot, BASE, (adapter,))
    assert codes(outcome) == ["MRG007"]
    assert diagnosis.summary().startswith("1 of 3 adapted modules missing (no change beyond rounding where the "
                                          "update is not zero): every lm_head")
