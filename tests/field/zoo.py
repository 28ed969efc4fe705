"""Healthy merged checkpoints written the way real pipelines write them: the field zoo.

A release gate earns trust by staying quiet on the checkpoints people really ship, and those
are not written by this project's merge builder (which copies the base's side files byte for
byte).  They are written by `save_pretrained` of transformers and peft, in bf16, sometimes
sharded, with the tokenizer re-saved by whatever transformers is installed, with the pad token
an SFT script changed, against bases written years earlier in older layouts.  Every member here
is made that way, from the tiny Llama fixture (fixtures/base) and its LoRA adapters, and every
one of them is a checkpoint a user would be right to ship.

`Zoo(root).member(name)` builds a member (and the base it is compared with) once, atomically,
under `root`, and returns the paths a user would give to the plugin.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import realmodel_support

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
FP32_BASE = FIXTURES / "base"
LORA1 = FIXTURES / "adapters" / "lora1"
TIED = FIXTURES / "tied"
TIED_ADAPTER = FIXTURES / "tied-adapter"

# The model is 590k parameters (1.2 MB in bf16): 500KB shards give several files, as a
# 5GB max_shard_size does on a real 8B model.
SMALL_SHARDS = "500KB"
TF4_VERSION = "4.46.0"
# One name per member, with what a pipeline did to write it.
MEMBERS: dict[str, str] = {
    "peft-bf16": "PEFT merge_and_unload into the bf16 base, model and tokenizer by save_pretrained",
    "fp32-save-of-bf16": "the bf16 base loaded in float32, merged and saved in float32",
    "fp16-save": "the bf16 base merged in float32 and saved in float16 (an fp16 export)",
    "reshard": f"the merge saved with max_shard_size={SMALL_SHARDS} (shards + index) against a single-file base",
    "reshard-base": "a single-file merge against a base saved in shards + index",
    "pad-eq-eos": "SFT recipe: tokenizer.pad_token = eos_token, pad_token_id updated in config and generation config",
    "added-pad": "a <pad> token added, embeddings resized and trained (modules_to_save), merged, vocab 1024 -> 1025",
    "tf4-base-config": "base in the transformers 4.x layout (rope_theta, torch_dtype, inline chat_template); "
                       "candidate written by transformers 5",
    "no-generation-config": "neither base nor candidate has generation_config.json; eos ids in config.json",
    "base-extra-weights": "base with indexed shards plus a Mistral-style consolidated.safetensors beside them",
    "tokenizer-resaved": "the fixture base as it is; candidate's tokenizer loaded by AutoTokenizer and re-saved",
    "trainer-gen-defaults": "a trainer wrote sampling defaults (do_sample, temperature, top_p) into generation_config",
    "tied-bf16": "tied-embedding base in bf16 + its LoRA merged; save_pretrained writes no lm_head tensor",
}


@dataclass(frozen=True)
class Member:
    """What a user passes to the plugin: --llm-model, --llm-base and --llm-adapter (in order)."""

    name: str
    model: Path
    base: Path
    adapters: tuple[Path, ...]


@contextmanager
def _quiet_writers() -> Iterator[Any]:
    """torch with the hub offline and the writers' own warnings silenced.

    The test session turns warnings into errors; what transformers and peft say while writing
    the zoo (progress notes, deprecations) is not what the zoo tests.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield torch


def _load(path: Path, dtype: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype), local_files_only=True)
    return model, AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _peft_merge(model: Any, adapter: Path) -> Any:
    """The notebook recipe: PeftModel.from_pretrained on the loaded base, then merge_and_unload."""
    import torch
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False, local_files_only=True)
    with torch.no_grad():
        return peft_model.merge_and_unload()


def _save(model: Any, tokenizer: Any, out: Path, **kwargs: Any) -> None:
    model.save_pretrained(str(out), **kwargs)
    tokenizer.save_pretrained(str(out))


def _mergekit_style_save(model: Any, tokenizer: Any, out: Path) -> None:
    """How writers that predate GenerationConfig (and mergekit-like tools) write a model:
    config.json, a safetensors file and the tokenizer; no generation_config.json."""
    from safetensors.torch import save_model

    # config.json names the dtype of the weights written, as mergekit sets it: a config's own
    # dtype does not follow model.to(), only save_pretrained would update it.
    model.config.dtype = next(model.parameters()).dtype
    model.config.save_pretrained(str(out))
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out))


