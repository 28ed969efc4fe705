"""The file names of a checkpoint and an adapter directory, as transformers, peft and vLLM
look for them, and the special-token roles a tokenizer declares."""

from __future__ import annotations

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"
SAFETENSORS_INDEX_SUFFIX = ".safetensors.index.json"
# The names transformers looks for, in that order: a single file wins over an index.
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_MODEL_FILES = (TOKENIZER_JSON, "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHT_STEM = ADAPTER_WEIGHTS.removesuffix(".safetensors")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
