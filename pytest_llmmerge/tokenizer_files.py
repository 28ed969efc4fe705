"""The tokenizer side of a checkpoint directory, read without transformers: token ids, added
and special tokens, the eos token and the chat template, as AutoTokenizer would load them."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from .file_names import (
    CHAT_TEMPLATE_JINJA,
    SPECIAL_TOKEN_KEYS,
    SPECIAL_TOKENS_MAP,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
)
from .text_files import read_text

# A chat template is a few kilobytes; a larger file is not read.
MAX_TEMPLATE_BYTES = 16 * 1024 * 1024


class TokenizerFiles:
    """Mixed into Checkpoint, which provides the directory and its parsed JSON files."""

    path: Path

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def json_object(self, name: str) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def tokenizer_config(self) -> dict[str, Any]:
        return self.json_object(TOKENIZER_CONFIG)

    @cached_property
    def token_ids(self) -> dict[str, int]:
        """Token content -> id from tokenizer.json's vocabulary and added tokens."""
        tok = self.json_object(TOKENIZER_JSON)
        ids: dict[str, int] = {}
        model = tok.get("model")
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if isinstance(vocab, dict):
            ids.update({str(k): int(v) for k, v in vocab.items() if isinstance(v, int)})
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], id is the position
            ids.update({str(item[0]): i for i, item in enumerate(vocab) if isinstance(item, list) and item})
        for added in self.added_tokens():
            ids[added["content"]] = added["id"]
        return ids

    def added_tokens(self) -> list[dict[str, Any]]:
        """Added tokens as {id, content, special}, from tokenizer.json or tokenizer_config.json."""
        tok = self.json_object(TOKENIZER_JSON)
        found: dict[int, dict[str, Any]] = {}
        listed = tok.get("added_tokens")
        for entry in listed if isinstance(listed, list) else []:
            if isinstance(entry, dict) and isinstance(entry.get("id"), int):
                found[entry["id"]] = {"id": entry["id"], "content": str(entry.get("content")),
                                      "special": bool(entry.get("special", False))}
        decoder = self.tokenizer_config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            for key, entry in decoder.items():
                if isinstance(entry, dict) and str(key).isdigit() and int(key) not in found:
                    found[int(key)] = {"id": int(key), "content": str(entry.get("content")),
                                       "special": bool(entry.get("special", False))}
        return [found[i] for i in sorted(found)]

    def tokenizer_rows_needed(self) -> int | None:
        """Embedding rows the tokenizer needs (its largest id + 1), None when unknown."""
        ids = self.token_ids
        return max(ids.values()) + 1 if ids else None

    def special_tokens(self) -> dict[str, str]:
        """Role -> token content (bos/eos/unk/pad/..., plus additional ones by position).

        special_tokens_map.json wins over tokenizer_config.json where both name a role, as
        AutoTokenizer resolves them (measured with transformers 5.19: a map naming another eos
        moves the tokenizer's eos, and vLLM's with it)."""
        merged: dict[str, Any] = {}
        for source in (self.tokenizer_config, self.json_object(SPECIAL_TOKENS_MAP)):
            for key in SPECIAL_TOKEN_KEYS:
                if key in source and source[key] is not None:
                    merged[key] = source[key]
            for key in ("additional_special_tokens", "extra_special_tokens"):
                extra = source.get(key)
                if isinstance(extra, list) and extra:
                    merged["additional_special_tokens"] = extra
                elif isinstance(extra, dict) and extra:
                    merged.update({f"extra:{k}": v for k, v in extra.items()})
        out: dict[str, str] = {}
        for key, value in merged.items():
            if key == "additional_special_tokens":
                for i, item in enumerate(value):
                    out[f"additional_special_tokens[{i}]"] = _token_content(item)
            else:
                out[key] = _token_content(value)
        return out

    def tokenizer_eos(self) -> tuple[str, int | None] | None:
        """(content, id) of the tokenizer's eos token, None when it declares none."""
        content = self.special_tokens().get("eos_token")
        if not content:
            return None
        return content, self.token_ids.get(content)

    def chat_template(self) -> tuple[str, str] | None:
        """(template, file it came from) as the tokenizer loads it: chat_template.jinja wins over
        tokenizer_config.json.  chat_template.json is read by multimodal processors only, never
        by AutoTokenizer, so a template only there is no chat template for a language model."""
        if self.has(CHAT_TEMPLATE_JINJA):
            try:
                return read_text(self.path / CHAT_TEMPLATE_JINJA, MAX_TEMPLATE_BYTES), CHAT_TEMPLATE_JINJA
            except (OSError, UnicodeDecodeError):
                return None
        template = _pick_template(self.tokenizer_config.get("chat_template"))
        return (template, TOKENIZER_CONFIG) if template else None


def _token_content(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return str(value)


def _pick_template(value: Any) -> str | None:
    """The default template from a string or a list of named templates."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list):
        named = {str(t.get("name")): t.get("template") for t in value if isinstance(t, dict)}
        chosen = named.get("default") or next(iter(named.values()), None)
        return chosen if isinstance(chosen, str) and chosen.strip() else None
    return None
