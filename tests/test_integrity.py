"""Every integrity check proven both ways on the real fixture checkpoints."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from breakage import BREAKAGES, HEALTHY_VARIATIONS, rotary_buffers_saved, tied_lm_head_saved
from conftest import BASE, MERGED, TIED
from pytest_llmmerge.checkpoint import Checkpoint
from pytest_llmmerge.checks import ALL_CHECKS, checks_of, run_all
from pytest_llmmerge.checks.base import CheckOutcome, Context, run_check
from pytest_llmmerge.checks.codes import CODES


def scan(model: Path, base: Path | None = BASE, **flags: bool) -> list[CheckOutcome]:
    """The header checks and the tensor-data checks, as a run without --llm-audit-merge has them."""
    ctx = Context(Checkpoint(model), Checkpoint(base) if base else None, **flags)
    return run_all(ctx, ("integrity", "weights"))


def error_codes(outcomes: list[CheckOutcome]) -> set[str]:
    return {f.code for o in outcomes for f in o.errors}


def test_healthy_merged_model_passes_every_check() -> None:
    outcomes = scan(MERGED)
    assert error_codes(outcomes) == set()
    assert [o.check.name for o in outcomes if o.skipped] == []
    assert [f.render() for o in outcomes for f in o.warnings] == []


def test_healthy_base_passes_against_itself() -> None:
    assert error_codes(scan(BASE)) == set()


def test_without_base_the_base_checks_are_skipped_not_passed() -> None:
    outcomes = scan(MERGED, base=None)
    skipped = {o.check.name for o in outcomes if o.skipped}
    assert skipped == {c.name for c in (*checks_of("integrity"), *checks_of("weights")) if c.needs_base}
    assert all("--llm-base" in (o.skipped or "") for o in outcomes if o.check.needs_base)


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_each_breakage_fails_exactly_its_codes(name: str, broken: Callable[[str], Path]) -> None:
    model = broken(name)
    _, with_base, _ = BREAKAGES[name]
    outcomes = scan(model)
    assert error_codes(outcomes) == with_base
    for outcome in outcomes:
        for finding in outcome.errors:
            # The finding names a file a user can open, and says what is wrong in words.
            assert finding.file and finding.file in finding.render()
            # ... or a missing file whose absence is the problem, and the fix says to write it.
            assert (model / finding.file).exists() or finding.code in {"WGT002", "GEN001", "CFG001", "TOK004",
                                                                       "WGT001", "TOK001"} \
                or f"write a {finding.file}" in finding.message, finding
            assert len(finding.message) > 20


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_each_breakage_without_base(name: str, broken: Callable[[str], Path]) -> None:
    _, _, without_base = BREAKAGES[name]
    assert error_codes(scan(broken(name), base=None)) == without_base


def test_generation_findings_name_ids_with_their_tokens(broken: Callable[[str], Path]) -> None:
    messages = [f.message for o in scan(broken("end_of_turn_dropped_from_eos")) for f in o.errors]
    assert any("<|im_end|>" in m and "lacks the base's" in m for m in messages)
    assert any("ends assistant turns with" in m and "Fix:" in m for m in messages)


def test_truncation_message_gives_the_missing_bytes(broken: Callable[[str], Path]) -> None:
    (finding,) = [f for o in scan(broken("shard_truncated")) for f in o.errors]
    assert "1024 bytes missing" in finding.message
    assert finding.file.endswith(".safetensors")


def test_allow_flags_turn_safety_errors_into_warnings(broken: Callable[[str], Path]) -> None:
    pickled = scan(broken("pickle_only"), allow_pickle=True)
    assert error_codes(pickled) == set()
    assert {f.code for o in pickled for f in o.warnings} == {"SAF001"}
    custom = scan(broken("auto_map_added"), trust_remote_code=True)
    assert error_codes(custom) == set()
    assert {f.code for o in custom for f in o.warnings} == {"SAF002"}


def test_orphan_shard_is_a_warning(broken: Callable[[str], Path]) -> None:
    outcomes = scan(broken("orphan_shard"))
    assert {f.code for o in outcomes for f in o.warnings} == {"WGT003"}


def test_inherited_eos_gap_is_only_a_warning(tmp_path: Path, broken: Callable[[str], Path]) -> None:
    """A base with the same gap as the model: the merge did not cause it, so it warns."""
    model = broken("tokenizer_eos_dropped_from_eos")
    import shutil
    from breakage import tokenizer_eos_dropped_from_eos
    base = tmp_path / "base-with-gap"
    shutil.copytree(BASE, base)
    tokenizer_eos_dropped_from_eos(base)
    outcomes = scan(model, base=base)
    assert error_codes(outcomes) == set()
    assert "GEN004" in {f.code for o in outcomes for f in o.warnings}


def test_every_code_belongs_to_exactly_one_check() -> None:
    owned = [code for check in ALL_CHECKS for code in check.codes]
    assert sorted(owned) == sorted(CODES)


def test_scan_reads_no_tensor_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan reads headers only: the bytes read stay far below the weights' size."""
    import builtins
    read = 0
    real_open = builtins.open

    class Counting:
        def __init__(self, fh): self.fh = fh
        def read(self, n: int = -1):
            nonlocal read
            data = self.fh.read(n)
            read += len(data)
            return data
        def __getattr__(self, name): return getattr(self.fh, name)
        def __enter__(self): return self
        def __exit__(self, *exc): return self.fh.__exit__(*exc)

    def counting_open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        fh = real_open(file, mode, *args, **kwargs)
        return Counting(fh) if "b" in mode and str(file).endswith(".safetensors") else fh
    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(Path, "open", lambda self, mode="r", *a, **k: counting_open(self, mode, *a, **k))
    assert error_codes(scan(MERGED)) == set()
    weights = sum(p.stat().st_size for p in MERGED.glob("*.safetensors"))
    assert 0 < read < weights / 20


