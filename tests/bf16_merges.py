"""Merged checkpoints of a bf16 SmolLM2 written the way real pipelines write them, healthy and wrong.

Real releases ship in bf16 and are written by `save_pretrained`, never by this project's own
merge builder (which copies side files byte for byte).  So every checkpoint here is made with
transformers and peft and saved, model and tokenizer, by `save_pretrained`:

- ``base``: SmolLM2-135M-Instruct in bfloat16, as the model ships;
- healthy recipes: ``peft-bf16`` (PEFT `merge_and_unload` on the bf16 base, the usual
  notebook recipe) and ``fp32-cast`` (merged in float32 into the float32 original the bf16
  release was cast from, then cast to bf16: a lab that keeps its master weights in float32).
  The two write different bytes: bf16(W32 + dW) and bf16(bf16(W32) + dW) round differently,
  which is exactly the noise the gate must stay quiet about;
- wrong merges, each one real mistake on top of the bf16 base upcast to float32 (what
  Unsloth and axolotl do; PEFT sums in float32 too, so without a mistake it writes the
  peft-bf16 bytes): ``scale-x2``
  (the LoRA scale applied twice), ``modules-skipped`` (o_proj and down_proj never merged, a
  module-name matching bug), ``base-4bit`` (merged into a base rounded to 4 bits per group of
  64, Unsloth-style "merge into the quantized base"), ``base-as-merged`` (the base saved as the
  merge).

All of them are cached next to the real-model tier's other inputs and built at most once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import realmodel_support

HEALTHY = ("peft-bf16", "fp32-cast")
WRONG = ("scale-x2", "modules-skipped", "base-4bit", "base-as-merged")
# Only the merge diagnosis looks at these (the parity tiers keep to the recipes above).
DIAGNOSIS_HEALTHY = (*HEALTHY, "fp32-save")
DIAGNOSIS_WRONG = (*WRONG, "rslora-confusion", "transposed", "fp16-merge")
FLOAT32_RELEASES = ("fp32-save", "fp16-merge")
SKIPPED_MODULES = ("o_proj", "down_proj")
QUANT_BITS, QUANT_GROUP = 4, 64
RECIPE_VERSION = 2  # bump when a recipe changes what it writes


def _save(model: Any, tokenizer: Any, out: Path) -> None:
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _load(path: Path, dtype: str) -> tuple[Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype), local_files_only=True)
    return model, AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def bf16_base(fp32_base: Path) -> Path:
    """The float32 conversion of SmolLM2 saved in bfloat16 by save_pretrained: the shipped form."""
    def build(tmp: Path) -> None:
        import torch

        model, tokenizer = _load(fp32_base, "float32")
        _save(model.to(torch.bfloat16), tokenizer, tmp)

    return realmodel_support.build_cached(realmodel_support.cache_root() / f"smollm2-bf16-v{RECIPE_VERSION}", build)


def _quantized_(model: Any) -> None:
    """Round every linear weight of the decoder to QUANT_BITS per group of QUANT_GROUP (absmax,
    round to nearest): what a 4-bit base holds, dequantized."""
    import torch

    levels = 2 ** (QUANT_BITS - 1) - 1
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                weight = module.weight.data.float()
                groups = weight.reshape(-1, QUANT_GROUP)
                scale = groups.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / levels
                module.weight.data = (torch.round(groups / scale) * scale).reshape(weight.shape).to(
                    module.weight.dtype)


def _merge(base: Path, adapter: Path, recipe: str, out: Path, original: Path | None) -> None:
    import math

    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if recipe in ("fp32-cast", "fp16-merge"):
        if original is None:
            raise ValueError(f"recipe {recipe!r} merges into the float32 original: pass original=")
        model, tokenizer = _load(original, "float16" if recipe == "fp16-merge" else "float32")
    else:
        model, tokenizer = _load(base, "bfloat16" if recipe == "peft-bf16" else "float32")
    release = torch.float32 if recipe in FLOAT32_RELEASES else torch.bfloat16
    if recipe == "base-as-merged":
        _save(model.to(release), tokenizer, out)
        return
    if recipe == "base-4bit":
        _quantized_(model)
    peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False, local_files_only=True)
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        layer: Any = module  # peft's layer attributes are untyped
        if recipe == "scale-x2":
            for key in layer.scaling:
                layer.scaling[key] *= 2
        if recipe == "rslora-confusion":
            for key in layer.scaling:
                layer.scaling[key] = layer.lora_alpha[key] / math.sqrt(layer.r[key])
        if recipe == "transposed":
            weight = layer.get_base_layer().weight
            if weight.shape[0] == weight.shape[1]:
                layer.fan_in_fan_out = True  # peft then merges (B @ A).T
        if recipe == "modules-skipped" and name.rsplit(".", 1)[-1] in SKIPPED_MODULES:
            with torch.no_grad():
                for key in layer.lora_B:
                    layer.lora_B[key].weight.zero_()
    with torch.no_grad():
        merged = peft_model.merge_and_unload()
    _save(merged.to(release), tokenizer, out)


def merge(base: Path, adapter: Path, recipe: str, original: Path | None = None,
          root: Path | None = None) -> Path:
    """The checkpoint (bf16; float32 for FLOAT32_RELEASES) `recipe` makes from `base` (bf16) and `adapter` (fp32-cast: from
    `original`, the float32 weights `base` was cast from), built once and cached under `root`
    (default: the real-model cache; pass it from outside a test that uses pytester, which points
    HOME elsewhere)."""
    if recipe not in DIAGNOSIS_HEALTHY + DIAGNOSIS_WRONG:
        raise ValueError(f"unknown recipe {recipe!r}")
    key = realmodel_support.key_of(base.name, adapter.name, original.name if original else "", recipe,
                                   RECIPE_VERSION)
    build: Callable[[Path], None] = lambda tmp: _merge(base, adapter, recipe, tmp, original)  # noqa: E731
    return realmodel_support.build_cached((root or realmodel_support.cache_root()) / f"bf16-{recipe}-{key}", build)
