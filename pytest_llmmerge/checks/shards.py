"""The `integrity::` checks of the weight files, from their safetensors headers and the index:
which files the loaders read, whether they hold what the index promises, tensor names, shapes
and dtypes against the base, and adapter leftovers.  No tensor data is read here.
"""

from __future__ import annotations

import re
from collections import Counter

from ..checkpoint import EMBEDDING_SUFFIXES, LM_HEAD_SUFFIXES, Checkpoint, is_lora_key, shard_name_parts
from ..file_names import ADAPTER_CONFIG, SAFETENSORS_INDEX_SUFFIX, WEIGHTS_FILE, WEIGHTS_INDEX
from ..safetensors_header import HeaderError, SafetensorsHeader
from .base import CheckSkipped, Context, Finding

RECOMPUTED_BUFFER = re.compile(r"(rotary_emb\.(inv_freq|cos_cached|sin_cached)|\.attn\.(bias|masked_bias))$")


def check_weight_files(ctx: Context) -> list[Finding]:
    model = ctx.model
    shards = model.model_weight_files()
    if not shards:
        if model.pickle_files:
            raise CheckSkipped("weights are pickle files only; header checks need safetensors (see SAF001)")
        return [Finding("WGT001", "error", "no weight files (*.safetensors) in the checkpoint", WEIGHTS_FILE)]
    findings: list[Finding] = []
    index = model.index_file
    if WEIGHTS_FILE in shards:
        if index is not None:
            findings.append(Finding("WGT020", "error", f"{WEIGHTS_FILE} lies beside {index}: transformers loads "
                                    f"{WEIGHTS_FILE}, vLLM the shards the index names, so the two serve different "
                                    "weights. Fix: remove whichever is left from an earlier save", index))
        findings += _strays(model, f"transformers reads {WEIGHTS_FILE}")
    elif index is not None:
        if index != WEIGHTS_INDEX:
            findings.append(Finding("WGT004", "error", f"the only index is {index}: transformers reads "
                                    f"{WEIGHTS_INDEX} and finds no weights (vLLM reads every shard). Fix: rename "
                                    f"it to {WEIGHTS_INDEX}", index))
        findings += _check_index(model, index, shards)
    elif len(shards) > 1:
        findings.append(Finding("WGT004", "error", f"{len(shards)} safetensors files ({', '.join(shards[:4])}"
                                f"{', ...' if len(shards) > 4 else ''}) but no {WEIGHTS_INDEX}: "
                                "loaders find no weights. This is what an interrupted merge leaves", shards[0]))
    elif shards[0] != WEIGHTS_FILE:
        findings.append(Finding("WGT004", "error", f"single weight file {shards[0]} without an index: loaders "
                                f"look for {WEIGHTS_FILE}", shards[0]))
    for name in model.loaded_weight_files():
        header = model.header(name)
        if isinstance(header, HeaderError):
            findings.append(Finding("WGT005", "error", f"header unreadable: {header}", name))
            continue
        layout = header.layout_problem()
        if layout is not None:
            findings.append(Finding("WGT019", "error", f"{layout}: the safetensors library refuses to load "
                                    "the file", name))
        overruns = header.overruns()
        if overruns:
            last = max(overruns, key=lambda item: item[1].end)
            findings.append(Finding("WGT006", "error", f"truncated: {len(overruns)} tensor(s) lie past the end of "
                                    f"the file; {last[0]} ends at byte {header.data_start + last[1].end} of a "
                                    f"{header.data_start + header.data_bytes}-byte file "
                                    f"({last[1].end - header.data_bytes} bytes missing)", name))
    return findings


