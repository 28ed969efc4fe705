"""Integrity checks of a checkpoint directory, computed from JSON files and safetensors headers.

Each check returns findings with stable codes (listed in :data:`CODES` and the README).  A
check that cannot run (it needs a base that was not given, or the file it reads is already
reported broken by another check) raises :class:`CheckSkipped`, so that one broken file gives
exactly one failing check and a skipped check is never mistaken for a passed one.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import chat_template
from .checkpoint import (
    CONFIG,
    GENERATION_CONFIG,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    TOKENIZER_MODEL_FILES,
    Checkpoint,
    HeaderError,
    SafetensorsHeader,
    shard_name_parts,
)

Severity = Literal["error", "warning"]

# code -> (what it means, the field failure it catches). The README table is generated from
# this and a test keeps the two equal.
CODES: dict[str, tuple[str, str]] = {
    "CFG001": ("config.json missing or not valid JSON",
               "an interrupted merge writes config.json last (mergekit #54, #107)"),
    "CFG002": ("model_type differs from the base", "a config from another model copied in"),
    "CFG003": ("architectures differ from the base", "loaders pick the wrong model class"),
    "CFG004": ("config vocab_size differs from the embedding rows in the weights",
               "resized embeddings saved without updating the config (peft #1457)"),
    "CFG005": ("tokenizer has token ids beyond the embedding rows",
               "added tokens without resized embeddings: vLLM size mismatch 128320 vs 128256 (LlamaFactory #7997)"),
    "CFG006": ("warning: dtype in config.json differs from the base", "a legitimate save in another dtype, shown for review"),
    "CFG007": ("shape-defining config fields differ from the base (hidden size, layers, heads, tie_word_embeddings, ...)",
               "a config that no longer describes the weights (transformers #45127)"),
    "GEN001": ("generation_config.json missing or unreadable",
               "mergekit #275: merge output without generation_config.json, vLLM never stops"),
    "GEN002": ("generation_config.json empty or without eos_token_id",
               "NeMo Automodel #3890: an empty {} generation_config.json was written"),
    "GEN003": ("eos ids lack some of the base's eos ids",
               "GLM-4 #297, EasyR1 #11007: <|im_end|> dropped from eos after merge, vLLM runs to max_tokens"),
    "GEN004": ("the tokenizer's eos token is not an eos id of generation_config.json",
               "HF generate stops only at generation_config eos ids while vLLM also stops at the tokenizer's: the two disagree"),
    "GEN005": ("the chat template's end-of-turn token is not an eos id",
               "chat answers never stop (LlamaFactory #7454, unsloth #5386)"),
    "GEN006": ("warning: other generation defaults differ from the base",
               "vLLM takes default sampling parameters from generation_config.json (vLLM PR #11164)"),
    "TOK001": ("tokenizer files missing or not valid JSON", "an interrupted merge writes the tokenizer last"),
    "TOK002": ("special tokens differ from the base", "eos/pad rewritten after chat fine-tuning (unsloth #5386)"),
    "TOK003": ("added tokens differ from the base",
               "transformers v5 save dropped added_tokens_decoder (NeMo Automodel PR #2653)"),
    "TOK004": ("chat template missing while the base has one", "LlamaFactory #8399: chat template lost on save"),
    "TOK005": ("chat template renders a sample conversation differently from the base",
               "a template replaced or edited during fine-tuning"),
    "TOK006": ("chat template fails to render where the base's renders", "a template broken on save"),
    "WGT001": ("no weight files", "a merge that died before writing any shard"),
    "WGT002": ("the index names a shard file that is missing", "one shard lost or never written"),
    "WGT003": ("warning: a safetensors file the index does not name", "a leftover shard from an earlier save"),
    "WGT004": ("shards not loadable by name: several shards without an index, or a single file not named model.safetensors",
               "mergekit writes model-N.safetensors first and renames and indexes at the end (mergekit #54, #107)"),
    "WGT005": ("safetensors header or index unreadable", "a corrupted or partially written file"),
    "WGT006": ("a tensor's data lies past the end of its file", "a shard truncated by a killed writer or a full disk"),
    "WGT007": ("tensor names differ from the base (missing or extra)",
               "a trained lm_head dropped at merge (unsloth PR #9331), tied embeddings split"),
    "WGT008": ("tensor shapes differ from the base", "resized embeddings or a wrong base"),
    "WGT009": ("warning: tensor dtypes differ from the base", "a legitimate save in another dtype, shown for review"),
    "WGT010": ("LoRA leftovers in the weights (lora_A/lora_B/base_layer/modules_to_save keys)",
               "an adapter saved instead of merged: loaders ignore the keys and the fine-tune is lost"),
    "WGT011": ("the index and a shard's header disagree about which tensors the shard holds",
               "shards from two different saves mixed in one directory"),
    "WGT012": ("adapter_config.json inside the merged checkpoint",
               "transformers then loads the directory as an adapter on its recorded base"),
    "WGT013": ("NaN or Inf values in a tensor", "a float16 merge that overflowed, or a save that wrote garbage"),
    "WGT014": ("a tensor is constant (all zero, one value) where the base's varies; without a base, a constant matrix",
               "placeholder or meta tensors saved instead of weights (peft #868)"),
    "WGT015": ("tie_word_embeddings is true but lm_head differs from the input embedding",
               "embed_tokens and lm_head diverge after merge_and_unload while the flag stays true (transformers #45127)"),
    "WGT016": ("tie_word_embeddings is false but there is no lm_head tensor",
               "a trained or untied lm_head dropped at merge: loaders initialise it at random (unsloth PR #9331)"),
    "WGT017": ("a layer changed more than --llm-max-weight-change relative to the base (off by default)",
               "a merge with the wrong scale or the wrong adapter"),
    "WGT018": ("every tensor is bit-identical to the base although adapters were merged",
               "the \"merged\" save holds only the base weights (unsloth #1352)"),
    "MRG001": ("a tensor lost more than --llm-audit-max-error of the adapters' float32 update, beyond what rounding "
               "to the candidate's own storage dtype forces (with --llm-audit-merge)",
               "adapter fine, merged model worse: a merge rounded through bfloat16/float16 (peft #1388, unsloth #1267)"),
    "MRG002": ("the adapters do not fit the base and candidate (targets missing, shapes differ, not LoRA)",
               "a merge made from another base or other adapters than the ones given"),
    "MRG003": ("warning: parts of the adapters were not audited (modules_to_save, missing tensors)",
               "shown so a partial audit is never read as a full one"),
    "MRG004": ("warning: the candidate's storage dtype (bf16/fp16) cannot hold the update exactly; the merge lost "
               "no more than that rounding", "peft #1388: a bf16 save moves the loss by rounding alone; shown, not failed"),
    "SAF001": ("pickle-only weights refused (allow with --llm-allow-pickle)",
               "pickle files run code when loaded"),
    "SAF002": ("auto_map custom code refused (allow with --llm-trust-remote-code)",
               "custom modeling code runs at load time"),
}

LORA_KEY = re.compile(r"(^|\.)(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector|base_layer|"
                       r"modules_to_save|original_module)(\.|$)")
# Config fields that decide tensor shapes or how weights are wired.
# vocab_size is left to CFG004 (config vs weights) and WGT008 (weights vs base).
_SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "head_dim", "tie_word_embeddings",
                 "max_position_embeddings", "rope_theta")
_GEN_IGNORED = {"transformers_version", "eos_token_id", "_from_model_config"}


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    message: str
    file: str

    def render(self) -> str:
        return f"{self.code} {self.severity}: {self.file}: {self.message}"


class IntegrityWarning(UserWarning):
    """A warning-severity finding: the item passes, the finding is shown for review."""


class CheckSkipped(Exception):
    """The check cannot run here; the message says why (shown as the skip reason)."""


@dataclass(frozen=True)
class Context:
    model: Checkpoint
    base: Checkpoint | None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    adapters: tuple[Path, ...] = ()  # merged into the model, in order (for the weight and audit checks)
    max_weight_change: float | None = None
    audit_max_error: float = 0.001
    progress: Callable[[str], None] | None = None
    memo: dict[str, Any] = field(default_factory=dict, compare=False)  # results shared by the checks

    def require_base(self) -> Checkpoint:
        if self.base is None:
            raise CheckSkipped("needs --llm-base to compare with")
        return self.base


@dataclass(frozen=True)
class Check:
    name: str
    codes: tuple[str, ...]
    needs_base: bool
    run: Callable[[Context], list[Finding]]
    group: str = "integrity"  # the item is `<group>::<name>`

    @property
    def description(self) -> str:
        return "; ".join(f"{c} {CODES[c][0]}" for c in self.codes)


def _tok(ckpt: Checkpoint, token_id: int) -> str:
    """`id (content)` using the checkpoint's tokenizer, for messages a person can act on."""
    names = {v: k for k, v in ckpt.token_ids.items()}
    return f"{token_id} ({names[token_id]})" if token_id in names else str(token_id)


