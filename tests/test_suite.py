"""YAML suites: loading, defaults, every error form, the shipped suites, and evaluating outputs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from conftest import REPO
from pytest_llmmerge.backends.base import FinishReason, Generation
from pytest_llmmerge.expectations import evaluate, repeated_ngram
from pytest_llmmerge.suite import (
    VARIANTS,
    Case,
    Expect,
    MAX_SUITE_BYTES,
    NgramLimit,
    SuiteError,
    default_suite,
    load_schema,
    load_suite,
    looks_like_suite,
)

EXAMPLE_SUITES = sorted((REPO / "example_suites").glob("*.yaml"))

GOOD = """\
description: two cases
defaults:
  max_new_tokens: 32
  timeout_s: 30
  tags: [smoke]
  variants: [merged, adapter]
  expect:
    max_repeated_ngram: {n: 4, max_count: 3}
    not_contains: "<|im_start|>"
cases:
  - id: repeat
    prompt: "Repeat: apple\\nAnswer:"
    expect: {contains: apple, not_contains: [banana, cherry]}
  - id: chat.zh-1
    messages:
      - {role: system, content: 简短回答}
      - {role: user, content: 你好}
    max_new_tokens: 8
    must_terminate: false
    tags: []
    backends: [hf, vllm]
    note: why
corpus:
  - some text
