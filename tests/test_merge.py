"""The merge builder on the real fixture models: chain, cache, atomicity, tied weights, dtypes, scale."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ADAPTERS, BASE, FIXTURES, MERGED, REPO
from pytest_llmmerge.checkpoint import Checkpoint
from pytest_llmmerge.merge import MergeSpec, build_chain, build_merged, cached_merge
from pytest_llmmerge.safetensors_header import read_safetensors_header

torch = pytest.importorskip("torch")

LORA1, LORA2 = ADAPTERS
TIED, TIED_ADAPTER = FIXTURES / "tied", FIXTURES / "tied-adapter"
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "chat_template.jinja")
PROMPTS = (
    "Repeat: apple river\nAnswer:",
    "Add: 3 4\nAnswer:",
    "<|im_start|>user\n功能清单:\n功能:查询天气 功能说明:用户想知道天气。\n"
    "功能:无法判断 功能说明:不属于上述描述的功能。\n用户问题:明天下雨吗\n请回答功能名。<|im_end|>\n"
    "<|im_start|>assistant\n",
)


@pytest.fixture(scope="module", autouse=True)
def two_threads() -> Iterator[None]:
    """Others share this 2-core machine: never use more than 2 torch threads here."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[str], float]:
    """base + lora1 + lora2 built stage by stage: (stage dirs, progress messages, seconds)."""
    messages: list[str] = []
    started = time.monotonic()
    stages = build_chain(BASE, ADAPTERS, tmp_path_factory.mktemp("cache"), progress=messages.append)
    return stages, messages, time.monotonic() - started


def weights(directory: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for name in Checkpoint(directory).model_weight_files():
        out.update(load_file(str(directory / name)))
    return out


def max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def logits(directory: Path) -> list[Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(BASE))
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)  # in eval mode
    with torch.no_grad():
        return [model(**tok(p, return_tensors="pt")).logits[0] for p in PROMPTS]


def test_chain_reproduces_fixture_merged(chain: tuple[list[Path], list[str], float]) -> None:
    stages, messages, seconds = chain
    assert len(stages) == 2 and all(s.is_dir() for s in stages)
    final = stages[-1]
    diff = max(float((a - b).abs().max()) for a, b in zip(logits(final), logits(MERGED)))
    print(f"\n2-stage chain built in {seconds:.1f} s; max |logit diff| vs fixtures/merged: {diff:.3g}")
    assert diff <= 1e-4
    for stage in stages:
        for name in COPIED:
            assert (stage / name).read_bytes() == (BASE / name).read_bytes(), f"{stage.name}/{name}"
        ckpt = Checkpoint(stage)
        # Same tensors as the base, as many shards (one), nothing of the adapter.
        assert ckpt.tensor_names() == Checkpoint(BASE).tensor_names()
        assert ckpt.model_weight_files() == ["model.safetensors"]
        assert not ckpt.has("adapter_config.json")
    assert messages[0] == "stage 1/2: lora1" and "stage 2/2: lora2" in messages
    assert "loading base" in messages and "saving" in messages
    assert any(m.startswith("merging adapter 1/1: lora") for m in messages)
    assert messages[-1].startswith("done in ") and messages[-1].endswith(" s")


def test_stage_one_is_base_plus_lora1_and_differs_from_base(chain: tuple[list[Path], list[str], float]) -> None:
    stage1 = weights(chain[0][0])
    base = weights(BASE)
    changed = {k for k in base if not torch.equal(base[k], stage1[k])}
    # LoRA targets only the projections: embeddings, norms and lm_head stay the base's.
    assert changed and all(k.endswith("_proj.weight") for k in changed)
    assert "lm_head.weight" not in changed and "model.embed_tokens.weight" not in changed


