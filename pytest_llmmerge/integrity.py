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
    ADAPTER_CONFIG,
    CHAT_TEMPLATE_JSON,
    SPECIAL_TOKEN_KEYS,
    CONFIG,
    EMBEDDING_SUFFIXES,
    GENERATION_CONFIG,
    LM_HEAD_SUFFIXES,
    SAFETENSORS_INDEX_SUFFIX,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    TOKENIZER_MODEL_FILES,
    WEIGHTS_FILE,
    Checkpoint,
    is_lora_key,
    shard_name_parts,
)
from .model_config import CONFIG_KEYS_COMPUTED
from .safetensors_header import HeaderError, SafetensorsHeader

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
    "CFG007": ("shape- or position-defining config values differ from the base, as transformers resolves them "
               "(hidden size, layers, heads, head_dim, rope parameters, tie_word_embeddings)",
               "a config that no longer describes the weights (transformers #45127)"),
    "CFG008": ("warning: a config value the model or the base leaves to the model class's default, or a "
               "context length (max_position_embeddings) that differs from the base",
               "transformers 5 writes head_dim, rope_parameters and dtype where 4.x wrote rope_theta and torch_dtype"),
    "GEN001": ("generation_config.json unreadable, or missing while config.json names no eos id either",
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
    "GEN007": ("warning: no generation_config.json; transformers and vLLM take eos from config.json "
               "(its ids are then checked like the file's)",
               "older models ship none; a merge that lost it while the base has one is caught by GEN003/GEN005"),
    "TOK001": ("tokenizer files missing or not valid JSON", "an interrupted merge writes the tokenizer last"),
    "TOK002": ("the bos or eos token differs from the base (they change how prompts are encoded and where "
               "generation stops)", "eos rewritten after chat fine-tuning (unsloth #5386)"),
    "TOK003": ("added tokens of the base missing or with another id or content",
               "transformers v5 save dropped added_tokens_decoder (NeMo Automodel PR #2653)"),
    "TOK004": ("chat template missing while the base has one", "LlamaFactory #8399: chat template lost on save"),
    "TOK005": ("chat template renders a sample conversation differently from the base",
               "a template replaced or edited during fine-tuning"),
    "TOK006": ("chat template fails to render where the base's renders", "a template broken on save"),
    "TOK007": ("warning: the pad token or another special token that does not change generation differs from "
               "the base", "SFT recipes set pad = eos or add a <pad> token"),
    "TOK008": ("warning: tokens added beyond the base's vocabulary", "a pad or chat token added with resized "
               "embeddings (LlamaFactory #7997); CFG005 fails it when the embeddings were not resized"),
    "WGT001": ("no weight files", "a merge that died before writing any shard"),
    "WGT002": ("the index names a shard file that is missing", "one shard lost or never written"),
    "WGT003": ("warning: a safetensors file no loader reads (not model.safetensors, not named by the index)",
               "a leftover shard from an earlier save, or consolidated.safetensors beside the HF shards"),
    "WGT004": ("shards not loadable by name: several shards without an index, or a single file not named model.safetensors",
               "mergekit writes model-N.safetensors first and renames and indexes at the end (mergekit #54, #107)"),
    "WGT005": ("safetensors header or index unreadable, or an index that maps no tensor",
               "a corrupted or partially written file"),
    "WGT006": ("a tensor's data lies past the end of its file", "a shard truncated by a killed writer or a full disk"),
    "WGT007": ("the tensors the loader reads differ by name from the base's (missing or extra)",
               "a trained lm_head dropped at merge (unsloth PR #9331), tied embeddings split"),
    "WGT008": ("tensor shapes differ from the base (other than embedding rows added for new tokens, WGT021)",
               "a wrong base, or embeddings resized without the tokens that need them"),
    "WGT009": ("warning: tensor dtypes differ from the base", "a legitimate save in another dtype, shown for review"),
    "WGT010": ("LoRA leftovers in the weights (lora_A/lora_B/base_layer/modules_to_save keys)",
               "an adapter saved instead of merged: loaders ignore the keys and the fine-tune is lost"),
    "WGT011": ("tensors the index promises are held by no shard the loaders read",
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
    "WGT019": ("tensor byte ranges overlap, leave gaps, or leave bytes after the last tensor: safetensors "
               "refuses to load the file", "a shard written by a broken or interrupted writer"),
    "WGT020": ("the index and the files disagree in a way that drops weights: an index that maps no tensor, "
               "a shard of this save the index leaves out, or model.safetensors beside an index",
               "transformers initialises the tensors it does not find at random; vLLM reads the index, "
               "transformers model.safetensors"),
    "WGT021": ("warning: embedding rows added for tokens added beyond the base's vocabulary",
               "a pad or chat token added with resized embeddings; shown for review"),
    "WGT022": ("warning: shard names in the index are not the canonical <prefix>-0000i-of-0000n.safetensors",
               "loaders read the files the index names whatever they are called; shown for review"),
    "WGT023": ("warning: the index names another listed shard for a tensor than the one holding it, or "
               "does not name it", "an index rewritten by hand or by a resharding tool; loaders still read "
                                   "every tensor of every listed shard"),
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

RECOMPUTED_BUFFER = re.compile(r"(rotary_emb\.(inv_freq|cos_cached|sin_cached)|\.attn\.(bias|masked_bias))$")
# Special-token roles that change generation: bos is put into every prompt, eos is where it
# stops.  The others (pad, unk, sep, ...) are changed by ordinary SFT recipes.
_GENERATION_ROLES = ("bos_token", "eos_token")
# GenerationConfig's defaults for the settings saves commonly write out or leave away.
_GENERATION_DEFAULTS: dict[str, Any] = {
    "use_cache": True, "output_attentions": False, "output_hidden_states": False, "output_scores": False,
    "output_logits": None, "return_dict_in_generate": False, "do_sample": False, "num_beams": 1,
    "num_beam_groups": 1, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0, "min_p": None,
    "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
    "max_length": 20, "min_length": 0, "num_return_sequences": 1, "early_stopping": False,
    "renormalize_logits": False, "remove_invalid_values": False,
}
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
    value = ckpt.config_value("vocab_size")
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
    (mine, mine_derived), (theirs, theirs_derived) = model.architecture(), base.architecture()
    mine, theirs = _flat_rope(mine, theirs), _flat_rope(theirs, mine)
    derived = mine_derived | theirs_derived
    errors, notes = [], []
    for key in sorted(set(mine) | set(theirs)):
        a, b = mine.get(key), theirs.get(key)
        if a == b:
            continue
        text = f"{key}: base {b!r}, model {a!r}"
        if a is None or b is None:
            notes.append(f"{text} (one side leaves it to the model class's default)")
        elif key in derived:
            notes.append(f"{text} (derived from hidden_size / num_attention_heads on one side)")
        elif key.split("[")[0].split(".")[0] in CONFIG_KEYS_COMPUTED:
            errors.append(text)
        else:
            notes.append(text)
    if errors:
        findings.append(Finding("CFG007", "error", "values differ from the base (as transformers resolves them, "
                                "whichever version wrote the file): " + "; ".join(errors), CONFIG))
    if notes:
        findings.append(Finding("CFG008", "warning", "; ".join(notes[:8]) + (
            f"; and {len(notes) - 8} more" if len(notes) > 8 else ""), CONFIG))
    if model.config_dtype != base.config_dtype:
        findings.append(Finding("CFG006", "warning", f"dtype is {model.config_dtype!r}, base has "
                                f"{base.config_dtype!r}", CONFIG))
    return findings


def _flat_rope(values: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """`values` with its rope parameters as one key each ("rope[sliding_attention].rope_theta"),
    a single set ("") spread over the other side's layer types, so that each parameter is
    compared on its own and one side stating a parameter the other leaves out is no error."""
    out = {k: v for k, v in values.items() if k != "rope"}
    rope: dict[str, dict[str, Any]] = values.get("rope") or {}
    other_types = [t for t in (other.get("rope") or {}) if t]
    if set(rope) == {""} and other_types:
        rope = {t: rope[""] for t in other_types}
    for layer_type, params in rope.items():
        for name, value in params.items():
            out[f"rope[{layer_type}].{name}" if layer_type else f"rope.{name}"] = value
    return out


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
    eos = model.effective_eos_ids()
    findings = []
    if not gen.exists:
        if eos is None:
            return [Finding("GEN001", "error", "generation_config.json is missing and config.json names no valid "
                            f"eos_token_id (found {model.config.get('eos_token_id')!r}): HF generate and vLLM "
                            "have no eos id and never stop", GENERATION_CONFIG)]
        findings.append(Finding("GEN007", "warning", f"generation_config.json is missing: transformers and vLLM "
                                f"stop at config.json's eos_token_id {_ids(model, eos)} and use their own "
                                "sampling defaults", GENERATION_CONFIG))
    elif gen.error:
        return [Finding("GEN001", "error", f"generation_config.json {gen.error}", GENERATION_CONFIG)]
    elif not isinstance(gen.value, dict) or not gen.value:
        return [Finding("GEN002", "error", "generation_config.json is empty: no eos ids to stop at",
                        GENERATION_CONFIG)]
    elif eos is None:
        return [Finding("GEN002", "error", f"generation_config.json has no valid eos_token_id "
                        f"(found {gen.value.get('eos_token_id')!r}; ids are non-negative integers)",
                        GENERATION_CONFIG)]
    assert eos is not None
    tokenizer_eos = model.tokenizer_eos()
    if tokenizer_eos is not None:
        content, token_id = tokenizer_eos
        if token_id is not None and token_id not in eos:
            severity = _eos_gap_severity(ctx, content, Checkpoint.effective_eos_ids,
                                         lambda c: (c.tokenizer_eos() or ("", None))[0])
            findings.append(Finding("GEN004", severity,
                                    f"tokenizer eos {_tok(model, token_id)} is not in eos_token_id "
                                    f"{_ids(model, eos)}: vLLM stops at it, HF generate does not. {_eos_fix(model, token_id)}",
                                    GENERATION_CONFIG))
    end_of_turn = _end_of_turn(model)
    if end_of_turn is not None:
        token_id = model.token_ids.get(end_of_turn)
        if token_id is not None and token_id not in eos:
            severity = _eos_gap_severity(ctx, end_of_turn, Checkpoint.effective_eos_ids, _end_of_turn)
            findings.append(Finding("GEN005", severity,
                                    f"the chat template ends assistant turns with {_tok(model, token_id)} but "
                                    f"eos_token_id is {_ids(model, eos)}: chat answers will not stop. {_eos_fix(model, token_id)}",
                                    GENERATION_CONFIG))
    return findings


def _eos_fix(model: Checkpoint, token_id: int) -> str:
    if model.has(GENERATION_CONFIG):
        return f"Fix: add {token_id} to eos_token_id in {GENERATION_CONFIG}"
    return f"Fix: write a {GENERATION_CONFIG} (the base's, if it has one) whose eos_token_id holds {token_id}"


def _end_of_turn(ckpt: Checkpoint) -> str | None:
    found = ckpt.chat_template()
    if found is None:
        return None
    known = [t["content"] for t in ckpt.added_tokens()] + list(ckpt.special_tokens().values())
    return chat_template.end_of_turn_token(found[0], ckpt.special_tokens(), known)


def check_generation_config_vs_base(ctx: Context) -> list[Finding]:
    base = ctx.require_base()
    model = ctx.model
    eos, base_eos = model.effective_eos_ids(), base.effective_eos_ids()
    if eos is None:
        raise CheckSkipped("the model has no valid eos ids (see GEN001/GEN002)")
    if base_eos is None:
        raise CheckSkipped("the base has no valid eos ids to compare with")
    findings = []
    lost = base_eos - eos
    if lost:
        findings.append(Finding("GEN003", "error",
                                f"eos_token_id {_ids(model, eos)} lacks the base's {_ids(base, lost)}: "
                                f"generation will not stop there. " + (
                                    f"Fix: restore eos_token_id {sorted(base_eos)} from the base"
                                    if model.has(GENERATION_CONFIG) else
                                    f"Fix: write a {GENERATION_CONFIG} (the base's) with eos_token_id "
                                    f"{sorted(base_eos)}"), GENERATION_CONFIG))
    mine, theirs = model.generation_config, base.generation_config
    changed = [f"{k}: base {theirs.get(k)!r}, model {mine.get(k)!r}"
               for k in sorted(set(theirs) | set(mine))
               if k not in _GEN_IGNORED and _generation_value(theirs, k) != _generation_value(mine, k)]
    if changed:
        findings.append(Finding("GEN006", "warning", "; ".join(changed), GENERATION_CONFIG))
    return findings


def _generation_value(config: dict[str, Any], key: str) -> Any:
    """A generation setting as GenerationConfig resolves it: an absent key is its default, so a
    save that writes a default explicitly (or drops it) changes nothing."""
    return config.get(key, _GENERATION_DEFAULTS.get(key))


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
    changed = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k) and ":" not in k
               and not k.startswith("additional_special_tokens[")]
    extra_mine, extra_theirs = _extra_special(model), _extra_special(base)
    if extra_mine != extra_theirs:
        changed.append("additional special tokens")
        mine["additional special tokens"] = str(sorted(extra_mine))
        theirs["additional special tokens"] = str(sorted(extra_theirs))
    by_severity: tuple[tuple[Severity, str, list[str]], ...] = (
        ("error", "TOK002", [k for k in changed if k in _GENERATION_ROLES]),
        ("warning", "TOK007", [k for k in changed if k not in _GENERATION_ROLES]))
    for severity, code, roles in by_severity:
        if roles:
            findings.append(Finding(code, severity, "special tokens differ from the base: " + "; ".join(
                f"{k}: base {theirs.get(k)!r}, model {mine.get(k)!r}" for k in roles), TOKENIZER_CONFIG))
    # An added token is its id and content; its `special` flag is rewritten by some saves and
    # does not change encoding of ordinary text.
    added = {t["id"]: t["content"] for t in model.added_tokens()}
    base_added = {t["id"]: t["content"] for t in base.added_tokens()}
    # Added tokens are matched whole before the tokenizer model runs: one that is only in the
    # vocabulary any more is split into pieces, and chat prompts are encoded differently.
    lost = sorted((i, c) for i, c in base_added.items() if added.get(i) != c)
    if lost:
        findings.append(Finding("TOK003", "error", f"{len(lost)} added token(s) of the base are missing or "
                                f"changed: {_listed_pairs(lost, added)}", TOKENIZER_JSON))
    vocab = set(base.token_ids.values())
    new = sorted((i, c) for i, c in added.items() if i not in base_added and i not in vocab)
    if new:
        findings.append(Finding("TOK008", "warning", f"{len(new)} token(s) added beyond the base's vocabulary: "
                                f"{new[:5]}{' ...' if len(new) > 5 else ''}", TOKENIZER_JSON))
    return findings


def _extra_special(ckpt: Checkpoint) -> set[str]:
    """The tokenizer's additional special tokens, however the writing version listed them
    (additional_special_tokens, extra_special_tokens, or only as special added tokens, which is
    what they are to the tokenizer either way)."""
    listed = {v for k, v in ckpt.special_tokens().items() if ":" in k or k.startswith("additional_special_tokens[")}
    named = set(ckpt.special_tokens()[k] for k in SPECIAL_TOKEN_KEYS if k in ckpt.special_tokens())
    return listed | {t["content"] for t in ckpt.added_tokens() if t["special"] and t["content"] not in named}


def _listed_pairs(lost: list[tuple[int, str]], now: dict[int, str]) -> str:
    shown = [f"{i} {c!r} (now {now[i]!r})" if i in now else f"{i} {c!r}" for i, c in lost[:5]]
    return ", ".join(shown) + (" ..." if len(lost) > 5 else "")


def check_chat_template_vs_base(ctx: Context) -> list[Finding]:
    base = ctx.require_base()
    base_template = base.chat_template()
    if base_template is None:
        raise CheckSkipped("the base has no chat template to compare with")
    found = ctx.model.chat_template()
    if found is None:
        only_json = " (chat_template.json is read by multimodal processors, not by the tokenizer)" \
            if ctx.model.has(CHAT_TEMPLATE_JSON) else ""
        return [Finding("TOK004", "error", f"no chat template the tokenizer loads{only_json}; the base has one "
                        f"in {base_template[1]}: chat prompts will be rendered wrongly or refused. Fix: copy "
                        f"{base_template[1]} from the base", TOKENIZER_CONFIG)]
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
    index = model.index_file
    if WEIGHTS_FILE in shards:
        if index is not None:
            findings.append(Finding("WGT020", "error", f"{WEIGHTS_FILE} lies beside {index}: transformers loads "
                                    f"{WEIGHTS_FILE}, vLLM the shards the index names, so the two serve different "
                                    "weights. Fix: remove whichever is left from an earlier save", index))
        findings += _strays(model, "transformers reads model.safetensors")
    elif index is not None:
        findings += _check_index(model, index, shards)
    elif len(shards) > 1:
        findings.append(Finding("WGT004", "error", f"{len(shards)} safetensors files ({', '.join(shards[:4])}"
                                f"{', ...' if len(shards) > 4 else ''}) but no model.safetensors.index.json: "
                                "loaders find no weights. This is what an interrupted merge leaves", shards[0]))
    elif shards[0] != "model.safetensors":
        findings.append(Finding("WGT004", "error", f"single weight file {shards[0]} without an index: loaders "
                                "look for model.safetensors", shards[0]))
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
    base = ctx.require_base()
    model = ctx.model
    if _weights_unreadable(model):
        raise CheckSkipped("the model has no safetensors weights to compare (see WGT001/SAF001)")
    if _weights_unreadable(base):
        raise CheckSkipped("the base has no safetensors weights to compare with")
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
    Check("config_vs_base", ("CFG002", "CFG003", "CFG006", "CFG007", "CFG008"), True, check_config_vs_base),
    Check("generation_config", ("GEN001", "GEN002", "GEN004", "GEN005", "GEN007"), False, check_generation_config),
    Check("generation_config_vs_base", ("GEN003", "GEN006"), True, check_generation_config_vs_base),
    Check("tokenizer", ("TOK001",), False, check_tokenizer),
    Check("tokenizer_vs_base", ("TOK002", "TOK003", "TOK007", "TOK008"), True, check_tokenizer_vs_base),
    Check("chat_template_vs_base", ("TOK004", "TOK005", "TOK006"), True, check_chat_template_vs_base),
    Check("weight_files", ("WGT001", "WGT002", "WGT003", "WGT004", "WGT005", "WGT006", "WGT011", "WGT019",
                           "WGT020", "WGT022", "WGT023"), False, check_weight_files),
    Check("weights_vs_base", ("WGT007", "WGT008", "WGT009", "WGT021"), True, check_weights_vs_base),
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