"""


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def write(directory: Path, text: str, name: str = "bad.yaml") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_valid_suite_loads_with_defaults_merged(in_tmp: Path) -> None:
    suite = load_suite(write(in_tmp, GOOD, "smoke.yaml"))
    assert (suite.name, suite.description, suite.corpus) == ("smoke", "two cases", ("some text",))
    raw, chat = suite.cases
    assert raw == Case(
        id="repeat", prompt="Repeat: apple\nAnswer:", max_new_tokens=32, must_terminate=True, timeout_s=30.0,
        # expect merges per key: the case's not_contains replaces the default's, the loop guard stays
        expect=Expect(contains=("apple",), not_contains=("banana", "cherry"),
                      max_repeated_ngram=NgramLimit(4, 3)),
        tags=("smoke",), variants=("merged", "adapter"), backends=(), note="", line=11)
    assert chat.messages == (("system", "简短回答"), ("user", "你好"))
    assert chat.prompt is None
    assert (chat.max_new_tokens, chat.must_terminate, chat.tags, chat.backends) == (8, False, (), ("hf", "vllm"))
    assert chat.expect == Expect(not_contains=("<|im_start|>",), max_repeated_ngram=NgramLimit(4, 3))
    assert (chat.note, chat.line) == ("why", 14)


def test_built_in_defaults_apply_without_a_defaults_block(in_tmp: Path) -> None:
    suite = load_suite(write(in_tmp, "suite: named\ncases:\n  - {id: a, prompt: x}\n"))
    assert suite.name == "named"
    assert suite.cases[0] == Case(id="a", prompt="x", line=3)
    assert (suite.cases[0].max_new_tokens, suite.cases[0].timeout_s) == (64, 120.0)
    # No backends given: the case runs on every backend the run selects.
    assert (suite.cases[0].variants, suite.cases[0].backends) == (("merged",), ())


BAD: dict[str, tuple[str, str]] = {
    "negative budget": (
        "cases:\n" + "".join(f"  - {{id: c{i}, prompt: x}}\n" for i in range(3))
        + "  - {id: c3, prompt: x, max_new_tokens: -1}\n",
        "cases[3].max_new_tokens: -1 is less than the minimum of 1"),
    "unknown key typo": (
        "cases:\n  - {id: a, prompt: x, max_new_token: 3}\n",
        "cases[0]: unknown key 'max_new_token' (did you mean 'max_new_tokens'?)"),
    "unknown expect key": (
        "cases:\n  - {id: a, prompt: x, expect: {contain: a}}\n",
        "cases[0].expect: unknown key 'contain' (did you mean 'contains'?)"),
    "both prompt and messages": (
        "cases:\n  - {id: a, prompt: x, messages: [{role: user, content: hi}]}\n",
        "cases[0]: give exactly one of 'prompt' or 'messages' (both given)"),
    "neither prompt nor messages": (
        "cases:\n  - {id: a, prompt: x}\n  - {id: b, note: empty}\n",
        "cases[1]: give exactly one of 'prompt' or 'messages' (neither given)"),
    "bad role": (
        "cases:\n  - id: a\n    messages: [{role: robot, content: hi}]\n",
        "cases[0].messages[0].role: 'robot' is not one of ['system', 'user', 'assistant', 'tool']"),
    "duplicate ids": (
        "cases:\n  - {id: a, prompt: x}\n  - {id: b, prompt: x}\n  - {id: a, prompt: y}\n",
        "cases[2].id: duplicate id 'a', also used by cases[0]"),
    "bad regex": (
        "cases:\n  - {id: a, prompt: x, expect: {regex: [ok, '(']}}\n",
        "cases[0].expect.regex[1]: invalid regular expression '(': missing ), unterminated subpattern at position 0"),
    "bad regex in defaults": (
        "defaults: {expect: {regex: '[a-'}}\ncases:\n  - {id: a, prompt: x}\n",
        "defaults.expect.regex: invalid regular expression '[a-': unterminated character set at position 0"),
    "empty file": ("", "<root>: the file is empty; a suite needs at least a 'cases' list"),
    "only comments": ("# todo\n", "<root>: the file is empty; a suite needs at least a 'cases' list"),
    "yaml syntax error": (
        "cases:\n  - id: a\n    prompt: x: y\n",
        "line 3, column 14: invalid YAML: mapping values are not allowed here"),
    "tags not a list": ("cases:\n  - {id: a, prompt: x, tags: smoke}\n", "cases[0].tags: 'smoke' is not of type 'array'"),
    "timeout zero": (
        "cases:\n  - {id: a, prompt: x, timeout_s: 0}\n",
        "cases[0].timeout_s: 0 is less than or equal to the minimum of 0"),
    "unknown variant": (
        "defaults: {variants: [mergd]}\ncases:\n  - {id: a, prompt: x}\n",
        "defaults.variants[0]: unknown variant 'mergd' (did you mean 'merged'?)"),
    "no cases": ("suite: x\n", "<root>: 'cases' is a required property"),
    "empty cases": ("cases: []\n", "cases: [] should be non-empty"),
    "prompt as a default": (
        "defaults: {prompt: x}\ncases:\n  - {id: a, prompt: x}\n",
        "defaults: 'prompt' cannot have a default; give it in each case"),
    "duplicate yaml key": (
        "cases:\n  - id: a\n    prompt: x\n    prompt: y\n",
        "cases[0]: duplicate key 'prompt' (lines 3 and 4)"),
    "id with a space": (
        "cases:\n  - {id: 'a b', prompt: x}\n",
        r"cases[0].id: 'a b' does not match the pattern ^[A-Za-z0-9_.\-]+$"),
    "case is a string": ("cases:\n  - hello\n", "cases[0]: 'hello' is not of type 'object'"),
    "root is a list": ("- a\n", "<root>: ['a'] is not of type 'object'"),
}


@pytest.mark.parametrize("text,expected", list(BAD.values()), ids=list(BAD))
def test_each_error_names_file_json_path_and_problem(in_tmp: Path, text: str, expected: str) -> None:
    with pytest.raises(SuiteError) as excinfo:
        load_suite(write(in_tmp, text))
    assert str(excinfo.value) == f"bad.yaml: {expected}"


def test_several_problems_give_one_line_each(in_tmp: Path) -> None:
    with pytest.raises(SuiteError) as excinfo:
        load_suite(write(in_tmp, "cases:\n  - {id: a, promt: x, max_new_tokens: 0}\n"))
    assert str(excinfo.value).splitlines() == [
        "bad.yaml: cases[0]: unknown key 'promt' (did you mean 'prompt'?)",
        "bad.yaml: cases[0]: give exactly one of 'prompt' or 'messages' (neither given)",
        "bad.yaml: cases[0].max_new_tokens: 0 is less than the minimum of 1",
    ]


def test_file_is_named_relative_to_cwd_else_by_name(in_tmp: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    with pytest.raises(SuiteError, match=r"^suites/bad\.yaml: cases: "):
        load_suite(write(in_tmp, "cases: []\n", "suites/bad.yaml"))
    elsewhere = write(tmp_path_factory.mktemp("elsewhere"), "cases: []\n", "far.yaml")
    with pytest.raises(SuiteError, match=r"^far\.yaml: cases: "):
        load_suite(elsewhere)


def test_unreadable_file_is_a_suite_error(in_tmp: Path) -> None:
    with pytest.raises(SuiteError, match=r"^missing\.yaml: <root>: cannot read the file: "):
        load_suite(in_tmp / "missing.yaml")


def test_a_suite_that_is_not_a_regular_file_or_too_big_is_refused_unread(in_tmp: Path) -> None:
    """A FIFO would block the read forever, a device would never end."""
    import os

    os.mkfifo(in_tmp / "fifo.yaml")
    with pytest.raises(SuiteError, match=r"^fifo\.yaml: <root>: cannot read the file: .* is not a regular file"):
        load_suite(in_tmp / "fifo.yaml")
    assert not looks_like_suite(in_tmp / "fifo.yaml")
    big = in_tmp / "big.yaml"
    with big.open("wb") as fh:
        fh.truncate(MAX_SUITE_BYTES + 1)
    with pytest.raises(SuiteError, match=r"^big\.yaml: <root>: cannot read the file: .* more than the"):
        load_suite(big)


def test_a_yaml_bomb_beside_the_suites_is_not_expanded_to_tell_whether_it_is_one(in_tmp: Path) -> None:
    bomb = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)) + "cases: [*i]\n"
    assert looks_like_suite(write(in_tmp, bomb, "bomb.yaml"))  # a suite to report, refused at load
    with pytest.raises(SuiteError, match=r"more than 200000 values \(YAML aliases expanded\)"):
        load_suite(in_tmp / "bomb.yaml")


def test_looks_like_suite(in_tmp: Path) -> None:
    assert looks_like_suite(write(in_tmp, GOOD, "a.yaml"))
    assert looks_like_suite(write(in_tmp, "cases:\n  - id: a\n    prompt: x: y\n", "broken.yaml"))
    assert not looks_like_suite(write(in_tmp, "jobs: {build: {}}\n", "ci.yaml"))
    assert not looks_like_suite(write(in_tmp, "", "empty.yaml"))


def _walk(schema: Any, where: str = "#") -> Iterator[tuple[str, Any]]:
    if isinstance(schema, dict):
        for name, sub in schema.get("properties", {}).items():
            yield f"{where}/properties/{name}", sub
        for key, sub in schema.items():
            yield from _walk(sub, f"{where}/{key}")
    elif isinstance(schema, list):
        for i, sub in enumerate(schema):
            yield from _walk(sub, f"{where}/{i}")


def test_shipped_schema_is_valid_and_documented() -> None:
    schema = load_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] and schema["title"] and schema["description"]
    undocumented = [where for where, sub in _walk(schema) if "description" not in sub]
    assert undocumented == []
    assert tuple(schema["$defs"]["variants"]["items"]["anyOf"][0]["enum"]) == VARIANTS


def test_default_suite_is_generic() -> None:
    suite = default_suite()
    assert suite.name == "default" and 6 <= len(suite.cases) <= 8
    for case in suite.cases:
        # It runs against any model: termination and loop checks only, never content.
        assert case.expect.contains == case.expect.not_contains == case.expect.regex == ()
        assert case.expect.equals is None and case.expect.max_repeated_ngram is not None
        assert 48 <= case.max_new_tokens <= 64 and case.timeout_s == 120 and case.note
    chats = [c for c in suite.cases if c.messages is not None]
    assert any(c.must_terminate for c in chats)
    assert any(len(c.messages or ()) > 2 and c.messages and c.messages[0][0] == "system" for c in chats)
    assert any("功能:无法判断 功能说明:不属于上述描述的功能。" in content
               for c in chats for _, content in c.messages or ())


@pytest.mark.parametrize("path", EXAMPLE_SUITES, ids=[p.name for p in EXAMPLE_SUITES])
def test_example_suites_load(path: Path) -> None:
    suite = load_suite(path)
    assert suite.cases and all(case.timeout_s <= 60 and case.note for case in suite.cases)


def test_the_three_example_suites_exist() -> None:
    assert {p.name for p in EXAMPLE_SUITES} >= {"smoke.yaml", "chat.yaml", "field-failures.yaml"}


# --------------------------------------------------------------------------------------------
# evaluate


EOS = 2


def gen(text: str, ids: tuple[int, ...] | None = None, finish: FinishReason = "stop") -> Generation:
    if ids is None:
        ids = tuple(range(10, 10 + len(text.split()))) + ((EOS,) if finish == "stop" else ())
    return Generation(text=text, token_ids=ids, finish_reason=finish,
                      stop_token_id=EOS if finish == "stop" else None, seconds=0.1)


def case(**kwargs: Any) -> Case:
    expect = Expect(**kwargs.pop("expect", {}))
    return Case(id="c", prompt="p", max_new_tokens=48, expect=expect, **kwargs)


def test_a_good_generation_passes() -> None:
    c = case(expect={"contains": ("Paris",), "not_contains": ("<|im_start|>",), "regex": (r"^\s*Paris\b",),
                     "equals": "Paris is the capital.", "min_new_tokens": 2,
                     "max_repeated_ngram": NgramLimit(2, 1)})
    assert evaluate(c, gen(" Paris is the capital. ")) == []


def test_length_finish_fails_only_when_termination_is_required() -> None:
    looping = gen("apple " * 48, tuple([7] * 48), finish="length")
    assert evaluate(case(), looping) == ["did not terminate: no eos within 48 tokens (finish_reason=length)"]
    assert evaluate(case(must_terminate=False), looping) == []


@pytest.mark.parametrize("expect,text,reason", [
    ({"contains": ("Paris", "France")}, "Paris", "missing expected text 'France'"),
    ({"contains": ("无法判断",)}, "查询天气", "missing expected text '无法判断'"),
    ({"not_contains": ("<|im_end|>",)}, "hi<|im_end|>", "contains forbidden text '<|im_end|>'"),
    ({"regex": (r"\d+",)}, "seven", r"no match for regex '\\d+'"),
    ({"equals": "7"}, " 17 ", "output is not exactly '7' (got '17')"),
    ({"min_new_tokens": 1}, "", "too short: 0 new tokens, expected at least 1"),
])
def test_each_text_check_gives_its_reason(expect: dict[str, Any], text: str, reason: str) -> None:
    assert evaluate(case(expect=expect), gen(text)) == [reason]


def test_loop_reason_names_the_ngram_and_counts() -> None:
    ids = (5, 6) + (12, 7, 7, 9) * 9 + (EOS,)
    reasons = evaluate(case(expect={"max_repeated_ngram": NgramLimit(4, 3)}), gen("x", ids))
    assert reasons == ["degenerate loop: token 4-gram [12, 7, 7, 9] occurs 9 times (max 3)"]


def test_all_reasons_are_reported_together() -> None:
    c = case(expect={"contains": ("a",), "max_repeated_ngram": NgramLimit(1, 10)})
    reasons = evaluate(c, gen("b", tuple([3] * 48), finish="length"))
    assert reasons == ["did not terminate: no eos within 48 tokens (finish_reason=length)",
                       "missing expected text 'a'",
                       "degenerate loop: token 1-gram [3] occurs 48 times (max 10)"]


def test_repeated_ngram_finds_chinese_like_loops() -> None:
    # "的的的..." and "苹果苹果..." as byte-level BPE ids: one 3-byte character, or a 2-token word.
    assert repeated_ngram([231, 154, 132] * 10, 3) == ((231, 154, 132), 10)
    assert repeated_ngram([4001] * 20, 4) == ((4001, 4001, 4001, 4001), 17)
    assert repeated_ngram([88, 301, 5021, 301, 5021, 301, 5021], 2) == ((301, 5021), 3)


def test_repeated_ngram_edges() -> None:
    assert repeated_ngram([1, 2], 3) is None
    assert repeated_ngram([1, 2, 3], 1) == ((1,), 1)  # ties go to the first n-gram seen
    with pytest.raises(ValueError):
        repeated_ngram([1], 0)


def test_a_regex_that_backtracks_forever_is_stopped_and_named() -> None:
    """(a+)+$ on forty a's and a '!' would run for hours in pytest's own process."""
    from pytest_llmmerge import expectations

    backtracking = case(expect={"regex": (r"(a+)+$", r"a")})
    original = expectations.REGEX_SECONDS
    expectations.REGEX_SECONDS = 0.5
    try:
        reasons = evaluate(backtracking, gen("a" * 40 + "!"))
    finally:
        expectations.REGEX_SECONDS = original
    assert reasons == ["regex '(a+)+$' took longer than 0.5 s on the output and was stopped (nested repetition "
                       "such as (a+)+ backtracks exponentially: rewrite it)"]
