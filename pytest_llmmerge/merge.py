"""Build merged checkpoints from a base (or an earlier stage) and LoRA adapters, atomically and cached.

What this guards against (shared/FIELD-FAILURES.md):

* a merge killed near 100 % must leave no half checkpoint behind: everything is written into a
  temp directory next to the output and renamed into place as the very last step
  (atomic.build_once);
* `save_pretrained` must not get to rewrite what the base defines: config.json (unless the
  dtype changes), generation_config.json and every tokenizer file are copied from the base
  byte for byte afterwards, so eos ids and the chat template cannot drift;
* tied embeddings must stay tied, and no `lora_*` / `base_layer` key may reach the output.

Each adapter is merged into the model before the next one is loaded, which is how a chain of
adapters trained one on top of the other has to be applied.  Heavy imports (torch,
transformers, peft) happen inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import Progress, build_once
from .checkpoint import Checkpoint, is_lora_key
from .file_names import (
    ADAPTER_CONFIG,
    CHAT_TEMPLATE_JINJA,
    CHAT_TEMPLATE_JSON,
    CONFIG,
    GENERATION_CONFIG,
    SPECIAL_TOKENS_MAP,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
)
from .model_config import CONFIG_DTYPE_KEYS

# Bump when the output for the same inputs would change (a fix in how we merge or write):
# every cached merge is then rebuilt instead of silently reused.
FORMAT_VERSION = "pytest-llmmerge-merge/2"  # 2: rounding between adapters of one spec
DTYPES = ("float32", "bfloat16", "float16")
# Copied from the base byte for byte, whichever of them exist.
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, CHAT_TEMPLATE_JINJA,
                   CHAT_TEMPLATE_JSON, "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
DEFAULT_SHARD_SIZE = "5GB"



@dataclass(frozen=True)
class MergeSpec:
    """What to merge: a model directory and the adapters applied to it, in order."""

    base: Path
    adapters: tuple[Path, ...]
    compute_dtype: str = "float32"
    output_dtype: str | None = None  # None: the base's own dtype
    scale: float = 1.0  # multiplies every adapter's scaling; 1.0 = as configured

    def __post_init__(self) -> None:
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype {self.compute_dtype!r} is not one of {', '.join(DTYPES)}")
        if self.output_dtype is not None and self.output_dtype not in DTYPES:
            raise ValueError(f"output_dtype {self.output_dtype!r} is not one of {', '.join(DTYPES)} (or None)")
        if not math.isfinite(self.scale):
            raise ValueError(f"scale {self.scale!r} is not a finite number")
        if not self.adapters:
            raise ValueError("a merge needs at least one adapter")

    def key(self) -> str:
        """sha256 over the content of every input file, the dtypes, the scale and the format.

        Paths do not enter the key: the same files copied elsewhere give the same key, and one
        changed byte anywhere gives another.
        """
        digest = hashlib.sha256()
        for part in (FORMAT_VERSION, self.compute_dtype, self.output_dtype or "base-dtype",
                     repr(float(self.scale))):
            _feed(digest, part)
        for role, directory in (("base", self.base), *((f"adapter{i}", a) for i, a in enumerate(self.adapters))):
            _feed(digest, role)
            for path in _input_files(directory):
                _feed(digest, path.name)
                _feed(digest, _file_sha256(path))
        return digest.hexdigest()


def _feed(digest: Any, text: str) -> None:
    # Length-prefixed, so that ("ab", "c") and ("a", "bc") cannot hash alike.
    raw = text.encode("utf-8")
    digest.update(len(raw).to_bytes(8, "little"))
    digest.update(raw)


def _input_files(directory: Path) -> list[Path]:
    """The files from_pretrained can read: regular top-level files, hidden ones excluded.

    Hidden entries are left out because hub downloads keep `.cache/` metadata with timestamps
    there, which would change the key without changing the model.
    """
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    return sorted((p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")),
                  key=lambda p: p.name)


# (path, size, mtime_ns, inode) -> sha256; a chain hashes each stage's files twice otherwise.
_HASH_MEMO: dict[tuple[str, int, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    cached = _HASH_MEMO.get(memo_key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    _HASH_MEMO[memo_key] = digest.hexdigest()
    return _HASH_MEMO[memo_key]


def build_merged(spec: MergeSpec, out: Path, *, progress: Progress | None = None) -> Path:
    """Merge `spec` and write it to `out` atomically; an existing `out` is returned unchanged.

    Everything is written into `.{out.name}.tmp-<pid>-<random>` next to `out` (same
    filesystem) and renamed into place at the end, so a merge killed part-way leaves no `out`.
    Temp directories that dead processes left in the same parent are removed first.
    """
    # No lock: `out` is the caller's own path, where a lock file would be litter.
    return _build(spec, Path(out), lock=None, complete=_holds_something, progress=progress)[0]


def _holds_something(out: Path) -> bool:
    # An empty directory (made in advance for the merge) is no merge: the build replaces it.
    return out.exists() and (not out.is_dir() or any(out.iterdir()))


def cached_merge(spec: MergeSpec, cache_dir: Path, *, progress: Progress | None = None) -> tuple[Path, bool]:
    """(cache_dir / key[:16], built_now): builds only when no earlier call built the same inputs.

    An flock on `cache_dir / f"{key}.lock"` serialises builders of one key across processes
    (pytest-xdist workers): the second waits and then finds the first one's output.
    """
    key = spec.key()
    cache_dir = Path(cache_dir)
    # A directory there is complete by construction: outputs appear only by rename.
    return _build(spec, cache_dir / key[:16], lock=cache_dir / f"{key}.lock", complete=None, progress=progress)


def _build(spec: MergeSpec, out: Path, *, lock: Path | None, complete: Callable[[Path], bool] | None,
           progress: Progress | None) -> tuple[Path, bool]:
    """(out, built now): `spec` merged into `out` by atomic.build_once, unless `complete(out)`."""
    say = progress or (lambda message: None)
    started = time.monotonic()

    def build(tmp: Path) -> None:
        nonlocal started
        started = time.monotonic()  # a wait for another builder's lock is not build time
        _check_inputs(spec)
        _merge_into(spec, tmp, say)

    path, built = build_once(out, build, lock=lock, complete=complete, progress=progress)
    if built:
        say(f"done in {time.monotonic() - started:.1f} s")
    return path, built


def build_chain(
    base: Path,
    adapters: Sequence[Path],
    cache_dir: Path,
    *,
    compute_dtype: str = "float32",
    output_dtype: str | None = None,
    scale: float = 1.0,
    progress: Progress | None = None,
) -> list[Path]:
    """Stage k = base + adapters 1..k, each stage one cached build; returns [stage 1, ..., stage n].

    Stage k is merged from the base in one build (rounded to the output dtype between adapters,
    as saving each stage would), the same inputs variants.Chain uses, so the two share the cache
    and any single stage costs one build.
    """
    say = progress or (lambda message: None)
    stages: list[Path] = []
    for i, adapter in enumerate(adapters, 1):
        say(f"stage {i}/{len(adapters)}: {Path(adapter).name}")
        spec = MergeSpec(Path(base), tuple(Path(a) for a in adapters[:i]), compute_dtype, output_dtype, scale)
        stage, built = cached_merge(spec, cache_dir, progress=progress)
        if not built:
            say(f"stage {i}/{len(adapters)}: cached {stage}")
        stages.append(stage)
    return stages


# --- the merge itself -----------------------------------------------------------------------

def _check_inputs(spec: MergeSpec) -> None:
    """Errors a user can act on, before spending minutes loading the base."""
    if not (spec.base / CONFIG).is_file():
        raise ValueError(f"base {spec.base} has no {CONFIG}: not a model directory")
    if "quantization_config" in Checkpoint(spec.base).config:
        # peft #2321, transformers #31293: merging into quantized weights changes generations.
        raise ValueError(f"base {spec.base} is quantized (config.json has quantization_config): merge into "
                         "a dequantized float copy of the base, then quantize the merged model")
    for adapter in spec.adapters:
        if not (adapter / ADAPTER_CONFIG).is_file():
            raise ValueError(f"adapter {adapter} has no {ADAPTER_CONFIG}: not a peft adapter directory")


def _merge_into(spec: MergeSpec, tmp: Path, say: Progress) -> None:
    # Set before the imports: huggingface_hub reads it once.  local_files_only below covers
    # the case where it was imported earlier without it.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # our progress lines say it

    base = Checkpoint(spec.base)
    base_dtype = base.compute_dtype()
    output_dtype = spec.output_dtype or base_dtype or spec.compute_dtype

    say("loading base")
    model = AutoModelForCausalLM.from_pretrained(
        str(spec.base), dtype=getattr(torch, spec.compute_dtype), local_files_only=True)
    tied = bool(base.config.get("tie_word_embeddings", False))
    for i, adapter in enumerate(spec.adapters, 1):
        scaled = f" (scale {spec.scale:g})" if spec.scale != 1.0 else ""
        say(f"merging adapter {i}/{len(spec.adapters)}: {adapter.name}{scaled}")
        try:
            # The adapter directory is passed explicitly: its base_model_name_or_path is never used.
            peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False, local_files_only=True)
        except Exception as exc:
            _prefix(exc, f"adapter {adapter}: ")
            raise
        if spec.scale != 1.0:
            layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
            if not layers:
                raise ValueError(f"adapter {adapter}: scale={spec.scale} needs a LoRA adapter, this one has "
                                 "no LoRA layers")
            for layer in layers:
                for name in layer.scaling:
                    layer.scaling[name] *= spec.scale
        with torch.no_grad():
            model = peft_model.merge_and_unload()
        if tied:
            _check_still_tied(model, adapter)
        if i < len(spec.adapters) and output_dtype != spec.compute_dtype:
            # What saving this stage and loading it for the next merge does: a merge of a1..ak
            # in one spec gives the same bytes as k merges of one adapter each, saved between.
            model = model.to(getattr(torch, output_dtype)).to(getattr(torch, spec.compute_dtype))

    if output_dtype != spec.compute_dtype:
        model = model.to(getattr(torch, output_dtype))
    say("saving")
    shards = _shard_count(base)
    model.save_pretrained(str(tmp), max_shard_size=_shard_size(model, shards))
    del model
    _restore_base_files(spec.base, tmp, output_dtype, base_dtype)
    saved = Checkpoint(tmp)
    _check_output(base, saved)
    if shards and len(saved.model_weight_files()) != shards:
        # Not an error (loaders follow the index), but worth a line: layouts usually match.
        say(f"wrote {len(saved.model_weight_files())} weight files; the base has {shards}")


def _prefix(exc: BaseException, prefix: str) -> None:
    """Prefix an exception's message in place, keeping its type and traceback."""
    if exc.args and isinstance(exc.args[0], str):
        exc.args = (prefix + exc.args[0], *exc.args[1:])
    else:
        exc.args = (prefix + str(exc), *exc.args[1:])