def _ids(ckpt: Checkpoint, ids: Iterable[int]) -> str:
    return "[" + ", ".join(_tok(ckpt, i) for i in sorted(ids)) + "]"


# --- config ----------------------------------------------------------------------------------

def _vocab_size(ckpt: Checkpoint) -> int | None:
    value = ckpt.config.get("vocab_size")
    if value is None and isinstance(ckpt.config.get("text_config"), dict):
        value = ckpt.config["text_config"].get("vocab_size")
    return value if isinstance(value, int) else None


def check_config(ctx: Context) -> list[Finding]:
    model = ctx.model
    config = model.json(CONFIG)
    if not config.exists:
        return [Finding("CFG001", "error", "config.json is missing: the checkpoint cannot be loaded", CONFIG)]
    if config.error or not isinstance(config.value, dict):
        return [Finding("CFG001", "error", f"config.json {config.error or 'is not a JSON object'}", CONFIG)]
    findings = []
    rows = model.embedding_rows()
    vocab = _vocab_size(model)
    if rows is not None and vocab is not None and rows != vocab:
        findings.append(Finding("CFG004", "error",
                                f"vocab_size is {vocab} but the embedding matrix in the weights has {rows} rows",
                                CONFIG))
    needed = model.tokenizer_rows_needed()
    if rows is not None and needed is not None and needed > rows:
        findings.append(Finding("CFG005", "error",
                                f"tokenizer has ids up to {needed - 1} (needs {needed} embedding rows) but the "
                                f"embedding matrix has {rows} rows", TOKENIZER_JSON))
    return findings


