"""Read a model or adapter directory without torch: JSON configs, tokenizer files and
safetensors headers.

Nothing here reads tensor data: a 70B checkpoint is inspected by reading a few kilobytes of
each shard.  Every reader records *why* a file could not be read instead of raising, so that
the integrity checks can turn one broken file into one finding and still check the rest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .file_names import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHT_STEM,
    CONFIG,
    GENERATION_CONFIG,
    PICKLE_SUFFIXES,
    SAFETENSORS_INDEX_SUFFIX,
    WEIGHTS_FILE,
    WEIGHTS_INDEX,
)
from .model_config import CONFIG_DTYPE_KEYS, CONFIG_KEYS_IGNORED, rope_parameters
from .safetensors_header import HeaderError, SafetensorsHeader, TensorInfo, read_safetensors_header
from .text_files import read_text
from .tokenizer_files import TokenizerFiles

# The largest tokenizer.json of a released model is a few tens of MB; a larger JSON file is a
# broken or hostile one, reported instead of read into memory.
MAX_JSON_BYTES = 512 * 1024 * 1024


# Name endings of the input embedding and the output layer across architectures (multimodal
# checkpoints nest the language model, so whole names do not work).
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
LM_HEAD_SUFFIXES = ("lm_head.weight", "embed_out.weight")
# peft's LoraConfig defaults, for an adapter_config.json that leaves r or lora_alpha out.
LORA_DEFAULT_RANK = 8
LORA_DEFAULT_ALPHA = 8
# Tensor-name parts only peft writes: the LoRA factors, DoRA's magnitude, and the wrappers it puts
# around what it adapts.  In a merged checkpoint any of them means an adapter was saved, not merged.
_LORA_KEY = re.compile(r"(^|\.)(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector|base_layer|"
                       r"modules_to_save|original_module)(\.|$)")
# A LoRA factor in an adapter file, `<module>.lora_A[.<adapter name>].weight`; peft stores
# embedding factors as bare parameters, without `.weight`.
_LORA_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                          r"(?:\.[^.]+)?\.weight$|^(?P<emb_module>.+)\.(?P<emb_kind>lora_embedding_[AB])(?:\.[^.]+)?$")

_SHARD_NAME = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.safetensors$")


# safetensors dtype codes of the float dtypes models are computed in, with torch's names.
FLOAT_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclass(frozen=True)
class JsonFile:
    """A JSON file's content, or why it could not be read (missing is `exists=False`)."""

    name: str
    exists: bool
    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.exists and self.error is None


def adapter_config(adapter: Path) -> dict[str, Any]:
    """An adapter's adapter_config.json as an object; ValueError naming the file when it is
    missing, unreadable or not an object."""
    found = Checkpoint(adapter).json(ADAPTER_CONFIG)
    if not found.exists or found.error or not isinstance(found.value, dict):
        why = found.error or ("is missing" if not found.exists else "is not a JSON object")
        raise ValueError(f"{adapter / ADAPTER_CONFIG} {why}")
    return found.value


def is_lora_key(name: str) -> bool:
    """Whether a tensor name is an adapter's: an unmerged LoRA factor or a peft wrapper."""
    return _LORA_KEY.search(name) is not None


def lora_factor(name: str) -> tuple[str, str] | None:
    """(module, kind) of a LoRA factor in an adapter file (kind: lora_A, lora_B,
    lora_embedding_A, lora_embedding_B); None for any other tensor."""
    match = _LORA_FACTOR.match(name)
    if match is None:
        return None
    return match["module"] or match["emb_module"], match["kind"] or match["emb_kind"]


def embedding_name(names: Iterable[str]) -> str | None:
    """The input embedding among tensor names, matched by suffix; the first by name, so that the
    pick does not depend on the order files list them."""
    return next((n for n in sorted(names) if n.endswith(EMBEDDING_SUFFIXES)), None)


def lm_head_name(names: Iterable[str]) -> str | None:
    """The output layer among tensor names, as :func:`embedding_name` picks the embedding."""
    return next((n for n in sorted(names) if n.endswith(LM_HEAD_SUFFIXES)), None)


def shard_name_parts(name: str) -> tuple[str, int, int] | None:
    """(prefix, index, total) for a canonical `prefix-00001-of-00003.safetensors` name."""
    match = _SHARD_NAME.match(name)
    if match is None:
        return None
    return match["prefix"], int(match["index"]), int(match["total"])