def _check_still_tied(model: Any, adapter: Path) -> None:
    """transformers #45127: a merge that moves lm_head away from the embedding it is tied to.

    Saving would keep only one of the two and silently drop the other's merged delta.
    """
    import torch

    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or outp is None or inp.weight is outp.weight:
        return
    if not torch.equal(inp.weight, outp.weight):
        raise ValueError(f"adapter {adapter} changes the input embedding or lm_head of a model with "
                         "tie_word_embeddings: true; the merged weights can no longer be tied. "
                         "Untie the base (tie_word_embeddings: false, lm_head.weight saved) before merging")


def _shard_count(base: Checkpoint) -> int | None:
    """How many weight files the base has; None when it cannot be told (no safetensors)."""
    weight_map = base.index_weight_map()
    if weight_map:
        return len(set(weight_map.values()))
    files = base.loaded_weight_files()
    return len(files) or None


def _shard_size(model: Any, shards: int | None) -> int | str:
    """The smallest max_shard_size that splits the model into no more than `shards` files.

    save_pretrained splits greedily in state-dict order (huggingface_hub's
    split_torch_state_dict_into_shards), so the size is searched with that same function on
    the names in the order transformers writes them.
    """
    if not shards:
        return DEFAULT_SHARD_SIZE
    from huggingface_hub import split_torch_state_dict_into_shards

    state = model.state_dict()
    try:
        # Transformers 5 sorts the state dict by this key before it splits (revert_weight_conversion).
        from transformers.core_model_loading import dot_natural_key
    except ImportError:
        pass
    else:
        state = dict(sorted(state.items(), key=lambda item: dot_natural_key(item[0])))

    def count(size: int) -> int:
        return len(split_torch_state_dict_into_shards(state, max_shard_size=size).filename_to_tensors)

    low, high = 1, max(1, sum(int(t.numel()) * int(t.element_size()) for t in state.values()))
    if shards == 1:
        return high
    while low < high:
        mid = (low + high) // 2
        if count(mid) <= shards:
            high = mid
        else:
            low = mid + 1
    return high


