"""The real-model tier: the plugin on SmolLM2-135M-Instruct, a LoRA trained on it and their merge.

Skipped unless asked for (`--run-realmodel` or LLMMERGE_REALMODEL=1): the first run converts
the GGUF, trains the adapter and merges it (minutes of CPU), later runs find them cached
(tests/realmodel_support.py).  Each test runs the plugin for real in a subprocess (pytester),
on copies of a healthy bf16 release (PEFT merge_and_unload on the bf16 base, written by
save_pretrained: tests/bf16_merges.py, whose healthy merges pass the whole default run in
tests/test_realmodel_bf16.py) broken the way merged checkpoints break in the field
(shared/FIELD-FAILURES.md), and checks that the right item fails with the right message.
One plugin run serves several assertions, and each run selects only the items it needs:
model loads (about 10 s on HF, 20-30 s on vLLM here) dominate the tier's time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

import realmodel_support
from breakage import chat_template_deleted, shard_deleted
from conftest import REPO

pytestmark = [pytest.mark.realmodel, pytest.mark.timeout(1500)]

SUITES = REPO / "tests" / "realmodel_suites"
SUITE = SUITES / "smollm2.yaml"
# Five documents of the default corpus (three English, two Chinese; about 730 SmolLM2 tokens)
# instead of all fifteen: parity and agreement score it on every side, and on SmolLM2 the full
# corpus costs minutes here.  The Chinese noodle recipe is kept: it is the document whose
# perplexity moved most when an over-trained adapter was merged.
CORPUS = SUITES / "corpus.txt"
DEFAULT_SUITE = REPO / "pytest_llmmerge" / "default_suite.yaml"
IM_END, ENDOFTEXT = 2, 0  # SmolLM2's <|im_end|> (its eos) and <|endoftext|> (its pretraining eos)
_RESULT_LINE = re.compile(r"^(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS) (\S+)")


def copy_model(healthy: Path, dest: Path) -> Path:
    """A copy of `healthy` whose weight files are hard links (the breakages here only rewrite
    JSON files or unlink whole weight files, which leaves the cached original alone)."""
    def link_weights(src: str, dst: str) -> object:
        if src.endswith(".safetensors"):
            try:
                os.link(src, dst)
                return dst
            except OSError:
                pass
        return shutil.copy2(src, dst)

    shutil.copytree(healthy, dest, copy_function=link_weights)
    return dest


def run_plugin(pytester: pytest.Pytester, model: Path, *args: str, base: Path | None = None,
               adapter: Path | None = None, suites: tuple[Path, ...] = (SUITE,)) -> tuple[Any, dict[str, str]]:
    """Run pytest with the plugin on `model`; (result, {item id: outcome} from the -rA summary).

    The suites are copied next to the run so their items are named `<file>::<case>[...]`."""
    for suite in suites:
        shutil.copy(suite, pytester.path / suite.name)
    options = [f"--llm-model={model}", f"--llm-corpus={CORPUS}", "-rA", "-p", "no:cacheprovider"]
    if base is not None:
        options.append(f"--llm-base={base}")
    if adapter is not None:
        options.append(f"--llm-adapter={adapter}")
    result = pytester.runpytest_subprocess(*options, *args, *(s.name for s in suites))
    output = result.stdout.str()
    assert "INTERNALERROR" not in output + result.stderr.str(), output
    outcomes = {}
    for line in output.splitlines():
        match = _RESULT_LINE.match(line)
        if match:
            outcomes[match[2]] = match[1]
    return result, outcomes


def failed(outcomes: dict[str, str]) -> list[str]:
    return sorted(item for item, outcome in outcomes.items() if outcome in ("FAILED", "ERROR"))


def section(output: str, item: str) -> str:
    """The failure text of one item (between its ___ header and the next one)."""
    start = output.index(f" {item} ___")
    end = output.find("\n___", start)
    return output[start:] if end < 0 else output[start:end]


# --- the inputs ---------------------------------------------------------------------------------

def test_the_adapter_was_really_trained(smollm2_lora: Path, smollm2_merged: Path) -> None:
    """The LoRA's loss fell on its training set and on phrasings it never saw; the merge holds
    one weight file of float32 tensors and no adapter keys."""
    record = realmodel_support.training_record(smollm2_lora)
    before, after = record["loss_before"], record["loss_after"]
    assert after["train"] < before["train"] / 10, record
    assert after["held_out"] < before["held_out"] / 5, record
    assert (smollm2_lora / "adapter_model.safetensors").is_file()
    config = json.loads((smollm2_lora / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["r"] == realmodel_support.Recipe().rank
    assert sorted(config["target_modules"]) == sorted(realmodel_support.Recipe().targets)
    assert json.loads((smollm2_merged / "config.json").read_text(encoding="utf-8"))["dtype"] == "float32"


# --- the healthy merges: tests/test_realmodel_bf16.py ---------------------------------------------

# --- field failures, reproduced on a bf16 release and caught ----------------------------------------

def eos_rewritten_to_endoftext(ckpt: Path) -> None:
    """EasyR1 #11007 / LlamaFactory #7454 on SmolLM2: generation_config's eos <|im_end|> replaced
    by the pretraining eos <|endoftext|> (what SmolLM2's base model, not -Instruct, declares)."""
    path = ckpt / "generation_config.json"
    gen = json.loads(path.read_text(encoding="utf-8"))
    assert gen["eos_token_id"] in (IM_END, [IM_END])
    gen["eos_token_id"] = ENDOFTEXT
    path.write_text(json.dumps(gen, indent=2), encoding="utf-8")


def tokenizer_eos_rewritten_to_endoftext(ckpt: Path) -> None:
    """unsloth #5386: the tokenizer's eos_token rewritten too, so nothing names <|im_end|> any more."""
    path = ckpt / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    assert config["eos_token"] == "<|im_end|>"
    config["eos_token"] = "<|endoftext|>"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def test_eos_dropped_from_generation_config(pytester: pytest.Pytester, tmp_path: Path, smollm2_bf16: Path,
                                            smollm2_shipped: Path) -> None:
    """<|im_end|> dropped from generation_config.json (replaced by <|endoftext|>).

    Integrity fails with GEN003 (and GEN004/GEN005: the tokenizer's eos and the template's
    end-of-turn are no eos id).  HF generate stops only at generation_config's ids, so a chat
    answer runs to its budget.  vLLM also stops at the tokenizer's eos, which is still
    <|im_end|> in SmolLM2: there the answer ends, so agreement::hf-vs-vllm fails on the
    termination difference — the check that tells a user why "it works in vLLM".
    """
    model = copy_model(smollm2_shipped, tmp_path / "merged-eos")
    eos_rewritten_to_endoftext(model)
    result, outcomes = run_plugin(pytester, model, "-k", "integrity or capital or agreement", base=smollm2_bf16)
    output = result.stdout.str()
    assert failed(outcomes) == ["agreement::hf-vs-vllm[merged]", "integrity::generation_config",
                                "integrity::generation_config_vs_base", "smollm2.yaml::capital[merged-hf]"], output
    assert outcomes["smollm2.yaml::capital[merged-vllm]"] == "PASSED", output
    gen = section(output, "integrity::generation_config_vs_base")
    assert "GEN003" in gen and "<|im_end|>" in gen, gen
    assert "GEN004" in section(output, "integrity::generation_config"), output
    capital = section(output, "capital[merged-hf]")
    assert "did not terminate" in capital and "finish_reason=length" in capital, capital
    agreement = section(output, "agreement::hf-vs-vllm[merged]")
    assert "termination differs" in agreement, agreement


def test_eos_rewritten_in_generation_config_and_tokenizer_never_stops_on_vllm(
        pytester: pytest.Pytester, tmp_path: Path, smollm2_bf16: Path, smollm2_shipped: Path) -> None:
    """GLM-4 #297 on SmolLM2: with the tokenizer's eos rewritten as well, vLLM has no
    <|im_end|> left to stop at either, and every chat answer runs to its budget."""
    model = copy_model(smollm2_shipped, tmp_path / "merged-eos-tokenizer")
    eos_rewritten_to_endoftext(model)
    tokenizer_eos_rewritten_to_endoftext(model)
    result, outcomes = run_plugin(pytester, model, "--llm-backend=vllm", "-k", "integrity or capital",
                                  base=smollm2_bf16)
    output = result.stdout.str()
    assert outcomes["smollm2.yaml::capital[merged-vllm]"] == "FAILED", output
    capital = section(output, "capital[merged-vllm]")
    assert "did not terminate" in capital and "finish_reason=length" in capital, capital
    assert "GEN003" in section(output, "integrity::generation_config_vs_base"), output
    assert "TOK002" in section(output, "integrity::tokenizer_vs_base"), output


def test_chat_template_lost(pytester: pytest.Pytester, tmp_path: Path, smollm2_bf16: Path,
                            smollm2_shipped: Path) -> None:
    """LlamaFactory #8399: the chat template gone from the merged tokenizer files.  TOK004 fails,
    and every messages case fails because its prompt cannot be rendered."""
    model = copy_model(smollm2_shipped, tmp_path / "merged-no-template")
    chat_template_deleted(model)
    result, outcomes = run_plugin(pytester, model, "--llm-backend=hf", "-k", "integrity or merged-hf",
                                  base=smollm2_bf16)
    output = result.stdout.str()
    cases = ["capital[merged-hf]", "persona-en[merged-hf]", "persona-zh[merged-hf]"]
    assert failed(outcomes) == ["integrity::chat_template_vs_base", *sorted(f"smollm2.yaml::{c}" for c in cases)], \
        output
    assert "TOK004" in section(output, "integrity::chat_template_vs_base"), output
    for case in cases:
        assert "no chat template" in section(output, case), output


def test_one_shard_missing_from_a_sharded_save(pytester: pytest.Pytester, tmp_path: Path, smollm2_bf16: Path,
                                               smollm2_shipped_sharded: Path) -> None:
    """mergekit #54/#107: a save killed part-way, one of several shards missing.  The healthy sharded
    save passes every integrity item; without its last shard weight_files fails with WGT002."""
    shards = sorted(smollm2_shipped_sharded.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (smollm2_shipped_sharded / "model.safetensors.index.json").is_file()
    result, outcomes = run_plugin(pytester, smollm2_shipped_sharded, "-m", "llmmerge_integrity",
                                  base=smollm2_bf16, suites=())
    assert failed(outcomes) == [] and result.ret == 0, result.stdout.str()

    model = copy_model(smollm2_shipped_sharded, tmp_path / "merged-shard-missing")
    shard_deleted(model)
    result, outcomes = run_plugin(pytester, model, "-m", "llmmerge_integrity", base=smollm2_bf16, suites=())
    output = result.stdout.str()
    assert failed(outcomes) == ["integrity::weight_files"], output
    text = section(output, "integrity::weight_files")
    assert "WGT002" in text and shards[-1].name in text, text


# bfloat16 merge precision loss and tied-embedding divergence: tests/test_realmodel_weights.py