def _v4(config: dict[str, Any]) -> dict[str, Any]:
    """The transformers 4.x layout of a 5.x config: top-level rope, torch_dtype, no head_dim."""
    old = {k: v for k, v in config.items() if k not in ("rope_parameters", "dtype", "head_dim")}
    rope = dict(config.get("rope_parameters") or {})
    old["rope_theta"] = rope.pop("rope_theta", 10000.0)
    if rope.get("rope_type", "default") != "default":
        old["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}  # the older spelling of rope_type
    old["torch_dtype"], old["transformers_version"] = config.get("dtype"), "4.46.0"
    return old


LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("base_edit,model_edit,errors,warnings", [
    # Healthy: the same model written by transformers 4.x (base) and 5.x (merge).
    (_v4, None, set(), set()),
    (lambda c: _v4({**c, "rope_parameters": LLAMA3}), lambda c: {**c, "rope_parameters": LLAMA3}, set(), set()),
    # Gemma 3: 4.x wrote the sliding layers' theta as rope_local_base_freq, 5.x per layer type.
    (lambda c: {**_v4(c), "rope_theta": 1e6, "rope_local_base_freq": 1e4},
     lambda c: {**c, "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     set(), set()),
    # A parameter only one side states, or a head_dim one side derives: shown, not failed.
    (None, lambda c: {**c, "rope_parameters": {**c["rope_parameters"], "partial_rotary_factor": 1.0}}, set(),
     {"CFG008"}),
    (lambda c: {k: v for k, v in c.items() if k != "head_dim"}, lambda c: {**c, "head_dim": 64}, set(), {"CFG008"}),
    (None, lambda c: {**c, "max_position_embeddings": 4096}, set(), {"CFG008"}),
    # Broken: what the forward pass computes changed.
    (lambda c: _v4({**c, "rope_parameters": LLAMA3}), lambda c: {**c, "rope_parameters": {**LLAMA3, "factor": 2.0}},
     {"CFG007"}, None),
    (None, lambda c: {**c, "hidden_act": "gelu"}, {"CFG007"}, None),
    (None, lambda c: {**c, "rms_norm_eps": 0.1}, {"CFG007"}, None),
    (lambda c: {**c, "sliding_window": 256}, lambda c: {**c, "sliding_window": 16}, {"CFG007"}, None),
    (_v4, lambda c: {**c, "rope_parameters": {**c["rope_parameters"], "rope_theta": 500000.0}}, {"CFG007"}, None),
    (None, lambda c: {**c, "num_key_value_heads": 2}, {"CFG007"}, None),
])
def test_config_values_are_compared_as_transformers_resolves_them(
        tmp_path: Path, base_edit: Callable[[dict[str, Any]], dict[str, Any]] | None,
        model_edit: Callable[[dict[str, Any]], dict[str, Any]] | None,
        errors: set[str], warnings: set[str] | None) -> None:
    base, model = (Path(shutil.copytree(source, tmp_path / name)) for source, name in ((BASE, "b"), (MERGED, "m")))
    for directory, edit in ((base, base_edit), (model, model_edit)):
        if edit is not None:
            config = json.loads((directory / "config.json").read_text())
            (directory / "config.json").write_text(json.dumps(edit(config)))
    outcome = run_check(next(c for c in checks_of("integrity") if c.name == "config_vs_base"), Context(Checkpoint(model),
                                                                                     Checkpoint(base)))
    assert {f.code for f in outcome.errors} == errors, outcome.findings
    if warnings is not None:
        assert {f.code for f in outcome.warnings} == warnings, outcome.findings


@pytest.mark.parametrize("name", sorted(HEALTHY_VARIATIONS))
def test_changes_loaders_do_not_see_fail_nothing(name: str, tmp_path: Path) -> None:
    change, warnings = HEALTHY_VARIATIONS[name]
    model = Path(shutil.copytree(MERGED, tmp_path / name))
    change(model)
    outcomes = scan(model)
    assert error_codes(outcomes) == set(), [f.render() for o in outcomes for f in o.errors]
    assert {f.code for o in outcomes for f in o.warnings} == warnings


def test_a_tied_model_saved_with_its_lm_head_passes(tmp_path: Path) -> None:
    model = Path(shutil.copytree(TIED, tmp_path / "tied"))
    tied_lm_head_saved(model)
    outcomes = scan(model, base=TIED)
    assert error_codes(outcomes) == set(), [f.render() for o in outcomes for f in o.errors]


def test_a_base_with_rotary_buffers_compares_equal(tmp_path: Path) -> None:
    base = Path(shutil.copytree(BASE, tmp_path / "base"))
    rotary_buffers_saved(base)
    assert error_codes(scan(MERGED, base=base)) == set()