def _check_index(model: Checkpoint, index: str, shards: list[str]) -> list[Finding]:
    findings: list[Finding] = []
    weight_map = model.index_weight_map()
    if weight_map is None:
        reason = model.json(index).error or "has no weight_map object"
        return [Finding("WGT005", "error", f"index {reason}", index)]
    metadata = model.json_object(index).get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        findings.append(Finding("WGT005", "error", f"index's metadata is not an object ({type(metadata).__name__}): "
                                "transformers fails to load the checkpoint", index))
    if not weight_map:
        return [Finding("WGT020", "error", f"{index} maps no tensor: loaders read no weights from this "
                        "checkpoint and initialise the model at random", index)]
    by_shard: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(tensor)
    for shard in sorted(set(by_shard) - set(shards)):
        findings.append(Finding("WGT002", "error", f"{index} names {shard} ({len(by_shard[shard])} tensors) "
                                "but the file is missing", shard))
    prefix = index[: -len(SAFETENSORS_INDEX_SUFFIX)]
    findings += _strays(model, f"it is not named in {index}", shard_of_save=(prefix, set(weight_map)))
    parts = [shard_name_parts(s) for s in by_shard]
    totals = {p[2] for p in parts if p is not None}
    if any(p is None or p[0] != prefix for p in parts) or len(totals) > 1 or (totals and totals != {len(by_shard)}):
        findings.append(Finding("WGT022", "warning", f"shard names in {index} are not the canonical "
                                f"{prefix}-0000i-of-{len(by_shard):05d}.safetensors: {sorted(by_shard)[:4]}", index))
    # Loaders read every tensor of every listed shard, so only a promised tensor that no listed
    # shard holds is lost; a tensor in another listed shard than the index says is still read.
    readable = [s for s in set(by_shard) & set(shards) if isinstance(model.header(s), SafetensorsHeader)]
    held = model.tensor_locations()
    if len(readable) == len(set(by_shard) & set(shards)):  # an unreadable shard is WGT005's
        lost = sorted(n for n, s in weight_map.items() if s in shards and n not in held)
        if lost:
            findings.append(Finding("WGT011", "error", f"{len(lost)} tensor(s) the index promises are in no shard "
                                    f"loaders read, e.g. {lost[:3]}: loaders initialise them at random", index))
    moved = sorted(n for n, (s, _) in held.items() if weight_map.get(n) != s)
    if moved:
        findings.append(Finding("WGT023", "warning", f"{index} does not describe its shards exactly: {len(moved)} "
                                f"tensor(s) held by another listed shard than it names, or not named, e.g. "
                                f"{moved[:3]} (loaders still read them)", index))
    return findings


def _strays(model: Checkpoint, why: str, shard_of_save: tuple[str, set[str]] | None = None) -> list[Finding]:
    """WGT003 for weight files no loader reads; WGT020 for one that is evidently a shard of this
    save (the index's own name pattern) holding tensors the index lacks: those are lost."""
    findings = []
    for stray in model.stray_weight_files():
        parts = shard_name_parts(stray)
        header = model.header(stray)
        if shard_of_save is not None and parts is not None and parts[0] == shard_of_save[0] \
                and isinstance(header, SafetensorsHeader):
            lost = sorted(set(header.tensors) - shard_of_save[1])
            if lost:
                findings.append(Finding("WGT020", "error", f"{stray} is a shard of this save but {why}: its "
                                        f"{len(lost)} tensor(s) {lost[:3]} are not loaded and loaders initialise "
                                        "them at random. Fix: add them to the index's weight_map", stray))
                continue
        findings.append(Finding("WGT003", "warning", f"{stray} is not read by loaders: {why}", stray))
    return findings


def _weights_unreadable(ckpt: Checkpoint) -> bool:
    return not ckpt.model_weight_files()