def check_config_vs_base(ctx: Context) -> list[Finding]:
    base = ctx.require_base()
    model = ctx.model
    if not model.json(CONFIG).ok or not base.json(CONFIG).ok:
        raise CheckSkipped("config.json of the model or the base is unreadable (see CFG001)")
    findings = []
    for key, code in (("model_type", "CFG002"), ("architectures", "CFG003")):
        if model.config.get(key) != base.config.get(key):
            findings.append(Finding(code, "error", f"{key} is {model.config.get(key)!r}, base has "
                                    f"{base.config.get(key)!r}", CONFIG))
    changed = [f"{k}: base {base.config.get(k)!r}, model {model.config.get(k)!r}"
               for k in _SHAPE_FIELDS if model.config.get(k) != base.config.get(k)]
    if changed:
        findings.append(Finding("CFG007", "error", "fields differ from the base: " + "; ".join(changed), CONFIG))
    if model.config_dtype != base.config_dtype:
        findings.append(Finding("CFG006", "warning", f"dtype is {model.config_dtype!r}, base has "
                                f"{base.config_dtype!r}", CONFIG))
    return findings


# --- generation config -------------------------------------------------------------------------

def _eos_gap_severity(ctx: Context, token: str, eos_of: Callable[[Checkpoint], set[int] | None],
                      token_of: Callable[[Checkpoint], str | None]) -> Severity:
    """A gap the base has in the same way was inherited, not caused by the merge: warn only."""
    base = ctx.base
    if base is None:
        return "error"
    base_eos = eos_of(base)
    base_token = token_of(base)
    if base_eos is not None and base_token == token and base.token_ids.get(token) not in base_eos:
        return "warning"
    return "error"