def _restore_base_files(base: Path, out: Path, output_dtype: str, base_dtype: str | None) -> None:
    """Put the base's own config, generation config and tokenizer files over what was saved."""
    if output_dtype == base_dtype:
        shutil.copyfile(base / CONFIG, out / CONFIG)
    else:
        # Another dtype: the base's config with only the dtype changed, rather than the config
        # save_pretrained regenerates (which may rename or drop keys the base's loaders need).
        config = json.loads((base / CONFIG).read_text(encoding="utf-8"))
        keys = [k for k in CONFIG_DTYPE_KEYS if k in config] or [CONFIG_DTYPE_KEYS[0]]
        for k in keys:
            config[k] = output_dtype
        (out / CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if (base / GENERATION_CONFIG).is_file():
        shutil.copyfile(base / GENERATION_CONFIG, out / GENERATION_CONFIG)
    else:
        # The base has none: an invented one (eos from config.json) is what breaks stopping.
        (out / GENERATION_CONFIG).unlink(missing_ok=True)
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)


def _check_output(base: Checkpoint, out: Checkpoint) -> None:
    """What must never be written, checked on the saved headers (RuntimeError: our bug)."""
    if out.has(ADAPTER_CONFIG):
        raise RuntimeError(f"merged output holds {ADAPTER_CONFIG}: the adapter was not merged")
    names = out.tensor_names()
    if not names:
        raise RuntimeError("merged output holds no tensors")
    leftovers = sorted(n for n in names if is_lora_key(n))
    if leftovers:
        raise RuntimeError(f"merged output holds {len(leftovers)} LoRA keys, e.g. {leftovers[:3]}")
    if base.config.get("tie_word_embeddings", False):
        extra = sorted(names - base.tensor_names())
        if extra:
            raise RuntimeError(f"merged output of a tied base holds tensors the base has not: {extra[:5]}")
