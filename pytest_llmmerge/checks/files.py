"""The `integrity::` checks of a checkpoint's JSON files: config, generation config, tokenizer,
chat template, and what loading would run (pickles, custom code).  The weight files' own
checks are in :mod:`.shards`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .. import chat_template
from ..checkpoint import Checkpoint
from ..file_names import (
    CHAT_TEMPLATE_JINJA,
    CHAT_TEMPLATE_JSON,
    CONFIG,
    GENERATION_CONFIG,
    SPECIAL_TOKEN_KEYS,
    SPECIAL_TOKENS_MAP,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    TOKENIZER_MODEL_FILES,
)
from ..model_config import CONFIG_KEYS_COMPUTED
from ..stop_sets import end_of_turn_of
from .base import CheckSkipped, Context, Finding, Severity

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


def token_label(ckpt: Checkpoint, token_id: int) -> str:
    """`id (content)` using the checkpoint's tokenizer, for messages a person can act on."""
    names = {v: k for k, v in ckpt.token_ids.items()}
    return f"{token_id} ({names[token_id]})" if token_id in names else str(token_id)


def ids_label(ckpt: Checkpoint, ids: Iterable[int]) -> str:
    return "[" + ", ".join(token_label(ckpt, i) for i in sorted(ids)) + "]"


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
                                f"stop at config.json's eos_token_id {ids_label(model, eos)} and use their own "
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
                                    f"tokenizer eos {token_label(model, token_id)} is not in eos_token_id "
                                    f"{ids_label(model, eos)}: vLLM stops at it, HF generate does not. "
                                    f"{eos_fix(model, token_id)}",
                                    GENERATION_CONFIG))
    end_of_turn = end_of_turn_of(model)
    if end_of_turn is not None:
        token_id = model.token_ids.get(end_of_turn)
        if token_id is not None and token_id not in eos:
            severity = _eos_gap_severity(ctx, end_of_turn, Checkpoint.effective_eos_ids, end_of_turn_of)
            findings.append(Finding("GEN005", severity,
                                    f"the chat template ends assistant turns with {token_label(model, token_id)} but "
                                    f"eos_token_id is {ids_label(model, eos)}: chat answers will not stop. "
                                    f"{eos_fix(model, token_id)}",
                                    GENERATION_CONFIG))
    return findings


def eos_fix(model: Checkpoint, token_id: int) -> str:
    if model.has(GENERATION_CONFIG):
        return f"Fix: add {token_id} to eos_token_id in {GENERATION_CONFIG}"
    return f"Fix: write a {GENERATION_CONFIG} (the base's, if it has one) whose eos_token_id holds {token_id}"


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
                                f"eos_token_id {ids_label(model, eos)} lacks the base's {ids_label(base, lost)}: "
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
    for name in (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
        if not ckpt.has(name) and (ckpt.path / name).exists():
            problems.append(f"{name} is not a regular file")
        error = ckpt.json(name).error
        if error:
            problems.append(f"{name} {error}")
        elif ckpt.has(name) and not isinstance(ckpt.json(name).value, dict):
            problems.append(f"{name} is not a JSON object")
    vocab_problem = _vocab_problem(ckpt.json_object(TOKENIZER_JSON).get("model"))
    if vocab_problem:
        problems.append(f"{TOKENIZER_JSON}: {vocab_problem}: the tokenizers library refuses it")
    for name in (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG):
        found = ckpt.json_object(name)
        bad = [k for k in SPECIAL_TOKEN_KEYS if k in found and not _token_like(found[k])]
        if bad:
            problems.append(f"{name}: {', '.join(bad[:5])} is not a token (a string or an object with a string "
                            "content): the tokenizer does not load")
    return problems


def _vocab_problem(model: Any) -> str | None:
    """A vocabulary of the wrong shape: BPE/WordPiece map pieces to ids, Unigram lists
    [piece, score] pairs."""
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict):
        bad = next((k for k, v in vocab.items() if not isinstance(v, int) or isinstance(v, bool)), None)
        return f"vocab entry {bad!r:.40} has no integer id" if bad is not None else None
    if isinstance(vocab, list):
        bad_at = next((i for i, e in enumerate(vocab) if not (isinstance(e, list) and len(e) == 2 and isinstance(
            e[0], str) and isinstance(e[1], (int, float)) and not isinstance(e[1], bool))), None)
        return f"vocab entry {bad_at} is not a [piece, score] pair" if bad_at is not None else None
    return None


def _token_like(value: Any) -> bool:
    return value is None or isinstance(value, str) or (isinstance(value, dict) and isinstance(value.get("content"), str))


def check_tokenizer(ctx: Context) -> list[Finding]:
    problems = _tokenizer_problems(ctx.model)
    file = TOKENIZER_JSON if problems and TOKENIZER_JSON in problems[0] else TOKENIZER_CONFIG
    return [Finding("TOK001", "error", "; ".join(problems), file)] if problems else []


def check_tokenizer_vs_base(ctx: Context) -> list[Finding]:
    model, base = ctx.comparable_pair(_tokenizer_problems, model_skip="the model's tokenizer files are incomplete "
                                      "(see TOK001)", base_skip="the base's tokenizer files are incomplete")
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


def _unusable_template(model: Checkpoint) -> list[Finding]:
    """What is wrong with a template whatever the base: a file the tokenizer cannot read, or a
    rendering that runs past its time or size budget (a hostile or broken template)."""
    if model.has(CHAT_TEMPLATE_JINJA) and model.chat_template() is None:
        return [Finding("TOK006", "error", f"{CHAT_TEMPLATE_JINJA} cannot be read as UTF-8 text: the tokenizer "
                        "fails to load it", CHAT_TEMPLATE_JINJA)]
    found = model.chat_template()
    problem = chat_template.budget_problem(found[0], model.special_tokens()) if found else None
    if found and problem:
        return [Finding("TOK006", "error", f"rendering a sample conversation ran past the budget: {problem}",
                        found[1])]
    return []


def check_chat_template_vs_base(ctx: Context) -> list[Finding]:
    unusable = _unusable_template(ctx.model) if ctx.base is None else []
    if unusable:
        return unusable  # broken whatever the base; otherwise the comparison is skipped without one
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