def check_weights_vs_base(ctx: Context) -> list[Finding]:
    model, base = ctx.comparable_pair(_weights_unreadable, model_skip="the model has no safetensors weights to "
                                      "compare (see WGT001/SAF001)",
                                      base_skip="the base has no safetensors weights to compare with")
    for ckpt, whose in ((model, "the model's"), (base, "the base's")):
        broken = [f for f in ckpt.loaded_weight_files() if isinstance(ckpt.header(f), HeaderError)]
        if broken:
            raise CheckSkipped(f"{whose} {broken[0]} has an unreadable header (see WGT005): its tensors are unknown")
    findings = []
    # Either side tied: the output layer is the embedding there, and a tie flag that differs is
    # CFG007's (with WGT015/WGT016 on the tensors), not a missing tensor.
    tied = any(c.architecture()[0].get("tie_word_embeddings") is True for c in (model, base))
    names, base_names = _loaded_names(model, tied), _loaded_names(base, tied)
    missing, extra = sorted(base_names - names), sorted(names - base_names)
    # Adapter tensors saved instead of merged rename the base weights: WGT010 says so, in words.
    if (missing or extra) and not any(is_lora_key(n) for n in model.tensor_names()):
        findings.append(Finding("WGT007", "error", f"tensor names differ from the base: {len(missing)} missing "
                                f"{missing[:4]}, {len(extra)} extra {extra[:4]}", _weights_file(model)))
    shapes, base_shapes = model.tensor_shapes(), base.tensor_shapes()
    common = sorted(set(shapes) & set(base_shapes))
    differ = [n for n in common if shapes[n].shape != base_shapes[n].shape]
    grown = [n for n in differ if _vocabulary_grown(model, n, shapes[n].shape, base_shapes[n].shape)]
    if grown:
        findings.append(Finding("WGT021", "warning", "embedding rows added for new tokens: " + "; ".join(
            f"{n}: base {base_shapes[n].shape[0]} rows, model {shapes[n].shape[0]}" for n in grown),
            _weights_file(model)))
    reshaped = [f"{n}: base {list(base_shapes[n].shape)}, model {list(shapes[n].shape)}"
                for n in differ if n not in grown]
    if reshaped:
        findings.append(Finding("WGT008", "error", f"{len(reshaped)} tensor shape(s) differ from the base: "
                                + "; ".join(reshaped[:4]), _weights_file(model)))
    dtype_changes = Counter(f"{base_shapes[n].dtype}->{shapes[n].dtype}" for n in common
                            if shapes[n].dtype != base_shapes[n].dtype)
    if dtype_changes:
        summary = ", ".join(f"{count} tensor(s) {change}" for change, count in dtype_changes.most_common())
        findings.append(Finding("WGT009", "warning", f"dtypes differ from the base: {summary}", _weights_file(model)))
    return findings


def _loaded_names(ckpt: Checkpoint, tied: bool) -> set[str]:
    """Tensor names that decide what a loader builds: without the buffers loaders recompute
    (rotary inv_freq, attention masks of old GPT-2 saves) and, for a tied model, without the
    output layer (saved or not, it is the input embedding)."""
    return {n for n in ckpt.tensor_names()
            if not RECOMPUTED_BUFFER.search(n) and not (tied and n.endswith(LM_HEAD_SUFFIXES))}


def _vocabulary_grown(model: Checkpoint, name: str, shape: tuple[int, ...], base_shape: tuple[int, ...]) -> bool:
    """An embedding or output matrix with rows added and nothing else changed, where the model's
    tokenizer has tokens beyond the base's rows: resize_token_embeddings after adding tokens."""
    if not name.endswith(EMBEDDING_SUFFIXES + LM_HEAD_SUFFIXES) or len(shape) != 2 or len(base_shape) != 2:
        return False
    if shape[1] != base_shape[1] or shape[0] <= base_shape[0]:
        return False
    needed = model.tokenizer_rows_needed()
    return needed is not None and base_shape[0] < needed <= shape[0]


def _weights_file(ckpt: Checkpoint) -> str:
    if ckpt.index_file is not None and WEIGHTS_FILE not in ckpt.files:
        return ckpt.index_file
    return (ckpt.loaded_weight_files() or [WEIGHTS_FILE])[0]


def check_lora_leftovers(ctx: Context) -> list[Finding]:
    model = ctx.model
    findings = []
    if model.has(ADAPTER_CONFIG):
        findings.append(Finding("WGT012", "error", f"{ADAPTER_CONFIG} in a merged checkpoint: transformers "
                                "loads the directory as an adapter on the base it names. Fix: remove it",
                                ADAPTER_CONFIG))
    if _weights_unreadable(model):
        return findings
    leftovers = sorted(n for n in model.tensor_names() if is_lora_key(n))
    if leftovers:
        findings.append(Finding("WGT010", "error", f"{len(leftovers)} LoRA tensor(s) left in the weights, e.g. "
                                f"{leftovers[:3]}: the adapter was saved, not merged", _weights_file(model)))
    return findings