def test_second_cached_merge_builds_nothing(tmp_path: Path) -> None:
    spec = MergeSpec(BASE, (LORA1,))
    out, built = cached_merge(spec, tmp_path)
    assert built and out == tmp_path / spec.key()[:16]
    mtime = out.stat().st_mtime_ns
    time.sleep(0.01)
    again, built_again = cached_merge(spec, tmp_path)
    assert (again, built_again) == (out, False)
    assert out.stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_concurrent_builders_of_one_key_build_once(tmp_path: Path) -> None:
    # flock conflicts between separate open()s even inside one process, so threads stand in
    # for two xdist workers here.
    spec = MergeSpec(BASE, (LORA1,), scale=0.5)
    results: list[tuple[Path, bool]] = []
    threads = [threading.Thread(target=lambda: results.append(cached_merge(spec, tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(built for _, built in results) == [False, True]
    assert results[0][0] == results[1][0]


def test_key_follows_content_not_paths(tmp_path: Path) -> None:
    copy = Path(shutil.copytree(LORA1, tmp_path / "lora1-copy"))
    original = MergeSpec(BASE, (LORA1,)).key()
    assert MergeSpec(BASE, (copy,)).key() == original  # same bytes elsewhere: same key
    weights_file = copy / "adapter_model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-1] ^= 0x01  # one bit of one tensor value
    weights_file.write_bytes(bytes(data))
    assert MergeSpec(BASE, (copy,)).key() != original
    # The other inputs of the key.
    assert MergeSpec(BASE, (LORA1,), compute_dtype="bfloat16").key() != original
    assert MergeSpec(BASE, (LORA1,), output_dtype="float16").key() != original
    assert MergeSpec(BASE, (LORA1,), scale=2.0).key() != original
    assert MergeSpec(BASE, (LORA1, LORA2)).key() != original


def test_killed_mid_save_leaves_no_output(tmp_path: Path) -> None:
    out, marker, log = tmp_path / "out", tmp_path / "marker.txt", tmp_path / "victim.log"
    with log.open("wb") as log_fh:
        child = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "merge_victim.py"), str(BASE), str(LORA1), str(out), str(marker)],
            env={**os.environ, "OMP_NUM_THREADS": "2"}, stdout=log_fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (marker.exists() and "mid-save" in marker.read_text(encoding="utf-8")):
            if child.poll() is not None:
                pytest.fail(f"victim exited early:\n{log.read_text(errors='replace')}")
            assert time.monotonic() < deadline, "victim never reached the save"
            time.sleep(0.05)
        temps = list(tmp_path.glob(".out.tmp-*"))
        assert len(temps) == 1 and (temps[0] / "model.safetensors").exists()  # really mid-save
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert "saving" in marker.read_text(encoding="utf-8")
    assert not out.exists()
    assert temps[0].exists()  # what the killed merge left behind ...
    assert build_merged(MergeSpec(BASE, (LORA1,)), out) == out
    assert not temps[0].exists()  # ... is removed by the next build into the same parent
    assert not list(tmp_path.glob(".out.tmp-*"))
    assert Checkpoint(out).tensor_names() == Checkpoint(BASE).tensor_names()


def test_an_empty_output_directory_is_built_into(tmp_path: Path) -> None:
    """--llm-build-merged onto a directory made in advance: build, do not mistake it for a merge."""
    out = tmp_path / "out"
    out.mkdir()
    assert build_merged(MergeSpec(BASE, (LORA1,), scale=0.0), out) == out
    assert Checkpoint(out).tensor_names() == Checkpoint(BASE).tensor_names()


def test_adapter_config_base_path_is_never_used(tmp_path: Path, chain: tuple[list[Path], list[str], float]) -> None:
    adapter = Path(shutil.copytree(LORA1, tmp_path / "lora1"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "no-such-org/no-such-model"  # a hub id that does not exist
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = build_merged(MergeSpec(BASE, (adapter,)), tmp_path / "out")
    assert max_diff(weights(out), weights(chain[0][0])) == 0


def test_existing_output_is_returned_unchanged(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "sentinel").write_text("x")
    assert build_merged(MergeSpec(BASE, (LORA1,)), out) == out
    assert [p.name for p in out.iterdir()] == ["sentinel"]


def test_tied_base_stays_tied(tmp_path: Path) -> None:
    out = build_merged(MergeSpec(TIED, (TIED_ADAPTER,)), tmp_path / "tied-merged")
    names = Checkpoint(out).tensor_names()
    assert "lm_head.weight" not in names and names == Checkpoint(TIED).tensor_names()
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert (out / "config.json").read_bytes() == (TIED / "config.json").read_bytes()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    tied_base = weights(TIED)
    merged = weights(out)
    assert torch.equal(merged["model.embed_tokens.weight"], tied_base["model.embed_tokens.weight"])
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           tied_base["model.layers.0.self_attn.q_proj.weight"])


def test_bf16_compute_rounds_and_bf16_output_is_written(
        tmp_path: Path, chain: tuple[list[Path], list[str], float]) -> None:
    fp32 = weights(chain[0][0])  # base + lora1 merged in float32
    bf16_compute = build_merged(MergeSpec(BASE, (LORA1,), compute_dtype="bfloat16"), tmp_path / "bf16-compute")
    # Written in the base's dtype, but the arithmetic was bf16 (peft #1388's rounding).
    assert {t.dtype for t in Checkpoint(bf16_compute).tensor_shapes().values()} == {"F32"}
    assert (bf16_compute / "config.json").read_bytes() == (BASE / "config.json").read_bytes()
    diff = max_diff(weights(bf16_compute), fp32)
    print(f"\nbf16 vs fp32 compute, max |weight diff|: {diff:.3g}")
    assert diff > 0

    bf16_out = build_merged(MergeSpec(BASE, (LORA1,), output_dtype="bfloat16"), tmp_path / "bf16-out")
    header = read_safetensors_header(bf16_out / "model.safetensors")
    assert {t.dtype for t in header.tensors.values()} == {"BF16"}
    config = json.loads((bf16_out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    base_config = json.loads((BASE / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "dtype"} == {k: v for k, v in base_config.items() if k != "dtype"}
    for name in COPIED[1:]:
        assert (bf16_out / name).read_bytes() == (BASE / name).read_bytes()
    # fp32 merge, then rounded once: within bf16's half-ulp of the fp32 weights.
    rounded = {k: v.float() for k, v in weights(bf16_out).items()}
    assert max_diff(rounded, fp32) <= max(float(v.abs().max()) for v in fp32.values()) * 2 ** -8


def test_scale(tmp_path: Path, chain: tuple[list[Path], list[str], float]) -> None:
    base, scale1 = weights(BASE), weights(chain[0][0])
    double = weights(build_merged(MergeSpec(BASE, (LORA1,), scale=2.0), tmp_path / "x2"))
    off = weights(build_merged(MergeSpec(BASE, (LORA1,), scale=0.0), tmp_path / "x0"))
    assert max_diff(double, scale1) > 0
    assert all(torch.equal(off[k], base[k]) for k in base)
    # W + 2*BA - W == 2 * (W + BA - W), up to float32 rounding.
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(double[q] - base[q], 2 * (scale1[q] - base[q]), atol=1e-6)


def test_shard_count_follows_the_base(tmp_path: Path) -> None:
    # fixtures/merged has 3 shards: a merge onto it is written as 3 shards with an index.
    out = build_merged(MergeSpec(MERGED, (LORA2,), scale=0.0), tmp_path / "onto-merged")
    ckpt = Checkpoint(out)
    assert ckpt.model_weight_files() == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert set((ckpt.index_weight_map() or {}).values()) == set(ckpt.model_weight_files())
    assert ckpt.tensor_names() == Checkpoint(MERGED).tensor_names()


def test_adapter_without_config_is_named(tmp_path: Path) -> None:
    empty = tmp_path / "not-an-adapter"
    empty.mkdir()
    (empty / "adapter_model.safetensors").write_bytes((LORA1 / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=f"{empty}.*adapter_config.json"):
        build_merged(MergeSpec(BASE, (LORA1, empty)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapter_for_other_modules_names_the_adapter(tmp_path: Path) -> None:
    bad = Path(shutil.copytree(LORA1, tmp_path / "wrong-targets"))
    config = json.loads((bad / "adapter_config.json").read_text())
    config["target_modules"] = ["c_attn"]  # a GPT-2 module name: not in a Llama
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"^adapter {bad}: .*c_attn"):
        build_merged(MergeSpec(BASE, (bad,)), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.parametrize("kwargs,message", [
    ({"compute_dtype": "float64"}, "compute_dtype"),
    ({"output_dtype": "int8"}, "output_dtype"),
    ({"scale": float("nan")}, "scale"),
])
def test_bad_spec_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MergeSpec(BASE, (LORA1,), **kwargs)
