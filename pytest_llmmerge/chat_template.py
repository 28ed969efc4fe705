"""Render chat templates the way transformers does, without importing transformers.

Used to compare a checkpoint's template with the base's on fixed sample conversations and to
find the token that ends an assistant turn (which must be an eos id, or generation under
chat never stops).
"""

from __future__ import annotations

import functools
import json
import re
import string
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from types import FrameType
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

# Fixed conversations: English and Chinese, with and without a system turn, multi-turn.
SAMPLE_CONVERSATIONS: tuple[tuple[tuple[tuple[str, str], ...], bool], ...] = (
    ((("user", "Hello! Can you help me?"),), True),
    ((("system", "You are a concise assistant."), ("user", "What is 2+2?"),
      ("assistant", "4"), ("user", "And 3+3?")), True),
    ((("user", "请列出功能清单。"), ("assistant", "功能:无法判断 功能说明:不属于上述描述的功能。")), False),
)
_TURN_MARKER = "LLMMERGE_END_OF_TURN_PROBE"
# A template is code from the checkpoint: its rendering is bounded in time, output and the size
# of any one value it builds.  Real templates render a conversation in milliseconds.
RENDER_SECONDS = 2.0
MAX_OUTPUT_CHARS = 1_000_000
MAX_VALUE_LENGTH = 1_000_000
MAX_EXPONENT = 1_000
_BUDGET_MARK = " (over budget)"


class TemplateError(Exception):
    """The template could not be compiled or rendered."""


class TemplateBudgetExceeded(TemplateError):
    """The template ran past its time or size budget (a hostile or broken template)."""


