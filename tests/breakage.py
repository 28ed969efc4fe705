"""Break a copy of a healthy checkpoint in exactly one way, the way merges break in the field.

Each breakage is a function over a directory that is already a copy; BREAKAGES maps its name
to (function, error codes expected with a base, error codes expected without one).  The
breakages look at what is in the directory (index or single file, where the chat template
lives) rather than assuming the fixture's layout, so they also apply to other checkpoints.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

Breakage = Callable[[Path], None]


def _read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _write(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False), encoding="utf-8")


def _edit(path: Path, change: Callable[[Any], Any]) -> None:
    value = _read(path)
    result = change(value)
    _write(path, value if result is None else result)


def shards(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.glob("*.safetensors") if not p.name.startswith("adapter_model"))


def _index(ckpt: Path) -> Path | None:
    found = sorted(ckpt.glob("*.safetensors.index.json"))
    return found[0] if found else None


def _shard_holding(ckpt: Path, suffix: str) -> tuple[Path, str]:
    """(shard file, tensor name) of the first tensor whose name ends with `suffix`."""
    for shard in shards(ckpt):
        for name in load_file(str(shard)):
            if name.endswith(suffix):
                return shard, name
    raise LookupError(f"no tensor ending with {suffix} in {ckpt}")


def _rewrite_shard(ckpt: Path, shard: Path, change: Callable[[dict[str, np.ndarray]], None]) -> None:
    """Rewrite one shard with valid headers and keep the index in step with it."""
    tensors = load_file(str(shard))
    change(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = _index(ckpt)
    if index is not None:
        def sync(value: dict[str, Any]) -> None:
            weight_map = value["weight_map"]
            for name in [n for n, s in weight_map.items() if s == shard.name and n not in tensors]:
                del weight_map[name]
            weight_map.update({name: shard.name for name in tensors})
        _edit(index, sync)


def no_generation_config(ckpt: Path) -> None:
    (ckpt / "generation_config.json").unlink()


def empty_generation_config(ckpt: Path) -> None:
    _write(ckpt / "generation_config.json", {})


def _end_of_turn_id(ckpt: Path) -> int:
    content = "<|im_end|>"
    for token in _read(ckpt / "tokenizer.json")["added_tokens"]:
        if token["content"] == content:
            return int(token["id"])
    raise LookupError("no <|im_end|> token")


def eos_removed(ckpt: Path) -> None:
    """generation_config.json without eos_token_id: HF generate has nothing to stop at."""
    _edit(ckpt / "generation_config.json", lambda gen: gen.pop("eos_token_id", None) and None)


def end_of_turn_dropped_from_eos(ckpt: Path) -> None:
    """EasyR1 #11007: eos regenerated from config.json, <|im_end|> lost."""
    eot = _end_of_turn_id(ckpt)

    def drop(gen: dict[str, Any]) -> None:
        eos = gen["eos_token_id"]
        gen["eos_token_id"] = [i for i in (eos if isinstance(eos, list) else [eos]) if i != eot]
    _edit(ckpt / "generation_config.json", drop)


def tokenizer_eos_dropped_from_eos(ckpt: Path) -> None:
    """Only the end-of-turn id kept: vLLM still stops at the tokenizer's eos, HF does not."""
    _edit(ckpt / "generation_config.json", lambda gen: gen.update(eos_token_id=[_end_of_turn_id(ckpt)]))


def chat_template_deleted(ckpt: Path) -> None:
    """LlamaFactory #8399: the template is gone from every place the tokenizer looks."""
    (ckpt / "chat_template.jinja").unlink(missing_ok=True)
    _edit(ckpt / "tokenizer_config.json", lambda cfg: cfg.pop("chat_template", None) and None)


def chat_template_only_in_processor_file(ckpt: Path) -> None:
    """The template moved to chat_template.json, which AutoTokenizer never reads."""
    template = (ckpt / "chat_template.jinja").read_text(encoding="utf-8")
    chat_template_deleted(ckpt)
    _write(ckpt / "chat_template.json", {"chat_template": template})