@dataclass
class Checkpoint(TokenizerFiles):
    """Lazy, cached view of one checkpoint directory."""

    path: Path
    _json: dict[str, JsonFile] = field(default_factory=dict, repr=False)
    _headers: dict[str, SafetensorsHeader | HeaderError] = field(default_factory=dict, repr=False)

    @cached_property
    def files(self) -> frozenset[str]:
        """Names of the regular files directly in the directory."""
        if not self.path.is_dir():
            return frozenset()
        return frozenset(p.name for p in self.path.iterdir() if p.is_file())

    def has(self, name: str) -> bool:
        return name in self.files

    def json(self, name: str) -> JsonFile:
        if name not in self._json:
            self._json[name] = self._read_json(name)
        return self._json[name]

    def _read_json(self, name: str) -> JsonFile:
        if not self.has(name):
            return JsonFile(name, exists=False)
        try:
            text = read_text(self.path / name, MAX_JSON_BYTES)
        except (OSError, UnicodeDecodeError) as exc:
            return JsonFile(name, exists=True, error=f"cannot be read: {exc}")
        try:
            return JsonFile(name, exists=True, value=json.loads(text))
        except RecursionError:
            return JsonFile(name, exists=True, error="is nested deeper than a JSON parser allows")
        except ValueError as exc:  # also integers past Python's digit limit
            return JsonFile(name, exists=True, error=f"is not valid JSON: {exc}")

    def json_object(self, name: str) -> dict[str, Any]:
        """The file's top-level object, or {} when missing, unreadable or not an object."""
        value = self.json(name).value
        return value if isinstance(value, dict) else {}

    # --- configs -------------------------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        return self.json_object(CONFIG)

    @property
    def generation_config(self) -> dict[str, Any]:
        return self.json_object(GENERATION_CONFIG)

    @property
    def config_dtype(self) -> str | None:
        value = next((self.config[k] for k in CONFIG_DTYPE_KEYS if self.config.get(k) is not None), None)
        return str(value) if value is not None else None

    @property
    def text_config(self) -> dict[str, Any]:
        """The language model's config: `text_config` of a multimodal config, else the config itself."""
        nested = self.config.get("text_config")
        return nested if isinstance(nested, dict) else self.config

    def generation_eos_ids(self) -> set[int] | None:
        """The eos ids generation_config.json names, or None when it names no valid ones."""
        return token_id_set(self.generation_config.get("eos_token_id"))

    def effective_eos_ids(self) -> set[int] | None:
        """The eos ids generation stops at as transformers and vLLM resolve them: the ones in
        generation_config.json when that file exists, else config.json's (both libraries then
        build the generation config from the model config)."""
        if self.json(GENERATION_CONFIG).exists:
            return self.generation_eos_ids()
        return token_id_set(self.config_value("eos_token_id"))

    def config_value(self, key: str) -> Any:
        """config.json's `key`, else its text_config's: a multimodal config may keep the language
        model's value only there (transformers falls back the same way when the top one is null)."""
        value = self.config.get(key)
        return self.text_config.get(key) if value is None else value

    def architecture(self) -> tuple[dict[str, Any], frozenset[str]]:
        """(values, derived): the config values of the language model as transformers resolves
        them, whichever version wrote the file, and the names of those this side derived rather
        than stated.  Rope parameters come per attention layer type ("" when one set serves all),
        from wherever the writing version put them; keys no forward pass reads are left out."""
        config = self.text_config
        values = {k: v for k, v in config.items() if k not in CONFIG_KEYS_IGNORED and not isinstance(v, dict)}
        derived: set[str] = set()
        heads, hidden = _positive_int(config.get("num_attention_heads")), _positive_int(config.get("hidden_size"))
        if values.get("head_dim") is None and heads is not None and hidden is not None:
            # Most model classes default to hidden/heads; where one does not (Gemma), the other
            # side states it and the difference stays a warning, since this side is a derivation.
            values["head_dim"] = hidden // heads
            derived.add("head_dim")
        if values.get("num_key_value_heads") is None and heads is not None:
            values["num_key_value_heads"] = heads  # every model class's default: exact, not a guess
        tie = config.get("tie_word_embeddings", self.config.get("tie_word_embeddings"))
        values["tie_word_embeddings"] = tie if isinstance(tie, bool) else None
        rope = rope_parameters(config)
        if rope is not None:
            values["rope"] = rope
        return values, frozenset(derived)

    # --- weights ---------------------------------------------------------------------------

    @property
    def safetensors_files(self) -> list[str]:
        return sorted(n for n in self.files if n.endswith(".safetensors"))

    @property
    def pickle_files(self) -> list[str]:
        return sorted(n for n in self.files if n.endswith(PICKLE_SUFFIXES)
                      and not n.startswith(("training_args", "optimizer", "scheduler", "rng_state")))

    @property
    def index_files(self) -> list[str]:
        return sorted(n for n in self.files if n.endswith(SAFETENSORS_INDEX_SUFFIX))

    @property
    def index_file(self) -> str | None:
        """The safetensors index of the model: model.safetensors.index.json, else the first other."""
        if self.has(WEIGHTS_INDEX):
            return WEIGHTS_INDEX
        others = [n for n in self.index_files if not n.startswith(ADAPTER_WEIGHT_STEM)]
        return others[0] if others else None

    def index_weight_map(self) -> dict[str, str] | None:
        """tensor -> shard from the safetensors index, None without a usable index."""
        if self.index_file is None:
            return None
        weight_map = self.json_object(self.index_file).get("weight_map")
        if not isinstance(weight_map, dict):
            return None
        return {str(k): str(v) for k, v in weight_map.items()}

    def loaded_weight_files(self) -> list[str]:
        """The safetensors files a loader reads, as transformers picks them: model.safetensors when
        it exists, else the existing shards the index names.  With neither (an unloadable layout,
        WGT004) every model weight file, so that their content is still checked."""
        files = self.model_weight_files()
        if WEIGHTS_FILE in files:
            return [WEIGHTS_FILE]
        weight_map = self.index_weight_map()
        if weight_map is not None:
            return sorted(set(weight_map.values()) & set(files))
        return files

    def stray_weight_files(self) -> list[str]:
        """Model weight files no loader reads (leftovers, other formats such as consolidated.safetensors)."""
        loaded = set(self.loaded_weight_files())
        return [n for n in self.model_weight_files() if n not in loaded]

    def tensor_locations(self) -> dict[str, tuple[str, TensorInfo]]:
        """tensor -> (file, info) for what the loaders read: every tensor of every file they
        read (the index lists files; transformers and vLLM then read all of each), a tensor held
        twice taken from the shard the index names for it.  Files no loader reads never count."""
        return dict(self._locations)

    @cached_property
    def _locations(self) -> dict[str, tuple[str, TensorInfo]]:
        # Made once: several checks and every finding's file name ask for it.
        weight_map = self.index_weight_map() if WEIGHTS_FILE not in self.files else None
        out: dict[str, tuple[str, TensorInfo]] = {}
        for shard in self.loaded_weight_files():
            header = self.header(shard)
            if not isinstance(header, SafetensorsHeader):
                continue
            for name, info in header.tensors.items():
                if name not in out or (weight_map is not None and weight_map.get(name) == shard):
                    out[name] = (shard, info)
        return out

    def header(self, name: str) -> SafetensorsHeader | HeaderError:
        if name not in self._headers:
            try:
                self._headers[name] = read_safetensors_header(self.path / name)
            except HeaderError as exc:
                self._headers[name] = exc
            except OSError as exc:
                self._headers[name] = HeaderError(f"cannot be read: {exc}")
        return self._headers[name]

    def model_weight_files(self) -> list[str]:
        """The safetensors files that hold the model (adapter files excluded)."""
        return [n for n in self.safetensors_files if not n.startswith(ADAPTER_WEIGHT_STEM)]

    def tensor_shapes(self) -> dict[str, TensorInfo]:
        """Every tensor the loader reads whose header could be read; tensors in broken shards are absent."""
        return {name: info for name, (_, info) in self.tensor_locations().items()}

    def tensor_names(self) -> set[str]:
        """Tensor names the checkpoint declares: those the loaders read, and those its index
        promises (a promised tensor no shard holds is missing, not absent)."""
        names = set(self.tensor_shapes())
        weight_map = self.index_weight_map() if WEIGHTS_FILE not in self.files else None
        if weight_map is not None:
            names |= set(weight_map)
        return names

    def compute_dtype(self) -> str | None:
        """The dtype loaders compute this checkpoint in by default ("auto"): the one config.json
        declares, else the most common float dtype of its weights."""
        declared = self.config_dtype
        if declared:
            return declared.removeprefix("torch.")
        counts: dict[str, int] = {}
        for info in self.tensor_shapes().values():
            if info.dtype in FLOAT_DTYPE_NAMES:
                counts[info.dtype] = counts.get(info.dtype, 0) + 1
        return FLOAT_DTYPE_NAMES[max(counts, key=lambda d: counts[d])] if counts else None

    def embedding_rows(self) -> int | None:
        """Rows of the input embedding matrix, from the headers."""
        shapes = self.tensor_shapes()
        name = embedding_name(n for n, info in shapes.items() if info.shape)
        return shapes[name].shape[0] if name is not None else None


def token_id_set(value: Any) -> set[int] | None:
    """A token id or list of ids as a set; None unless every id is a non-negative integer."""
    ids = value if isinstance(value, list) else [value]
    if ids and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ids):
        return set(ids)
    return None


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