def check_generation_config(ctx: Context) -> list[Finding]:
    model = ctx.model
    gen = model.json(GENERATION_CONFIG)
    if not gen.exists:
        return [Finding("GEN001", "error", "generation_config.json is missing: HF generate and vLLM lose the "
                        "model's eos ids and may never stop", GENERATION_CONFIG)]
    if gen.error:
        return [Finding("GEN001", "error", f"generation_config.json {gen.error}", GENERATION_CONFIG)]
    eos = model.generation_eos_ids()
    if not isinstance(gen.value, dict) or not gen.value:
        return [Finding("GEN002", "error", "generation_config.json is empty: no eos ids to stop at",
                        GENERATION_CONFIG)]
    if eos is None:
        return [Finding("GEN002", "error", f"generation_config.json has no valid eos_token_id "
                        f"(found {gen.value.get('eos_token_id')!r})", GENERATION_CONFIG)]
    findings = []
    tokenizer_eos = model.tokenizer_eos()
    if tokenizer_eos is not None:
        content, token_id = tokenizer_eos
        if token_id is not None and token_id not in eos:
            severity = _eos_gap_severity(ctx, content, Checkpoint.generation_eos_ids,
                                         lambda c: (c.tokenizer_eos() or ("", None))[0])
            findings.append(Finding("GEN004", severity,
                                    f"tokenizer eos {_tok(model, token_id)} is not in eos_token_id "
                                    f"{_ids(model, eos)}: vLLM stops at it, HF generate does not. Fix: add "
                                    f"{token_id} to eos_token_id in generation_config.json", GENERATION_CONFIG))
    end_of_turn = _end_of_turn(model)
    if end_of_turn is not None:
        token_id = model.token_ids.get(end_of_turn)
        if token_id is not None and token_id not in eos:
            severity = _eos_gap_severity(ctx, end_of_turn, Checkpoint.generation_eos_ids, _end_of_turn)
            findings.append(Finding("GEN005", severity,
                                    f"the chat template ends assistant turns with {_tok(model, token_id)} but "
                                    f"eos_token_id is {_ids(model, eos)}: chat answers will not stop. Fix: add "
                                    f"{token_id} to eos_token_id in generation_config.json", GENERATION_CONFIG))
    return findings


def _end_of_turn(ckpt: Checkpoint) -> str | None:
    found = ckpt.chat_template()
    if found is None:
        return None
    known = [t["content"] for t in ckpt.added_tokens()] + list(ckpt.special_tokens().values())
    return chat_template.end_of_turn_token(found[0], ckpt.special_tokens(), known)


def check_generation_config_vs_base(ctx: Context) -> list[Finding]:
    base = ctx.require_base()
    model = ctx.model
    eos, base_eos = model.generation_eos_ids(), base.generation_eos_ids()
    if eos is None:
        raise CheckSkipped("the model's generation_config.json has no eos ids (see GEN001/GEN002)")
    if base_eos is None:
        raise CheckSkipped("the base's generation_config.json has no eos ids to compare with")
    findings = []
    lost = base_eos - eos
    if lost:
        findings.append(Finding("GEN003", "error",
                                f"eos_token_id {_ids(model, eos)} lacks the base's {_ids(base, lost)}: "
                                f"generation will not stop there. Fix: restore eos_token_id "
                                f"{sorted(base_eos)} from the base", GENERATION_CONFIG))
    changed = [f"{k}: base {base.generation_config.get(k)!r}, model {model.generation_config.get(k)!r}"
               for k in sorted(set(base.generation_config) | set(model.generation_config))
               if k not in _GEN_IGNORED and base.generation_config.get(k) != model.generation_config.get(k)]
    if changed:
        findings.append(Finding("GEN006", "warning", "; ".join(changed), GENERATION_CONFIG))
    return findings