def chat_template_edited(ckpt: Path) -> None:
    jinja = ckpt / "chat_template.jinja"
    if jinja.exists():
        jinja.write_text(jinja.read_text(encoding="utf-8").replace("\\n", " "), encoding="utf-8")
    else:
        _edit(ckpt / "tokenizer_config.json",
              lambda cfg: cfg.update(chat_template=cfg["chat_template"].replace("\\n", " ")))


def chat_template_broken(ckpt: Path) -> None:
    template = "{% for message in messages %}{{ message['content'] | no_such_filter }}{% endfor %}"
    jinja = ckpt / "chat_template.jinja"
    if jinja.exists():
        jinja.write_text(template, encoding="utf-8")
    else:
        _edit(ckpt / "tokenizer_config.json", lambda cfg: cfg.update(chat_template=template))


def special_token_changed(ckpt: Path) -> None:
    """The tokenizer's eos rewritten to the end-of-turn token after chat fine-tuning."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (ckpt / name).exists():
            _edit(ckpt / name, lambda cfg: cfg.update(eos_token="<|im_end|>") if "eos_token" in cfg else None)


def added_token_removed(ckpt: Path) -> None:
    """transformers v5 save dropped an added token (NeMo Automodel PR #2653)."""
    victim = "<|im_start|>"
    _edit(ckpt / "tokenizer.json",
          lambda tok: tok.update(added_tokens=[t for t in tok["added_tokens"] if t["content"] != victim]))
    _edit(ckpt / "tokenizer_config.json", lambda cfg: cfg.update(added_tokens_decoder={
        k: v for k, v in cfg.get("added_tokens_decoder", {}).items() if v["content"] != victim}))


def tokenizer_files_missing(ckpt: Path) -> None:
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt"):
        (ckpt / name).unlink(missing_ok=True)


def special_tokens_map_garbage(ckpt: Path) -> None:
    """A special_tokens_map.json that is not JSON: AutoTokenizer.from_pretrained fails on it."""
    (ckpt / "special_tokens_map.json").write_bytes(b"\x00\xff not json")


def special_token_not_a_token(ckpt: Path) -> None:
    """eos_token whose content is not a string: transformers raises TypeError loading the tokenizer."""
    _edit(ckpt / "tokenizer_config.json", lambda cfg: cfg.update(eos_token={"content": {"nested": 1}}))


def index_metadata_not_an_object(ckpt: Path) -> None:
    """from_pretrained indexes the index's metadata as a mapping and fails on a list."""
    index = _index(ckpt)
    assert index is not None
    _edit(index, lambda value: value.update(metadata=[1, 2]))


def header_metadata_not_strings(ckpt: Path) -> None:
    """A shard whose __metadata__ maps to a list: safe_open refuses the header."""
    import struct

    shard = shards(ckpt)[0]
    raw = shard.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    header["__metadata__"] = {"format": ["pt"]}
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    shard.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length:])


def index_renamed(ckpt: Path) -> None:
    """The index saved under another name: transformers looks for model.safetensors.index.json only."""
    index = _index(ckpt)
    assert index is not None
    index.rename(ckpt / "weights.safetensors.index.json")


def vocab_entry_without_id(ckpt: Path) -> None:
    """A vocabulary entry that is no piece: the tokenizers library refuses the whole file."""
    _edit(ckpt / "tokenizer.json", lambda tok: tok["model"]["vocab"].update({"<junk>": [1, 2]}))


