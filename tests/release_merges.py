"""Releases of the fixture model written the way pipelines write them (peft, then
`save_pretrained` of model and tokenizer), in bfloat16, for the baseline tests: two healthy
recipes of the same release, and two that are not that release.

- ``release``: PEFT's merge_and_unload on the base loaded in bfloat16 (the notebook recipe);
- ``respin``: the same adapter merged in float32, then cast to bfloat16 (a lab that keeps
  float32 masters): different bytes, the same model up to rounding;
- ``one-more``: the release with a second adapter merged on top;
- ``scale-x2``: the release's adapter with its LoRA scale applied twice.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

RECIPES = ("release", "respin", "one-more", "scale-x2")


def _merged(base: Path, adapters: list[Path], dtype: Any, scale: float) -> Any:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter)
        for module in model.modules():
            scaling = getattr(module, "scaling", None)
            if isinstance(scaling, dict):
                for name in scaling:
                    scaling[name] *= scale
        model = model.merge_and_unload()
    return model.to(torch.bfloat16)


def build(recipe: str, base: Path, adapters: tuple[Path, Path], out: Path) -> Path:
    """Write `recipe` to `out` (model and tokenizer by save_pretrained) and return it."""
    import torch
    from transformers import AutoTokenizer

    lora1, lora2 = adapters
    model = {"release": lambda: _merged(base, [lora1], torch.bfloat16, 1.0),
             "respin": lambda: _merged(base, [lora1], torch.float32, 1.0),
             "one-more": lambda: _merged(base, [lora1, lora2], torch.bfloat16, 1.0),
             "scale-x2": lambda: _merged(base, [lora1], torch.bfloat16, 2.0)}[recipe]()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    # save_pretrained writes a generation config from the model's; the release keeps the base's.
    shutil.copy(base / "generation_config.json", out / "generation_config.json")
    return out