class _Deadline:
    """A trace function that stops template code (frames compiled from "<template>") once the
    deadline passes.  Tracing, not a signal: it works in any thread and leaves pytest-timeout's
    alarm alone; frames of other code are not traced at all."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.seconds = seconds
        self.events = 0

    def __call__(self, frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename != "<template>":
            return None
        _check_sizes(frame.f_locals.values())  # a macro called with a doubled string, ...
        return self.local

    def local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > self.deadline:
            raise TemplateBudgetExceeded(f"rendering took longer than {self.seconds:g} s (an unbounded loop?)")
        return self.local


def _check_sizes(values: Iterable[Any]) -> None:
    """No value of more than MAX_VALUE_LENGTH items, counting what nested containers hold once
    written out: {% set x = [x, x] %} sixty times is a list of two that prints as 2**60."""
    for value in values:
        if isinstance(value, (str, list, tuple, dict)) and _written_size(value) > MAX_VALUE_LENGTH:
            raise TemplateBudgetExceeded(f"a value of more than {MAX_VALUE_LENGTH} items")


def _written_size(value: Any) -> int:
    """Items and characters `value` spans once written out.  Each distinct container is counted
    once and its size remembered, so a value that holds itself twice, sixty times over, costs
    sixty steps; past the limit (or on a cycle) the count stops."""
    over = MAX_VALUE_LENGTH + 1
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(value, False)]
    steps = 0
    while stack:
        item, finished = stack.pop()
        if isinstance(item, str):
            sizes[id(item)] = len(item)
            continue
        if not isinstance(item, (list, tuple, dict)):
            sizes[id(item)] = 1
            continue
        children = list(item.values()) if isinstance(item, dict) else list(item)
        if finished:
            on_path.discard(id(item))
            sizes[id(item)] = min(over, len(item) + sum(sizes[id(c)] for c in children))
            continue
        if id(item) in sizes:
            continue
        steps += len(children)
        if steps > over or id(item) in on_path:
            return over
        on_path.add(id(item))
        stack.append((item, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(value)]


# printf conversions ("%-999999999s", "%.999999999f", "%*d") and the numbers in a str.format
# field's spec ("{:>999999999}", "{:.999999999f}") ask one C call for a value of that size.
_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")


def _check_size_request(value: Any) -> None:
    """An integer (or a string of digits, which a nested format field turns into a width)
    asking for more than any one value may hold."""
    digits = value if isinstance(value, str) and value.isdigit() else None
    if isinstance(value, int) and not isinstance(value, bool):
        too_big = value > MAX_VALUE_LENGTH
    elif digits is not None:
        too_big = len(digits) > 7 or int(digits) > MAX_VALUE_LENGTH
    else:
        return
    if too_big:
        raise TemplateBudgetExceeded(f"a size of {str(value)[:20]} is larger than {MAX_VALUE_LENGTH}")


def _check_printf(fmt: str, args: Any) -> None:
    starred = False
    for match in _PRINTF_SPEC.finditer(fmt):
        for number in match.groups():
            if number == "*":
                starred = True
            elif number:
                _check_size_request(number)
    if starred:
        for value in args if isinstance(args, (tuple, list)) else (args,):
            _check_size_request(value)


def _check_format_fields(fmt: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format itself raises the same error
    for _, _, spec, _ in fields:
        for number in _DIGITS.findall(spec or ""):
            _check_size_request(number)
        if spec and "{" in spec:  # "{:{}}": the width comes from an argument
            mappings = [a for a in args if isinstance(a, Mapping)]
            for value in (*args, *kwargs.values(), *(v for m in mappings for v in m.values())):
                _check_size_request(value)


class _GenerationBlock(Extension):
    # transformers marks assistant spans with {% generation %}; the text is unchanged.
    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


class _BoundedNamespace(Namespace):
    # {% set ns.s = ns.s ~ ns.s %} in a loop doubles a value with no operator to intercept.
    def __setitem__(self, name: str, value: Any) -> None:
        _check_sizes([value])
        super().__setitem__(name, value)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    # One `*` or `**` can allocate gigabytes or compute for hours inside a single C call,
    # where no deadline can interrupt it: refuse such operands up front.
    intercepted_binops = frozenset({"*", "**", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "%" and isinstance(left, str):
            _check_printf(left, right)
        if operator == "**" and isinstance(right, int) and abs(right) > MAX_EXPONENT:
            raise TemplateBudgetExceeded(f"exponent {right} is larger than {MAX_EXPONENT}")
        if operator == "*":
            sized = [(v, n) for v, n in ((left, right), (right, left))
                     if isinstance(v, (str, list, tuple)) and isinstance(n, int)]
            if sized and len(sized[0][0]) * sized[0][1] > MAX_VALUE_LENGTH:
                raise TemplateBudgetExceeded(f"a value of more than {MAX_VALUE_LENGTH} items")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        # str.center(10**9), range(10**9): one C call, gigabytes.
        for value in (*args, *kwargs.values()):
            if not isinstance(value, str):
                _check_size_request(value)
        # jinja hands str.format over wrapped (3.1.5+) or bare (before): look through.
        method = getattr(__obj, "__wrapped__", __obj)
        if getattr(method, "__name__", "") in ("format", "format_map") and isinstance(
                getattr(method, "__self__", None), str):
            _check_format_fields(method.__self__, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)


def _environment() -> Any:
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    # Filters are called directly, not through `call`: "x" | center(10**9), "%999999999s" | format.
    env.filters.update({name: _bounded_filter(name, f) for name, f in env.filters.items()})
    # Every {{ value }} is written out by one C call (str of a list): its size is checked first.
    env.finalize = _bounded_output
    env.globals["namespace"] = _BoundedNamespace
    env.globals["raise_exception"] = _raise_exception
    # A fixed date so that templates that print today's date render the same for both sides.
    env.globals["strftime_now"] = lambda fmt: datetime(2024, 1, 1).strftime(fmt)
    return env


def _bounded_output(value: Any) -> Any:
    _check_sizes([value])
    return value


def _bounded_filter(name: str, function: Any) -> Any:
    @functools.wraps(function)  # keeps jinja's pass_context/pass_eval_context mark
    def bounded(*args: Any, **kwargs: Any) -> Any:
        for value in (*args, *kwargs.values()):
            if not isinstance(value, str):
                _check_size_request(value)
        _check_sizes((*args, *kwargs.values()))  # "x" | tojson, | join, | string write containers out
        if name == "format" and args and isinstance(args[0], str):
            _check_printf(args[0], kwargs or args[1:])
        return function(*args, **kwargs)
    return bounded


def render(template: str, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool,
           special_tokens: Mapping[str, str]) -> str:
    """Render `messages`; raises TemplateError with the template's own message on failure."""
    kwargs = {k: v for k, v in special_tokens.items() if k.endswith("_token")}
    previous = sys.gettrace()
    sys.settrace(_Deadline(RENDER_SECONDS))
    try:
        compiled = _environment().from_string(template)
        parts: list[str] = []
        size = 0
        for part in compiled.generate(messages=[dict(m) for m in messages], tools=None, documents=None,
                                      add_generation_prompt=add_generation_prompt, **kwargs):
            size += len(part)
            if size > MAX_OUTPUT_CHARS:
                raise TemplateBudgetExceeded(f"the rendering is longer than {MAX_OUTPUT_CHARS} characters")
            parts.append(part)
        return "".join(parts)
    except TemplateBudgetExceeded:
        raise
    except jinja2.exceptions.TemplateError as exc:
        raise TemplateError(f"{type(exc).__name__}: {exc}") from None
    except RecursionError:
        raise TemplateError("RecursionError: the template recurses without end") from None
    except Exception as exc:  # a template is user code; any failure is a finding, not a crash
        raise TemplateError(f"{type(exc).__name__}: {exc}") from None
    finally:
        sys.settrace(previous)


def render_samples(template: str, special_tokens: Mapping[str, str]) -> list[str]:
    """Rendering (or 'error: ...') of each sample conversation, for comparison with the base."""
    out = []
    for turns, add_prompt in SAMPLE_CONVERSATIONS:
        messages = [{"role": role, "content": content} for role, content in turns]
        try:
            out.append(render(template, messages, add_generation_prompt=add_prompt,
                              special_tokens=special_tokens))
        except TemplateBudgetExceeded as exc:
            # The same template on the next conversation would only spend its budget again.
            return out + [f"error: {exc}{_BUDGET_MARK}"] * (len(SAMPLE_CONVERSATIONS) - len(out))
        except TemplateError as exc:
            out.append(f"error: {exc}")
    return out


def budget_problem(template: str, special_tokens: Mapping[str, str]) -> str | None:
    """Why the template ran past its time or size budget on a sample conversation, or None.
    A template that merely raises (some refuse a system turn) is not over budget."""
    renders = render_samples(template, special_tokens)
    budget = next((r for r in renders if r.startswith("error: ") and _BUDGET_MARK in r), None)
    return budget.removeprefix("error: ").replace(_BUDGET_MARK, "") if budget else None


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