# --- tokenizer ------------------------------------------------------------------------------------

def _tokenizer_problems(ckpt: Checkpoint) -> list[str]:
    problems = []
    if not any(ckpt.has(name) for name in TOKENIZER_MODEL_FILES):
        problems.append(f"no tokenizer model file (one of {', '.join(TOKENIZER_MODEL_FILES)})")
    if not ckpt.has(TOKENIZER_CONFIG):
        problems.append("tokenizer_config.json is missing")
    for name in (TOKENIZER_JSON, TOKENIZER_CONFIG):
        error = ckpt.json(name).error
        if error:
            problems.append(f"{name} {error}")
    return problems


def check_tokenizer(ctx: Context) -> list[Finding]:
    problems = _tokenizer_problems(ctx.model)
    file = TOKENIZER_JSON if problems and TOKENIZER_JSON in problems[0] else TOKENIZER_CONFIG
    return [Finding("TOK001", "error", "; ".join(problems), file)] if problems else []


def check_tokenizer_vs_base(ctx: Context) -> list[Finding]:
    base = ctx.require_base()
    model = ctx.model
    if _tokenizer_problems(model):
        raise CheckSkipped("the model's tokenizer files are incomplete (see TOK001)")
    if _tokenizer_problems(base):
        raise CheckSkipped("the base's tokenizer files are incomplete")
    findings = []
    mine, theirs = model.special_tokens(), base.special_tokens()
    changed = [f"{k}: base {theirs.get(k)!r}, model {mine.get(k)!r}"
               for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    if changed:
        findings.append(Finding("TOK002", "error", "special tokens differ from the base: " + "; ".join(changed),
                                TOKENIZER_CONFIG))
    added = {(t["id"], t["content"], t["special"]) for t in model.added_tokens()}
    base_added = {(t["id"], t["content"], t["special"]) for t in base.added_tokens()}
    if added != base_added:
        lost = sorted(base_added - added)
        new = sorted(added - base_added)
        findings.append(Finding("TOK003", "error", f"added tokens differ from the base: missing {lost[:5]}"
                                f"{' ...' if len(lost) > 5 else ''}; new {new[:5]}{' ...' if len(new) > 5 else ''}",
                                TOKENIZER_JSON))
    return findings


def check_chat_template_vs_base(ctx: Context) -> list[Finding]:
    base = ctx.require_base()
    base_template = base.chat_template()
    if base_template is None:
        raise CheckSkipped("the base has no chat template to compare with")
    found = ctx.model.chat_template()
    if found is None:
        return [Finding("TOK004", "error", f"no chat template (base has one in {base_template[1]}): chat "
                        f"prompts will be rendered wrongly or refused. Fix: copy {base_template[1]} from the base",
                        TOKENIZER_CONFIG)]
    template, source = found
    base_renders = chat_template.render_samples(base_template[0], base.special_tokens())
    renders = chat_template.render_samples(template, ctx.model.special_tokens())
    for index, (theirs, mine) in enumerate(zip(base_renders, renders)):
        if mine.startswith("error: ") and not theirs.startswith("error: "):
            return [Finding("TOK006", "error", f"sample conversation {index} fails to render: {mine[7:]}", source)]
        if mine != theirs:
            return [Finding("TOK005", "error", f"sample conversation {index} renders differently from the "
                            f"base {chat_template.first_difference(theirs, mine)}", source)]
    return []


# --- weights ---------------------------------------------------------------------------------------

def check_weight_files(ctx: Context) -> list[Finding]:
    model = ctx.model
    shards = model.model_weight_files()
    if not shards:
        if model.pickle_files:
            raise CheckSkipped("weights are pickle files only; header checks need safetensors (see SAF001)")
        return [Finding("WGT001", "error", "no weight files (*.safetensors) in the checkpoint", "model.safetensors")]
    findings: list[Finding] = []
    indexes = model.index_files
    if indexes:
        findings += _check_index(model, indexes[0], shards)
    elif len(shards) > 1:
        findings.append(Finding("WGT004", "error", f"{len(shards)} safetensors files ({', '.join(shards[:4])}"
                                f"{', ...' if len(shards) > 4 else ''}) but no model.safetensors.index.json: "
                                "loaders find no weights. This is what an interrupted merge leaves", shards[0]))
    elif shards[0] != "model.safetensors":
        findings.append(Finding("WGT004", "error", f"single weight file {shards[0]} without an index: loaders "
                                "look for model.safetensors", shards[0]))
    for name in shards:
        header = model.header(name)
        if isinstance(header, HeaderError):
            findings.append(Finding("WGT005", "error", f"header unreadable: {header}", name))
            continue
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
    by_shard: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(tensor)
    for shard in sorted(set(by_shard) - set(shards)):
        findings.append(Finding("WGT002", "error", f"{index} names {shard} ({len(by_shard[shard])} tensors) "
                                "but the file is missing", shard))
    for shard in sorted(set(shards) - set(by_shard)):
        findings.append(Finding("WGT003", "warning", f"{shard} is not named in {index}: loaders ignore it", shard))
    prefix = index[: -len(".safetensors.index.json")]
    parts = [shard_name_parts(s) for s in by_shard]
    totals = {p[2] for p in parts if p is not None}
    if any(p is None or p[0] != prefix for p in parts) or len(totals) > 1 or (totals and totals != {len(by_shard)}):
        findings.append(Finding("WGT004", "warning", f"shard names in {index} are not the canonical "
                                f"{prefix}-0000i-of-{len(by_shard):05d}.safetensors: {sorted(by_shard)[:4]}", index))
    for shard in sorted(set(by_shard) & set(shards)):
        header = model.header(shard)
        if not isinstance(header, SafetensorsHeader):
            continue
        listed, held = by_shard[shard], set(header.tensors)
        if listed != held:
            missing, extra = sorted(listed - held), sorted(held - listed)
            findings.append(Finding("WGT011", "error", f"{index} and the header of {shard} disagree: "
                                    f"{len(missing)} indexed tensor(s) not in the shard {missing[:3]}, "
                                    f"{len(extra)} tensor(s) in the shard not indexed {extra[:3]}", shard))
    return findings


def _weights_unreadable(ckpt: Checkpoint) -> bool:
    return not ckpt.model_weight_files()


def check_weights_vs_base(ctx: Context) -> list[Finding]:
    base = ctx.require_base()
    model = ctx.model
    if _weights_unreadable(model):
        raise CheckSkipped("the model has no safetensors weights to compare (see WGT001/SAF001)")
    if _weights_unreadable(base):
        raise CheckSkipped("the base has no safetensors weights to compare with")
    findings = []
    names = {n for n in model.tensor_names() if not LORA_KEY.search(n)}
    base_names = base.tensor_names()
    missing, extra = sorted(base_names - names), sorted(names - base_names)
    if missing or extra:
        findings.append(Finding("WGT007", "error", f"tensor names differ from the base: {len(missing)} missing "
                                f"{missing[:4]}, {len(extra)} extra {extra[:4]}", _weights_file(model)))
    shapes, base_shapes = model.tensor_shapes(), base.tensor_shapes()
    common = sorted(set(shapes) & set(base_shapes))
    reshaped = [f"{n}: base {list(base_shapes[n].shape)}, model {list(shapes[n].shape)}"
                for n in common if shapes[n].shape != base_shapes[n].shape]
    if reshaped:
        findings.append(Finding("WGT008", "error", f"{len(reshaped)} tensor shape(s) differ from the base: "
                                + "; ".join(reshaped[:4]), _weights_file(model)))
    dtype_changes = Counter(f"{base_shapes[n].dtype}->{shapes[n].dtype}" for n in common
                            if shapes[n].dtype != base_shapes[n].dtype)
    if dtype_changes:
        summary = ", ".join(f"{count} tensor(s) {change}" for change, count in dtype_changes.most_common())
        findings.append(Finding("WGT009", "warning", f"dtypes differ from the base: {summary}", _weights_file(model)))
    return findings


def _weights_file(ckpt: Checkpoint) -> str:
    return ckpt.index_files[0] if ckpt.index_files else (ckpt.model_weight_files() or ["model.safetensors"])[0]


def check_lora_leftovers(ctx: Context) -> list[Finding]:
    model = ctx.model
    findings = []
    if model.has("adapter_config.json"):
        findings.append(Finding("WGT012", "error", "adapter_config.json in a merged checkpoint: transformers "
                                "loads the directory as an adapter on the base it names. Fix: remove it",
                                "adapter_config.json"))
    if _weights_unreadable(model):
        return findings
    leftovers = sorted(n for n in model.tensor_names() if LORA_KEY.search(n))
    if leftovers:
        findings.append(Finding("WGT010", "error", f"{len(leftovers)} LoRA tensor(s) left in the weights, e.g. "
                                f"{leftovers[:3]}: the adapter was saved, not merged", _weights_file(model)))
    return findings


# --- safety -----------------------------------------------------------------------------------------

def check_safety(ctx: Context) -> list[Finding]:
    model = ctx.model
    findings = []
    pickles = model.pickle_files
    if pickles and not model.model_weight_files():
        severity: Severity = "warning" if ctx.allow_pickle else "error"
        note = "allowed by --llm-allow-pickle" if ctx.allow_pickle else "refused; convert to safetensors or " \
               "pass --llm-allow-pickle"
        findings.append(Finding("SAF001", severity, f"weights are pickle only ({', '.join(pickles[:3])}): loading "
                                f"them can run arbitrary code; {note}", pickles[0]))
    for name in (CONFIG, TOKENIZER_CONFIG):
        auto_map = model.json_object(name).get("auto_map")
        if auto_map:
            severity = "warning" if ctx.trust_remote_code else "error"
            note = "allowed by --llm-trust-remote-code" if ctx.trust_remote_code else \
                "refused; pass --llm-trust-remote-code after reviewing the code"
            findings.append(Finding("SAF002", severity, f"auto_map {auto_map!r} loads custom Python code "
                                    f"from the checkpoint; {note}", name))
    return findings


CHECKS: tuple[Check, ...] = (
    Check("config", ("CFG001", "CFG004", "CFG005"), False, check_config),
    Check("config_vs_base", ("CFG002", "CFG003", "CFG006", "CFG007"), True, check_config_vs_base),
    Check("generation_config", ("GEN001", "GEN002", "GEN004", "GEN005"), False, check_generation_config),
    Check("generation_config_vs_base", ("GEN003", "GEN006"), True, check_generation_config_vs_base),
    Check("tokenizer", ("TOK001",), False, check_tokenizer),
    Check("tokenizer_vs_base", ("TOK002", "TOK003"), True, check_tokenizer_vs_base),
    Check("chat_template_vs_base", ("TOK004", "TOK005", "TOK006"), True, check_chat_template_vs_base),
    Check("weight_files", ("WGT001", "WGT002", "WGT003", "WGT004", "WGT005", "WGT006", "WGT011"), False,
          check_weight_files),
    Check("weights_vs_base", ("WGT007", "WGT008", "WGT009"), True, check_weights_vs_base),
    Check("lora_leftovers", ("WGT010", "WGT012"), False, check_lora_leftovers),
    Check("safety", ("SAF001", "SAF002"), False, check_safety),
)


@dataclass(frozen=True)
class CheckOutcome:
    check: Check
    findings: tuple[Finding, ...] = ()
    skipped: str | None = None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]


def run_check(check: Check, ctx: Context) -> CheckOutcome:
    try:
        return CheckOutcome(check, tuple(check.run(ctx)))
    except CheckSkipped as exc:
        return CheckOutcome(check, skipped=str(exc))


def run_all(ctx: Context) -> list[CheckOutcome]:
    """Every check on one checkpoint; what a script or notebook calls."""
    return [run_check(check, ctx) for check in CHECKS]