def _shards(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("*.safetensors"))


# --- the 4.x layout -----------------------------------------------------------------------------

def _to_tf4_layout(out: Path) -> None:
    """Rewrite a transformers-5 save in place into what transformers 4.46 wrote for it.

    config.json: rope_theta at the top level (rope_scaling null), no head_dim, torch_dtype;
    tokenizer: the chat template inline in tokenizer_config.json with added_tokens_decoder and
    additional_special_tokens, tokenizer_class PreTrainedTokenizerFast, special_tokens_map.json.
    """
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope["rope_theta"]
    config["rope_scaling"] = None
    config.pop("head_dim")
    config["torch_dtype"] = config.pop("dtype")
    config["transformers_version"] = TF4_VERSION
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    generation = json.loads((out / "generation_config.json").read_text(encoding="utf-8"))
    generation["transformers_version"] = TF4_VERSION
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")

    tokenizer_json = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    config5 = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    template_file = out / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8")
    template_file.unlink()
    fields = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    decoder = {str(t["id"]): {k: t[k] for k in fields} for t in tokenizer_json["added_tokens"]}
    extra = list(config5.get("extra_special_tokens") or [])
    config4: dict[str, Any] = {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": extra,
        "bos_token": config5.get("bos_token"),
        "chat_template": template,
        "clean_up_tokenization_spaces": config5.get("clean_up_tokenization_spaces", False),
        "eos_token": config5.get("eos_token"),
        "model_max_length": config5.get("model_max_length"),
        "pad_token": config5.get("pad_token"),
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": config5.get("unk_token"),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config4, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    by_content = {t["content"]: t for t in tokenizer_json["added_tokens"]}
    # 4.x wrote the named special tokens as AddedToken dicts, left out the None ones.
    special_map: dict[str, Any] = {"additional_special_tokens": extra}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        content = config5.get(key)
        if content is not None:
            special_map[key] = {k: by_content[content][k] for k in fields if k != "special"}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")


def verify_loads_the_same(tf4: Path, tf5: Path) -> None:
    """transformers loads the 4.x base exactly as the 5.x one: the same config, tokenizer,
    chat rendering and weights.  Otherwise the member would not be healthy."""
    import torch
    from transformers import AutoConfig

    config4, config5 = AutoConfig.from_pretrained(str(tf4)).to_dict(), AutoConfig.from_pretrained(str(tf5)).to_dict()
    differ = {k: (config4.get(k), config5.get(k)) for k in set(config4) | set(config5)
              if k != "_name_or_path" and config4.get(k) != config5.get(k)}
    assert not differ, f"transformers loads the 4.x config differently: {differ}"
    model4, tok4 = _load(tf4, "bfloat16")
    model5, tok5 = _load(tf5, "bfloat16")
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "all_special_tokens", "chat_template"):
        assert getattr(tok4, attr) == getattr(tok5, attr), f"tokenizer {attr}: {getattr(tok4, attr)!r} " \
                                                           f"!= {getattr(tok5, attr)!r}"
    assert len(tok4) == len(tok5)
    text = "Add 12 and 30. 你好 <|im_end|> words"
    assert tok4(text)["input_ids"] == tok5(text)["input_ids"]
    chat = [{"role": "user", "content": "How many words?"}, {"role": "assistant", "content": "Three."}]
    for prompt in (False, True):
        assert tok4.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt) == \
            tok5.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
    state4, state5 = model4.state_dict(), model5.state_dict()
    assert state4.keys() == state5.keys() and all(torch.equal(state4[k], state5[k]) for k in state4)
    assert model4.generation_config.to_dict() == model5.generation_config.to_dict()


# --- Mistral-style consolidated weights --------------------------------------------------------

_MISTRAL_NAMES = (
    (r"^model\.embed_tokens\.", "tok_embeddings."),
    (r"^model\.norm\.", "norm."),
    (r"^lm_head\.", "output."),
    (r"^model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.", r"layers.\1.attention.w\2."),
    (r"^model\.layers\.(\d+)\.mlp\.gate_proj\.", r"layers.\1.feed_forward.w1."),
    (r"^model\.layers\.(\d+)\.mlp\.down_proj\.", r"layers.\1.feed_forward.w2."),
    (r"^model\.layers\.(\d+)\.mlp\.up_proj\.", r"layers.\1.feed_forward.w3."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.attention_norm."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.ffn_norm."),
)


