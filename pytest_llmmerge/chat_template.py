"""Render chat templates the way transformers does, without importing transformers.

Used to compare a checkpoint's template with the base's on fixed sample conversations and to
find the token that ends an assistant turn (which must be an eos id, or generation under
chat never stops).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

# Fixed conversations: English and Chinese, with and without a system turn, multi-turn.
SAMPLE_CONVERSATIONS: tuple[tuple[tuple[tuple[str, str], ...], bool], ...] = (
    ((("user", "Hello! Can you help me?"),), True),
    ((("system", "You are a concise assistant."), ("user", "What is 2+2?"),
      ("assistant", "4"), ("user", "And 3+3?")), True),
    ((("user", "请列出功能清单。"), ("assistant", "功能:无法判断 功能说明:不属于上述描述的功能。")), False),
)
_TURN_MARKER = "LLMMERGE_END_OF_TURN_PROBE"


class TemplateError(Exception):
    """The template could not be compiled or rendered."""


def _environment() -> Any:
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        # transformers marks assistant spans with {% generation %}; the text is unchanged.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    # A fixed date so that templates that print today's date render the same for both sides.
    env.globals["strftime_now"] = lambda fmt: datetime(2024, 1, 1).strftime(fmt)
    return env


def render(template: str, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool,
           special_tokens: Mapping[str, str]) -> str:
    """Render `messages`; raises TemplateError with the template's own message on failure."""
    import jinja2

    kwargs = {k: v for k, v in special_tokens.items() if k.endswith("_token")}
    try:
        compiled = _environment().from_string(template)
        return str(compiled.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **kwargs))
    except jinja2.exceptions.TemplateError as exc:
        raise TemplateError(f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:  # a template is user code; any failure is a finding, not a crash
        raise TemplateError(f"{type(exc).__name__}: {exc}") from None


def render_samples(template: str, special_tokens: Mapping[str, str]) -> list[str]:
    """Rendering (or 'error: ...') of each sample conversation, for comparison with the base."""
    out = []
    for turns, add_prompt in SAMPLE_CONVERSATIONS:
        messages = [{"role": role, "content": content} for role, content in turns]
        try:
            out.append(render(template, messages, add_generation_prompt=add_prompt,
                              special_tokens=special_tokens))
        except TemplateError as exc:
            out.append(f"error: {exc}")
    return out


def end_of_turn_token(template: str, special_tokens: Mapping[str, str],
                      known_tokens: Iterable[str]) -> str | None:
    """The token the template writes right after an assistant message, if it writes one.

    Found by rendering a probe message and matching what follows it against the tokenizer's
    added/special tokens (longest match), so it works for ChatML, Llama 3, Gemma, Mistral, ...
    """
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _TURN_MARKER}]
    try:
        text = render(template, messages, add_generation_prompt=False, special_tokens=special_tokens)
    except TemplateError:
        return None
    position = text.find(_TURN_MARKER)
    if position < 0:
        return None
    rest = text[position + len(_TURN_MARKER):].lstrip()
    matches = [t for t in known_tokens if t and rest.startswith(t)]
    return max(matches, key=len) if matches else None


def first_difference(a: str, b: str, context: int = 30) -> str:
    """A short description of where two renderings first differ."""
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return (f"at character {i}: base {a[max(0, i - context):i + context]!r} "
            f"vs model {b[max(0, i - context):i + context]!r}")
