"""Property-based fuzzing of every parser the plugin owns or feeds with checkpoint or suite files.

The property, for any input: a result, a finding with a code, or a usage error naming the file
and the spot; never a traceback, a hang or unbounded work.  Example counts are bounded so the
suite stays within CI's time; the explicit examples are the hostile shapes seen in the field
(deep nesting, integers past Python's digit limit, alias bombs, unbounded templates).
"""

from __future__ import annotations

import json
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from pytest_llmmerge import chat_template
from pytest_llmmerge.checkpoint import Checkpoint
from pytest_llmmerge.checks import checks_of
from pytest_llmmerge.checks.base import Context, run_check
from pytest_llmmerge.checks.codes import CODES
from pytest_llmmerge.file_names import CONFIG, GENERATION_CONFIG, TOKENIZER_CONFIG, TOKENIZER_JSON, WEIGHTS_INDEX
from pytest_llmmerge.safetensors_header import HeaderError, read_safetensors_header
from pytest_llmmerge.suite import SuiteError, parse_suite

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)
DEEP = "[" * 50_000 + "]" * 50_000
HUGE_INT = "9" * 5_000

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30)
# Values under the keys the checks read, so that fuzzing reaches past "key missing".
config_like = st.fixed_dictionaries({}, optional={
    key: json_values for key in ("model_type", "architectures", "vocab_size", "hidden_size", "num_attention_heads",
                                 "num_key_value_heads", "head_dim", "rope_theta", "rope_parameters", "rope_scaling",
                                 "tie_word_embeddings", "eos_token_id", "text_config", "dtype", "torch_dtype",
                                 "max_position_embeddings", "auto_map", "weight_map", "chat_template",
                                 "added_tokens", "added_tokens_decoder", "model", "eos_token", "pad_token",
                                 "additional_special_tokens", "extra_special_tokens")})


def _header_file(directory: Path, header: bytes, data: bytes) -> Path:
    path = directory / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@FUZZ
