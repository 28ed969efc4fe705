"""The README's reliability table: hostile inputs of each class, how many were tried, how they ended.

    python tests/reliability_table.py        # prints the table (tests/test_reliability.py runs it)

Every input is generated from a fixed seed, so the table is the same on every machine; an input
"ends well" when it gives a result, a finding with a code or a usage error naming the file and
the spot, within its time budget.  Fault classes that need real processes (a killed pytest, a
full disk) are proven by the tests named in their rows, which `make test` runs.
"""

from __future__ import annotations

import json
import random
import string
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEED = 20261203
PER_CLASS = 120
# Any one input taking longer than this counts as a hang.  The plugin's own bounds per input are
# seconds (a suite regex gets 5 s in a forked child, a template render 2 s); a hang is unbounded.
# 10 s was once exceeded (13.9 s) by a bounded suite input on a 2-core machine running three test
# runs at once, so the line sits well above what load alone causes.
SLOW_S = 60.0

DEEP_JSON = "[" * 100_000 + "]" * 100_000
HUGE_INT = "9" * 5_000


def _json_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, 2**64, -(2**70), 10**300])
    if kind == 3:
        return rng.choice([0.0, -1.5, 1e308, 1e-300])
    if kind == 4:
        return "".join(rng.choice(string.printable + "功能<|>") for _ in range(rng.randrange(12)))
    if kind in (5, 6):
        return [_json_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["eos_token_id", "vocab_size", "hidden_size", "num_attention_heads", "rope_parameters", "rope_theta",
            "weight_map", "chat_template", "added_tokens", "model", "vocab", "text_config", "dtype", "head_dim",
            "tie_word_embeddings", "pad_token", "eos_token", "data_offsets", "shape", "dtype", "x"]
    return {rng.choice(keys): _json_value(rng, depth + 1) for _ in range(rng.randrange(5))}


def _hostile_json(rng: random.Random, count: int) -> Iterator[str]:
    yield DEEP_JSON
    yield f'{{"vocab_size": {HUGE_INT}, "eos_token_id": [{HUGE_INT}]}}'
    yield '{"eos_token_id": [-1, 2], "weight_map": {}}'
    for _ in range(count - 3):
        yield json.dumps(_json_value(rng))


@dataclass
class Row:
    name: str
    tried: int = 0
    ended_well: int = 0
    slowest_s: float = 0.0
    first_problem: str = ""

    def run(self, attempt: Callable[[], None]) -> None:
        self.tried += 1
        started = time.monotonic()
        try:
            attempt()
            ok = True
        except Exception as exc:  # the property under test: nothing escapes but the expected errors
            ok = False
            self.first_problem = self.first_problem or f"{type(exc).__name__}: {str(exc)[:80]}"
        seconds = time.monotonic() - started
        self.slowest_s = max(self.slowest_s, seconds)
        if ok and seconds <= SLOW_S:
            self.ended_well += 1
        elif ok:
            self.first_problem = self.first_problem or f"took {seconds:.1f} s"


def safetensors_headers(rng: random.Random, row: Row) -> None:
    from pytest_llmmerge.safetensors_header import HeaderError, read_safetensors_header

    def attempt(raw: bytes) -> Callable[[], None]:
        def run() -> None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "x.safetensors"
                path.write_bytes(raw)
                try:
                    header = read_safetensors_header(path)
                    header.layout_problem()
                    header.overruns()
                except HeaderError:
                    pass
        return run

    for text in _hostile_json(rng, PER_CLASS // 2):
        encoded = text.encode()
        row.run(attempt(struct.pack("<Q", len(encoded)) + encoded + bytes(rng.randrange(64))))
    for _ in range(PER_CLASS // 2):
        row.run(attempt(bytes(rng.randrange(256) for _ in range(rng.randrange(200)))))


def checkpoint_files(rng: random.Random, row: Row) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    from pytest_llmmerge.checkpoint import Checkpoint
    from pytest_llmmerge.checks import checks_of
    from pytest_llmmerge.checks.base import Context, run_check
    from pytest_llmmerge.checks.codes import CODES

    names = ["config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
             "model.safetensors.index.json"]

    def attempt(text: str, name: str) -> Callable[[], None]:
        def run() -> None:
            with tempfile.TemporaryDirectory() as tmp:
                model, base = Path(tmp) / "model", Path(tmp) / "base"
                for directory in (model, base):
                    directory.mkdir()
                    save_file({"model.embed_tokens.weight": np.ones((4, 2), dtype=np.float32)},
                              str(directory / "model.safetensors"))
                (model / name).write_text(text, encoding="utf-8")
                ctx = Context(Checkpoint(model), Checkpoint(base))
                for check in checks_of("integrity"):
                    for finding in run_check(check, ctx).findings:
                        assert finding.code in CODES
        return run

    for text in _hostile_json(rng, PER_CLASS):
        row.run(attempt(text, rng.choice(names)))


def chat_templates(rng: random.Random, row: Row) -> None:
    from pytest_llmmerge import chat_template

    pieces = ["{% for m in messages %}", "{% endfor %}", "{{ m.content }}", "{% if add_generation_prompt %}",
              "{% endif %}", "<|im_end|>", "{{ eos_token }}", "{% for i in range(100000) %}", "{{ 'x' * 99999 }}",
              "{{ 2 ** 99999 }}", "{{ raise_exception('no') }}", "{{", "}}", "{% macro f(n) %}{{ f(n) }}{% endmacro %}"
              "{{ f(1) }}", "{{ x|tojson }}", "text", "{{ '{:999999999}'.format(1) }}", "{{ 'x' | center(999999999) }}",
              "{{ '%.999999999f' % 1.0 }}", "{{ '{:{}}'.format(1, '999999999') }}"]

    def attempt(template: str) -> Callable[[], None]:
        def run() -> None:
            chat_template.render_samples(template, {"eos_token": "<|im_end|>"})
            chat_template.end_of_turn_token(template, {}, ["<|im_end|>"])
        return run

    row.run(attempt("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"))
    for _ in range(PER_CLASS // 4 - 1):  # a hostile template may spend its whole budget
        row.run(attempt("".join(rng.choice(pieces) for _ in range(rng.randrange(1, 8)))))


def suites(rng: random.Random, row: Row) -> None:
    from pytest_llmmerge.suite import SuiteError, parse_suite

    bomb = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)) + "cases: [*i]\n"
    fixed = [bomb, "cases: &x [*x]\n", "cases: " + "[" * 30_000,
             "cases:\n  - id: a\n    prompt: hi\n    timeout_s: .nan\n",
             "cases:\n  - id: a\n    prompt: hi\n    max_new_tokens: .inf\n"]

    def attempt(text: str) -> Callable[[], None]:
        def run() -> None:
            try:
                parse_suite(text, Path("fuzz.yaml"))
            except SuiteError as exc:
                assert str(exc).startswith("fuzz.yaml: ")
        return run

    for text in fixed:
        row.run(attempt(text))
    for _ in range(PER_CLASS - len(fixed)):
        value = {"cases": [_json_value(rng) for _ in range(rng.randrange(3))], **({"defaults": _json_value(rng)}
                                                                                   if rng.random() < 0.3 else {})}
        row.run(attempt(json.dumps(value) if rng.random() < 0.5 else
                        "".join(rng.choice(string.printable) for _ in range(rng.randrange(120)))))


def option_values(rng: random.Random, row: Row) -> None:
    from pytest_llmmerge.option_specs import OPTIONS
    from pytest_llmmerge.settings import SettingsError, resolve_settings

    bad = ["nan", "inf", "-inf", "-1", "0", "", "1e999", "1e46", str(10**400), "abc", HUGE_INT]
    numeric = [s for s in OPTIONS if s.kind in ("int", "float")]

    def attempt(spec: Any, raw: str, source: str) -> Callable[[], None]:
        def run() -> None:
            cli = {spec.dest: raw} if source == "cli" else {}
            env = {spec.env: raw} if source == "env" else {}
            try:
                resolve_settings(cli=cli, env=env, ini=lambda key: None, invocation_dir=Path.cwd(),
                                 ini_dir=Path.cwd())
            except SettingsError as exc:
                assert (spec.flag if source == "cli" else spec.env) in str(exc)
        return run

    for _ in range(PER_CLASS):
        row.run(attempt(rng.choice(numeric), rng.choice(bad), rng.choice(["cli", "env"])))


CLASSES: tuple[tuple[str, Callable[[random.Random, Row], None]], ...] = (
    ("safetensors headers: random bytes, deep nesting, huge integers, bad offsets", safetensors_headers),
    ("checkpoint JSON (config, generation config, tokenizer, index) through every integrity check",
     checkpoint_files),
    ("chat templates: unbounded loops, huge values and format widths, endless recursion, broken syntax", chat_templates),
    ("suites: alias bombs, recursive aliases, nan/inf, deep nesting, random YAML", suites),
    ("option values: nan, inf, negative, zero, huge, not numbers (flag and environment)", option_values),
)
# Faults on real processes, each proven by the named test in `make test`.
FAULTS: tuple[tuple[str, str], ...] = (
    ("pytest killed (SIGKILL, SIGTERM) mid-generation: no worker left within 10 s; after SIGTERM no temp dir",
     "test_faults.py::test_stopping_pytest_mid_generation_leaves_no_worker"),
    ("the parent killed (SIGKILL) mid-merge: no merge process left within 10 s",
     "test_faults.py::test_killing_the_parent_mid_merge_kills_the_merge"),
    ("an adapter that does not fit the base: one failure, no retry, no traceback",
     "test_faults.py::test_a_merge_that_fails_is_reported_once_and_not_retried"),
    ("the same with --llm-build-merged: every item names the one cause",
     "test_faults.py::test_build_merged_builds_once_or_fails_once"),
    ("a merge past --llm-merge-timeout: killed, no cache entry, no temp dir",
     "test_faults.py::test_a_merge_past_its_deadline_is_killed_and_leaves_nothing"),
    ("the disk fills during a merge: one failure, no partial cache entry",
     "test_faults.py::test_a_disk_that_fills_during_a_merge_leaves_no_partial_cache_entry"),
    ("a report that cannot be written: verdict and summary kept, the job fails",
     "test_report.py::test_a_report_that_cannot_be_written_keeps_the_verdict_and_the_summary"),
    ("a build lock held too long: LockTimeout naming the holder",
     "test_atomic.py::test_a_lock_held_too_long_is_a_clear_timeout_naming_the_holder"),
    ("a run ends: no temp dir and (whole suite) no process left running",
     "test_faults.py::test_a_run_leaves_no_temporary_directory, tests/conftest.py"),
)


def measure() -> list[Row]:
    rows = []
    for name, generate in CLASSES:
        row = Row(name)
        generate(random.Random(f"{SEED}-{name}"), row)
        rows.append(row)
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| input class | tried | ended as a result, finding or usage error |", "|---|---|---|"]
    lines += [f"| {r.name} | {r.tried} | {r.ended_well} |" for r in rows]
    lines += ["", "| fault | proven by |", "|---|---|"]
    lines += [f"| {fault} | `tests/{test}` |" for fault, test in FAULTS]
    return "\n".join(lines)


if __name__ == "__main__":
    measured = measure()
    print(table(measured))
    problems = [f"{r.name}: {r.first_problem}" for r in measured if r.ended_well != r.tried]
    if problems:
        print("\n".join(problems), file=sys.stderr)
        sys.exit(1)