def _consolidated(model: Any) -> dict[str, Any]:
    """The model's tensors as Mistral's reference code names and lays them out (q/k rows in
    the original, un-permuted rotary order): what Mistral repos ship as consolidated.safetensors."""
    heads = model.config.num_attention_heads
    kv_heads = model.config.num_key_value_heads
    tensors = {}
    for name, tensor in model.state_dict().items():
        new = name
        for pattern, repl in _MISTRAL_NAMES:
            new = re.sub(pattern, repl, new)
        if new.endswith((".wq.weight", ".wk.weight")):
            n = heads if ".wq." in new else kv_heads
            rows, cols = tensor.shape
            tensor = tensor.view(n, 2, rows // n // 2, cols).transpose(1, 2).reshape(rows, cols)
        tensors[new] = tensor.contiguous().clone()
    return tensors


# --- the added-pad adapter ---------------------------------------------------------------------

def _train_added_pad_adapter(base: Path, out: Path) -> None:
    """An SFT run that adds <pad>: resize, LoRA with embed_tokens and lm_head in modules_to_save,
    a few optimizer steps on random text, adapter and tokenizer saved as trainers save them."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model, tokenizer = _load(base, "float32")
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    embed_before = model.get_input_embeddings().weight.detach().clone()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                        modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM")
    peft_model: Any = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    vocab = len(tokenizer)
    for _ in range(3):
        ids = torch.randint(4, vocab - 1, (4, 24))
        mask = torch.ones_like(ids)
        ids[:, -4:] = tokenizer.pad_token_id  # right padding, as the collator pads
        mask[:, -4:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        peft_model.train()
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peft_model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    trained = peft_model.get_input_embeddings().weight.detach()
    assert trained.shape[0] == embed_before.shape[0] == 1025
    assert not torch.equal(trained, embed_before), "the embeddings did not train"


# --- the zoo ------------------------------------------------------------------------------------

class Zoo:
    """Builds members under `root`, each once (atomically, shared between processes)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _once(self, name: str, build: Callable[[Path], None]) -> Path:
        def quiet(tmp: Path) -> None:
            with _quiet_writers():
                build(tmp)
        built: Path = realmodel_support.build_cached(self.root / name, quiet)
        return built

    # bases ---------------------------------------------------------------------------------

    def bf16_base(self) -> Path:
        """The fixture in bf16 by save_pretrained, model and tokenizer: how bases ship."""
        def build(out: Path) -> None:
            _save(*_load(FP32_BASE, "bfloat16"), out)
        return self._once("base-bf16", build)

    def bf16_base_sharded(self) -> Path:
        def build(out: Path) -> None:
            _save(*_load(FP32_BASE, "bfloat16"), out, max_shard_size=SMALL_SHARDS)
            assert len(_shards(out)) > 1 and (out / "model.safetensors.index.json").is_file()
        return self._once("base-bf16-sharded", build)

    def tf4_base(self) -> Path:
        bf16 = self.bf16_base()

        def build(out: Path) -> None:
            model, tokenizer = _load(bf16, "bfloat16")
            _save(model, tokenizer, out)
            _to_tf4_layout(out)
            verify_loads_the_same(out, bf16)
        return self._once("base-bf16-tf4", build)

    def no_generation_config_base(self) -> Path:
        def build(out: Path) -> None:
            model, tokenizer = _load(FP32_BASE, "bfloat16")
            # The stop ids live in config.json then, as in Llama 3's: chat turns end with
            # <|im_end|> (2), raw text with <|endoftext|> (0).
            model.config.eos_token_id = [2, 0]
            _mergekit_style_save(model, tokenizer, out)
        return self._once("base-bf16-no-generation-config", build)

    def extra_weights_base(self) -> Path:
        def build(out: Path) -> None:
            from safetensors.torch import save_file

            model, tokenizer = _load(FP32_BASE, "bfloat16")
            _save(model, tokenizer, out, max_shard_size=SMALL_SHARDS)
            assert len(_shards(out)) > 1 and (out / "model.safetensors.index.json").is_file()
            save_file(_consolidated(model), str(out / "consolidated.safetensors"))
        return self._once("base-bf16-extra-weights", build)

    def bf16_tied_base(self) -> Path:
        def build(out: Path) -> None:
            _save(*_load(TIED, "bfloat16"), out)
        return self._once("base-tied-bf16", build)

    def added_pad_adapter(self) -> Path:
        base = self.bf16_base()
        return self._once("adapter-added-pad", lambda out: _train_added_pad_adapter(base, out))

    # members -------------------------------------------------------------------------------

    def member(self, name: str) -> Member:
        if name not in MEMBERS:
            raise ValueError(f"unknown zoo member {name!r}")
        built: Member = getattr(self, "_" + name.replace("-", "_"))()
        return built

    def _merge_into(self, name: str, base: Path, adapter: Path, write: Callable[[Any, Any, Path], None],
                    load_dtype: str = "bfloat16") -> Member:
        def build(out: Path) -> None:
            model, tokenizer = _load(base, load_dtype)
            write(_peft_merge(model, adapter), tokenizer, out)
        return Member(name, self._once(name, build), base, (adapter,))

    def _peft_bf16(self) -> Member:
        return self._merge_into("peft-bf16", self.bf16_base(), LORA1, _save)

    def _fp32_save_of_bf16(self) -> Member:
        return self._merge_into("fp32-save-of-bf16", self.bf16_base(), LORA1, _save, load_dtype="float32")

    def _fp16_save(self) -> Member:
        def write(model: Any, tokenizer: Any, out: Path) -> None:
            import torch

            _save(model.to(torch.float16), tokenizer, out)
        return self._merge_into("fp16-save", self.bf16_base(), LORA1, write, load_dtype="float32")

    def _reshard(self) -> Member:
        def write(model: Any, tokenizer: Any, out: Path) -> None:
            _save(model, tokenizer, out, max_shard_size=SMALL_SHARDS)
            assert len(_shards(out)) > 1 and (out / "model.safetensors.index.json").is_file()
        return self._merge_into("reshard", self.bf16_base(), LORA1, write)

    def _reshard_base(self) -> Member:
        return self._merge_into("reshard-base", self.bf16_base_sharded(), LORA1, _save)

    def _pad_eq_eos(self) -> Member:
        def write(model: Any, tokenizer: Any, out: Path) -> None:
            tokenizer.pad_token = tokenizer.eos_token
            model.config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            _save(model, tokenizer, out)
        return self._merge_into("pad-eq-eos", self.bf16_base(), LORA1, write)

    def _added_pad(self) -> Member:
        base, adapter = self.bf16_base(), self.added_pad_adapter()

        def build(out: Path) -> None:
            from transformers import AutoTokenizer

            # A fresh process as an export script is: the tokenizer saved with the adapter,
            # the base resized to it before the adapter is loaded.
            model, _ = _load(base, "bfloat16")
            tokenizer = AutoTokenizer.from_pretrained(str(adapter), local_files_only=True)
            model.resize_token_embeddings(len(tokenizer))
            model.config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            _save(_peft_merge(model, adapter), tokenizer, out)
        return Member("added-pad", self._once("added-pad", build), base, (adapter,))

    def _tf4_base_config(self) -> Member:
        return self._merge_into("tf4-base-config", self.tf4_base(), LORA1, _save)

    def _no_generation_config(self) -> Member:
        member = self._merge_into("no-generation-config", self.no_generation_config_base(), LORA1,
                                  _mergekit_style_save)
        for path in (member.model, member.base):
            assert not (path / "generation_config.json").exists()
            assert json.loads((path / "config.json").read_text(encoding="utf-8"))["eos_token_id"] == [2, 0]
        return member

    def _base_extra_weights(self) -> Member:
        return self._merge_into("base-extra-weights", self.extra_weights_base(), LORA1, _save)

    def _tokenizer_resaved(self) -> Member:
        return self._merge_into("tokenizer-resaved", FP32_BASE, LORA1, _save, load_dtype="float32")

    def _trainer_gen_defaults(self) -> Member:
        def write(model: Any, tokenizer: Any, out: Path) -> None:
            model.generation_config.do_sample = True
            model.generation_config.temperature = 0.7
            model.generation_config.top_p = 0.9
            _save(model, tokenizer, out)
        return self._merge_into("trainer-gen-defaults", self.bf16_base(), LORA1, write)

    def _tied_bf16(self) -> Member:
        return self._merge_into("tied-bf16", self.bf16_tied_base(), TIED_ADAPTER, _save)