@given(raw=st.binary(max_size=300))
@example(raw=b"")
@example(raw=struct.pack("<Q", 2**63))
def test_any_bytes_give_a_header_or_a_header_error(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(raw)
        try:
            read_safetensors_header(path)
        except HeaderError:
            pass


@FUZZ
@given(header=json_values | config_like, data=st.binary(max_size=64))
@example(header=DEEP, data=b"")
@example(header=f'{{"a": {{"dtype": "F32", "shape": [{HUGE_INT}], "data_offsets": [0, 4]}}}}', data=b"\0" * 4)
@example(header={"a": {"dtype": "F4", "shape": [2**1100], "data_offsets": [0, 4]}}, data=b"")
@example(header={"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, data=b"\0" * 4)
@example(header={"a": {"dtype": "F32", "shape": [10**2200, 10**2200], "data_offsets": [0, 4]}}, data=b"")
@example(header={"a": {"dtype": "F32", "shape": [2] * 200_000, "data_offsets": [0, 4]}}, data=b"")
def test_any_json_header_gives_a_header_or_a_header_error(header: Any, data: bytes) -> None:
    raw = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            parsed = read_safetensors_header(_header_file(Path(tmp), raw, data))
        except HeaderError as exc:
            assert str(exc)
            return
        parsed.layout_problem()
        parsed.overruns()


def _tiny_weights(directory: Path) -> None:
    save_file({"model.embed_tokens.weight": np.ones((4, 2), dtype=np.float32),
               "lm_head.weight": np.ones((4, 2), dtype=np.float32)}, str(directory / "model.safetensors"))


@FUZZ
@given(files=st.fixed_dictionaries({}, optional={
    name: config_like | json_values for name in (CONFIG, GENERATION_CONFIG, TOKENIZER_CONFIG, TOKENIZER_JSON,
                                                WEIGHTS_INDEX)}),
       against_base=st.booleans())
@example(files={CONFIG: DEEP, TOKENIZER_JSON: DEEP}, against_base=True)
@example(files={CONFIG: f'{{"vocab_size": {HUGE_INT}}}', GENERATION_CONFIG: f'{{"eos_token_id": [{HUGE_INT}]}}'},
         against_base=True)
@example(files={GENERATION_CONFIG: {"eos_token_id": [-1, 2]}, WEIGHTS_INDEX: {"weight_map": {}}}, against_base=False)
@example(files={TOKENIZER_JSON: {"model": True, "added_tokens": True}}, against_base=True)
def test_any_checkpoint_files_give_findings_with_codes(files: dict[str, Any], against_base: bool) -> None:
    """Every check of a checkpoint whose JSON files hold anything returns findings (or a
    skip with its reason); run_check lets any other exception through, so this catches it."""
    with tempfile.TemporaryDirectory() as tmp:
        model, base = Path(tmp) / "model", Path(tmp) / "base"
        for directory in (model, base):
            directory.mkdir()
            _tiny_weights(directory)
        for name, value in files.items():
            (model / name).write_text(value if isinstance(value, str) else json.dumps(value), encoding="utf-8")
            if against_base:
                (base / name).write_text(json.dumps({"eos_token_id": 1, "vocab_size": 4}), encoding="utf-8")
        ctx = Context(Checkpoint(model), Checkpoint(base) if against_base else None)
        for check in checks_of("integrity"):
            outcome = run_check(check, ctx)
            for finding in outcome.findings:
                assert finding.code in CODES and finding.file and finding.message


template_pieces = st.sampled_from([
    "{% for m in messages %}", "{% endfor %}", "{{ m.content }}", "{{ m.role }}", "{% if add_generation_prompt %}",
    "{% endif %}", "<|im_start|>", "<|im_end|>", "{{ eos_token }}", "{% for i in range(100000) %}",
    "{{ 'x' * 100000 }}", "{{ raise_exception('no') }}", "{% set x = messages[0] %}", "{{ x.content|tojson }}",
    "{{ 2 ** 99999 }}", "{{", "}}", "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "text", "\n"])


@settings(max_examples=40, deadline=None, derandomize=True)
@given(template=st.lists(template_pieces, max_size=8).map("".join) | st.text(max_size=80))
@example(template="{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
@example(template="{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}")
@example(template="{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f('x') }}{{ '%999999999s' % 1 }}")
def test_any_chat_template_renders_or_fails_within_its_budget(template: str) -> None:
    started = time.monotonic()
    renders = chat_template.render_samples(template, {"eos_token": "<|im_end|>"})
    assert len(renders) == len(chat_template.SAMPLE_CONVERSATIONS)
    assert all(isinstance(r, str) and len(r) <= chat_template.MAX_OUTPUT_CHARS + 200 for r in renders)
    chat_template.end_of_turn_token(template, {}, ["<|im_end|>"])
    # One budget for the samples (a template that runs out stops there) and one for the probe.
    assert time.monotonic() - started < 3 * chat_template.RENDER_SECONDS + 2


ONE_CALL_HUGE = ['{{ "{:999999999}".format(1) }}', '{{ "{:.999999999f}".format(1.0) }}', '{{ "%.999999999f" % 1.0 }}',
                 '{{ ("{:" ~ "999999999}").format(1) }}', '{{ "{:{}}".format(1, "999999999") }}',
                 '{{ "{a:{b}}".format_map({"a": 1, "b": 999999999}) }}', '{{ "%*d" % (999999999, 1) }}',
                 '{{ "%999999999s" | format("x") }}', '{{ "x" | center(999999999) }}',
                 '{{ "a\nb" | indent(999999999) }}', '{{ "x".ljust(999999999) }}']


@pytest.mark.parametrize("template", ONE_CALL_HUGE)
def test_a_single_call_asking_for_a_huge_value_is_refused_before_it_runs(template: str) -> None:
    """One C call (a format width, a filter's size) can allocate gigabytes before any deadline
    or output limit can look: such requests are refused up front, by their size."""
    with pytest.raises(chat_template.TemplateBudgetExceeded, match="a size of 999999999 is larger"):
        chat_template.render(template, [{"role": "user", "content": "hi"}], add_generation_prompt=True,
                             special_tokens={})


@pytest.mark.parametrize("template", [
    "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = [ns.s, ns.s] %}{% endfor %}{{ ns.s }}",
    "{% set ns = namespace(s=['x']) %}{% for i in range(60) %}{% set ns.s = {'a': ns.s, 'b': ns.s} %}{% endfor %}"
    "{{ ns.s | tojson }}"])
def test_a_value_that_shares_itself_is_measured_as_written_out(template: str) -> None:
    """A list of two that holds itself twice, sixty times over, prints as 2**60 items in one C call."""
    with pytest.raises(chat_template.TemplateBudgetExceeded, match="a value of more than"):
        chat_template.render(template, [], add_generation_prompt=False, special_tokens={})


def test_formatting_of_ordinary_size_renders_as_jinja_does() -> None:
    template = ('{{ "%5.2f" % 3.14159 }}|{{ "{:>5}".format("ab") }}|{{ "%s-%s" | format(1, 2) }}|'
                '{{ "ab" | center(6) }}|{{ "{:{}}".format(1, 3) }}|{{ "a\nb" | indent(2) }}|{{ "x" | truncate(10) }}')
    rendered = chat_template.render(template, [], add_generation_prompt=False, special_tokens={})
    assert rendered == " 3.14|   ab|1-2|  ab  |  1|a\n  b|x"


suite_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=15),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["cases", "id", "prompt", "messages", "role", "content", "max_new_tokens", "timeout_s",
                         "must_terminate", "expect", "defaults", "contains", "variants", "x"]), inner, max_size=5),
    max_leaves=25)


@FUZZ
@given(text=st.text(max_size=200) | suite_values.map(lambda v: json.dumps(v, allow_nan=True)))
@example(text="cases:\n  - id: a\n    prompt: hi\n    timeout_s: .nan\n")
@example(text="a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
              "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
              "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ncases: [*f]\n")
@example(text="cases: " + "[" * 20_000)
@example(text="cases: &x [*x]\n")
@example(text="cases:\n  - id: a\n    prompt: hi\n    max_new_tokens: " + "9" * 5000 + "\n")
def test_any_suite_text_gives_a_suite_or_a_suite_error_naming_the_file(text: str) -> None:
    try:
        parse_suite(text, Path("fuzz.yaml"))
    except SuiteError as exc:
        assert str(exc).startswith("fuzz.yaml: ")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_numbers_in_a_suite_are_refused_at_load(value: float) -> None:
    text = f"cases:\n  - id: a\n    prompt: hi\n    timeout_s: {'.nan' if value != value else '.inf'}\n"
    with pytest.raises(SuiteError, match=r"fuzz.yaml: cases\[0\].timeout_s: .* is not a finite number"):
        parse_suite(text, Path("fuzz.yaml"))
