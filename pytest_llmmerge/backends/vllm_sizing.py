"""How big to make a vLLM engine for a checkpoint: the LoRA rank limit its adapter needs and,
on CPU, a KV cache sized for the model instead of a fraction of the machine's memory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..checkpoint import LORA_DEFAULT_RANK, adapter_config

# LoRA ranks vLLM 0.32 accepts for `max_lora_rank` (vllm.config.lora.MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Smallest KV cache given to a CPU engine when none is asked for.
MIN_CPU_KV_CACHE_BYTES = 64 << 20
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def lora_rank_limit(adapter: str | os.PathLike[str]) -> int:
    """The `max_lora_rank` vLLM needs for an adapter: its largest rank, rounded up to a value
    vLLM accepts."""
    config = adapter_config(Path(adapter))
    pattern = config.get("rank_pattern")
    ranks = [int(config.get("r") or LORA_DEFAULT_RANK)] + [int(r) for r in
                                                           (pattern.values() if isinstance(pattern, dict) else ())]
    rank = max(ranks)
    for allowed in LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA adapter {adapter} has rank {rank}; vLLM supports at most {LORA_RANKS[-1]}")


def kv_cache_bytes_for(config: dict[str, Any], dtype: str, max_model_len: int | None) -> int:
    """A KV cache holding two full-length sequences (at least 64 MiB); 1 GiB if the config lacks
    the sizes.  vLLM's CPU default is a fraction of the machine's memory, far too much for a worker."""
    try:
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        length = int(max_model_len or config.get("max_position_embeddings") or 4096)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 1 << 30
    per_token = 2 * layers * kv_heads * head_dim * _DTYPE_BYTES.get(dtype, 4)
    return max(MIN_CPU_KV_CACHE_BYTES, 2 * per_token * length)