def chat_template_over_budget(ckpt: Path) -> None:
    """A template whose rendering never ends: chat requests hang at the server."""
    (ckpt / "chat_template.jinja").write_text(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", encoding="utf-8")


def config_missing(ckpt: Path) -> None:
    (ckpt / "config.json").unlink()


def model_type_changed(ckpt: Path) -> None:
    _edit(ckpt / "config.json", lambda cfg: cfg.update(model_type="mistral"))


def vocab_size_changed(ckpt: Path) -> None:
    _edit(ckpt / "config.json", lambda cfg: cfg.update(vocab_size=cfg["vocab_size"] + 64))


def tie_flag_flipped(ckpt: Path) -> None:
    _edit(ckpt / "config.json", lambda cfg: cfg.update(tie_word_embeddings=not cfg.get("tie_word_embeddings", False)))


def nan_in_weights(ckpt: Path) -> None:
    """A float16 merge that overflowed: a few NaN and Inf values in one projection."""
    shard, name = _shard_holding(ckpt, "v_proj.weight")

    def poison(tensors: dict[str, np.ndarray]) -> None:
        values = tensors[name].copy()
        values.flat[[3, 77]] = np.nan
        values.flat[-1] = np.inf
        tensors[name] = values
    _rewrite_shard(ckpt, shard, poison)


def tensor_zeroed(ckpt: Path) -> None:
    """A weight matrix written as zeros (a placeholder or meta tensor saved, peft #868)."""
    shard, name = _shard_holding(ckpt, "down_proj.weight")

    def zero(tensors: dict[str, np.ndarray]) -> None:
        tensors[name] = np.zeros_like(tensors[name])
    _rewrite_shard(ckpt, shard, zero)


def shard_deleted(ckpt: Path) -> None:
    shards(ckpt)[-1].unlink()


def shard_truncated(ckpt: Path) -> None:
    """A shard cut short by 1 KiB, as a killed writer or a full disk leaves it."""
    shard = shards(ckpt)[-1]
    with shard.open("r+b") as fh:
        fh.truncate(shard.stat().st_size - 1024)


def header_corrupted(ckpt: Path) -> None:
    """Bytes inside the JSON header overwritten."""
    shard = shards(ckpt)[0]
    with shard.open("r+b") as fh:
        fh.seek(8 + 20)
        fh.write(b"\x00\xff\x00\xff" * 4)


def interrupted_merge(ckpt: Path) -> None:
    """mergekit killed before its last step: shards named model-N.safetensors, no index."""
    index = _index(ckpt)
    if index is not None:
        index.unlink()
    files = shards(ckpt)
    if len(files) == 1:  # a single-file checkpoint: split it so there is something to rename
        tensors = load_file(str(files[0]))
        names = sorted(tensors)
        half = len(names) // 2
        files[0].unlink()
        save_file({n: tensors[n] for n in names[:half]}, str(ckpt / "model-1.safetensors"))
        save_file({n: tensors[n] for n in names[half:]}, str(ckpt / "model-2.safetensors"))
        return
    for i, shard in enumerate(files, 1):
        shard.rename(ckpt / f"model-{i}.safetensors")


def lora_key_left(ckpt: Path) -> None:
    """An adapter tensor saved into the merged weights."""
    shard, name = _shard_holding(ckpt, "q_proj.weight")
    prefix = name[: -len(".weight")]

    def add(tensors: dict[str, np.ndarray]) -> None:
        tensors[f"{prefix}.lora_A.default.weight"] = np.zeros((8, tensors[name].shape[1]), dtype=tensors[name].dtype)
    _rewrite_shard(ckpt, shard, add)


def tensor_shape_changed(ckpt: Path) -> None:
    shard, name = _shard_holding(ckpt, "gate_proj.weight")

    def shrink(tensors: dict[str, np.ndarray]) -> None:
        tensors[name] = np.ascontiguousarray(tensors[name][:-16])
    _rewrite_shard(ckpt, shard, shrink)


def tensor_missing(ckpt: Path) -> None:
    """A trained lm_head dropped at save (unsloth PR #9331)."""
    shard, name = _shard_holding(ckpt, "lm_head.weight")

    def drop(tensors: dict[str, np.ndarray]) -> None:
        del tensors[name]
    _rewrite_shard(ckpt, shard, drop)


def index_points_to_wrong_shard(ckpt: Path) -> None:
    index = _index(ckpt)
    assert index is not None, "needs a sharded checkpoint"

    def move(value: dict[str, Any]) -> None:
        weight_map = value["weight_map"]
        first = sorted(weight_map)[0]
        others = sorted({s for s in weight_map.values() if s != weight_map[first]})
        weight_map[first] = others[0]
    _edit(index, move)


def pickle_only(ckpt: Path) -> None:
    """Weights shipped as a pickle: safetensors replaced by pytorch_model.bin."""
    # torch.save runs in a child process: importing torch inside a test that uses pytester
    # leaves torch's C extension loaded while pytester drops its Python modules afterwards,
    # and the next `import torch` in this process then crashes (bad call flags, segfault).
    code = ("import sys, torch\n"
            "from pathlib import Path\n"
            "from safetensors.torch import load_file\n"
            "ckpt = Path(sys.argv[1])\n"
            "state = {}\n"
            "for shard in sys.argv[2:]:\n"
            "    state.update(load_file(shard))\n"
            "torch.save(state, ckpt / 'pytorch_model.bin')\n")
    files = shards(ckpt)
    subprocess.run([sys.executable, "-c", code, str(ckpt), *map(str, files)], check=True)
    for shard in files:
        shard.unlink()
    index = _index(ckpt)
    if index is not None:
        index.unlink()


def auto_map_added(ckpt: Path) -> None:
    _edit(ckpt / "config.json", lambda cfg: cfg.update(
        auto_map={"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}))


def adapter_config_left(ckpt: Path) -> None:
    _write(ckpt / "adapter_config.json", {"peft_type": "LORA", "base_model_name_or_path": "some/base", "r": 8})


def orphan_shard(ckpt: Path) -> None:
    """A leftover file from an earlier save with another shard count: only a warning."""
    shutil.copyfile(shards(ckpt)[0], ckpt / "model-00001-of-00009.safetensors")


def _rewrite_header(shard: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit a shard's header JSON in place and keep the data bytes as they are."""
    raw = shard.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    change(header)
    encoded = json.dumps(header).encode()
    shard.write_bytes(len(encoded).to_bytes(8, "little") + encoded + raw[8 + length:])


def _same_size_pair(header: dict[str, Any]) -> tuple[str, str]:
    """Two tensors of one shard whose data are the same size."""
    by_size: dict[int, str] = {}
    for name, entry in sorted(header.items()):
        if name == "__metadata__":
            continue
        size = entry["data_offsets"][1] - entry["data_offsets"][0]
        if size in by_size:
            return by_size[size], name
        by_size[size] = name
    raise LookupError("no two tensors of the same size")


def tensor_ranges_overlap(ckpt: Path) -> None:
    """A writer that pointed two tensors at the same bytes: safetensors refuses the file."""
    def alias(header: dict[str, Any]) -> None:
        first, second = _same_size_pair(header)
        header[second]["data_offsets"] = list(header[first]["data_offsets"])
    _rewrite_header(shards(ckpt)[-1], alias)


def trailing_bytes(ckpt: Path) -> None:
    """Bytes after the last tensor that no tensor covers (a writer that padded or appended)."""
    with shards(ckpt)[-1].open("ab") as fh:
        fh.write(b"\0" * 64)


def shard_left_out_of_index(ckpt: Path) -> None:
    """The index lost one shard's entries while the file is still there: those weights are random."""
    index = _index(ckpt)
    assert index is not None, "needs a sharded checkpoint"
    last = shards(ckpt)[-1].name
    _edit(index, lambda value: value.update(weight_map={
        n: s for n, s in value["weight_map"].items() if s != last}))


def index_emptied(ckpt: Path) -> None:
    """An index whose weight_map is empty: loaders read no weights at all."""
    index = _index(ckpt)
    assert index is not None, "needs a sharded checkpoint"
    _edit(index, lambda value: value.update(weight_map={}))


def nan_beside_stale_shard(ckpt: Path) -> None:
    """NaN in the indexed shard, and a healthy stale copy of it from an earlier save beside it:
    the loader reads the indexed one, so must the checks."""
    shard, _ = _shard_holding(ckpt, "v_proj.weight")
    shutil.copyfile(shard, ckpt / "model-00009-of-00009.safetensors")
    nan_in_weights(ckpt)


def negative_eos_id(ckpt: Path) -> None:
    """An eos list holding a negative id (a placeholder written by a converter)."""
    _edit(ckpt / "generation_config.json", lambda cfg: cfg.update(eos_token_id=[-1, *_as_list(cfg["eos_token_id"])]))


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def single_file_beside_index(ckpt: Path) -> None:
    """A model.safetensors from an earlier save beside the index: transformers loads it, vLLM
    the index's shards."""
    shutil.copyfile(shards(ckpt)[0], ckpt / "model.safetensors")


# name -> (breakage, error codes with --llm-base, error codes without it)
BREAKAGES: dict[str, tuple[Breakage, set[str], set[str]]] = {
    # Without the file both loaders stop at config.json's eos (GEN007, a warning), which lacks
    # <|im_end|>: the base's eos id is lost and chat turns never end.
    "no_generation_config": (no_generation_config, {"GEN003", "GEN005"}, {"GEN005"}),
    "empty_generation_config": (empty_generation_config, {"GEN002"}, {"GEN002"}),
    "eos_removed": (eos_removed, {"GEN002"}, {"GEN002"}),
    # Dropping <|im_end|> both loses a base eos id and leaves chat turns without a stop token.
    "end_of_turn_dropped_from_eos": (end_of_turn_dropped_from_eos, {"GEN003", "GEN005"}, {"GEN005"}),
    "tokenizer_eos_dropped_from_eos": (tokenizer_eos_dropped_from_eos, {"GEN003", "GEN004"}, {"GEN004"}),
    "chat_template_deleted": (chat_template_deleted, {"TOK004"}, set()),
    "chat_template_only_in_processor_file": (chat_template_only_in_processor_file, {"TOK004"}, set()),
    "chat_template_edited": (chat_template_edited, {"TOK005"}, set()),
    "chat_template_broken": (chat_template_broken, {"TOK006"}, set()),
    "special_token_changed": (special_token_changed, {"TOK002"}, set()),
    "added_token_removed": (added_token_removed, {"TOK003"}, set()),
    "tokenizer_files_missing": (tokenizer_files_missing, {"TOK001"}, {"TOK001"}),
    "special_tokens_map_garbage": (special_tokens_map_garbage, {"TOK001"}, {"TOK001"}),
    "special_token_not_a_token": (special_token_not_a_token, {"TOK001"}, {"TOK001"}),
    "index_metadata_not_an_object": (index_metadata_not_an_object, {"WGT005"}, {"WGT005"}),
    "header_metadata_not_strings": (header_metadata_not_strings, {"WGT005"}, {"WGT005"}),
    "index_renamed": (index_renamed, {"WGT004"}, {"WGT004"}),
    "vocab_entry_without_id": (vocab_entry_without_id, {"TOK001"}, {"TOK001"}),
    "chat_template_over_budget": (chat_template_over_budget, {"TOK006"}, {"TOK006"}),
    "config_missing": (config_missing, {"CFG001"}, {"CFG001"}),
    "model_type_changed": (model_type_changed, {"CFG002"}, set()),
    "vocab_size_changed": (vocab_size_changed, {"CFG004"}, {"CFG004"}),
    # The merged fixture is untied: flipped to tied, its distinct lm_head contradicts the flag.
    "tie_flag_flipped": (tie_flag_flipped, {"CFG007", "WGT015"}, {"WGT015"}),
    "nan_in_weights": (nan_in_weights, {"WGT013"}, {"WGT013"}),
    "tensor_zeroed": (tensor_zeroed, {"WGT014"}, {"WGT014"}),
    "shard_deleted": (shard_deleted, {"WGT002"}, {"WGT002"}),
    "shard_truncated": (shard_truncated, {"WGT006"}, {"WGT006"}),
    "header_corrupted": (header_corrupted, {"WGT005"}, {"WGT005"}),
    "interrupted_merge": (interrupted_merge, {"WGT004"}, {"WGT004"}),
    "index_points_to_wrong_shard": (index_points_to_wrong_shard, {"WGT011"}, {"WGT011"}),
    "lora_key_left": (lora_key_left, {"WGT010"}, {"WGT010"}),
    "tensor_shape_changed": (tensor_shape_changed, {"WGT008"}, set()),
    # lm_head dropped from an untied model: missing against the base, and the flag left untied.
    "tensor_missing": (tensor_missing, {"WGT007", "WGT016"}, {"WGT016"}),
    "pickle_only": (pickle_only, {"SAF001"}, {"SAF001"}),
    "auto_map_added": (auto_map_added, {"SAF002"}, {"SAF002"}),
    "adapter_config_left": (adapter_config_left, {"WGT012"}, {"WGT012"}),
    "orphan_shard": (orphan_shard, set(), set()),
    "tensor_ranges_overlap": (tensor_ranges_overlap, {"WGT019"}, {"WGT019"}),
    "trailing_bytes": (trailing_bytes, {"WGT019"}, {"WGT019"}),
    # What transformers would load lacks tensors: against the base they are missing (WGT007).
    "shard_left_out_of_index": (shard_left_out_of_index, {"WGT007", "WGT020"}, {"WGT020"}),
    "index_emptied": (index_emptied, {"WGT007", "WGT020"}, {"WGT020"}),
    "nan_beside_stale_shard": (nan_beside_stale_shard, {"WGT013"}, {"WGT013"}),
    "negative_eos_id": (negative_eos_id, {"GEN002"}, {"GEN002"}),
    "single_file_beside_index": (single_file_beside_index, {"WGT007", "WGT020"}, {"WGT020"}),
}


def broken_copy(healthy: Path, dest: Path, name: str) -> Path:
    """Copy `healthy` to `dest` and apply breakage `name`."""
    shutil.copytree(healthy, dest)
    BREAKAGES[name][0](dest)
    return dest


# --- healthy variations: what loaders read is unchanged, so no check may fail -----------------

def rotary_buffers_saved(ckpt: Path) -> None:
    """Old hub checkpoints carry rotary inv_freq buffers that loaders recompute and ignore."""
    shard = shards(ckpt)[0]

    def add(tensors: dict[str, np.ndarray]) -> None:
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.linspace(1, 0, 16, dtype=np.float32)
    _rewrite_shard(ckpt, shard, add)


def tied_lm_head_saved(ckpt: Path) -> None:
    """A tied model saved with lm_head.weight too, equal to the embedding (some exporters do)."""
    shard, name = _shard_holding(ckpt, "embed_tokens.weight")

    def add(tensors: dict[str, np.ndarray]) -> None:
        tensors["lm_head.weight"] = tensors[name].copy()
    _rewrite_shard(ckpt, shard, add)


def index_names_another_listed_shard(ckpt: Path) -> None:
    """An index that names the wrong one of its listed shards for a tensor: loaders read every
    tensor of every listed shard, so it is still loaded."""
    index = _index(ckpt)
    assert index is not None, "needs a sharded checkpoint"

    def move(value: dict[str, Any]) -> None:
        weight_map = value["weight_map"]
        name = _in_a_shard_of_several(weight_map)
        weight_map[name] = next(s for s in sorted(set(weight_map.values())) if s != weight_map[name])
    _edit(index, move)


def index_omits_a_tensor_of_a_listed_shard(ckpt: Path) -> None:
    index = _index(ckpt)
    assert index is not None, "needs a sharded checkpoint"

    _edit(index, lambda value: value["weight_map"].pop(_in_a_shard_of_several(value["weight_map"])) and None)


def _in_a_shard_of_several(weight_map: dict[str, str]) -> str:
    """A tensor whose shard holds others too: the shard stays listed without it."""
    counts: dict[str, int] = {}
    for shard in weight_map.values():
        counts[shard] = counts.get(shard, 0) + 1
    return next(n for n in sorted(weight_map) if counts[weight_map[n]] > 1)


# name -> (change, warning codes expected with --llm-base)
HEALTHY_VARIATIONS: dict[str, tuple[Breakage, set[str]]] = {
    "rotary_buffers_saved": (rotary_buffers_saved, set()),
    "index_names_another_listed_shard": (index_names_another_listed_shard, {"WGT023"}),
    "index_omits_a_tensor_of_a_listed_shard": (index_omits_a_tensor_of_a_listed_shard, {"WGT023"}),
}
