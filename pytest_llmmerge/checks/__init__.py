"""The checks of a checkpoint, and the one registry of them.

Each check becomes the pytest item `<group>::<name>`:

- ``integrity``: the files and safetensors headers (:mod:`.files`, :mod:`.shards`); no tensor
  data is read, so these run on any checkpoint in seconds;
- ``weights``: the tensor data, in one streaming scan (:mod:`.tensors`);
- ``audit``: the merge diagnosis against the adapters (:mod:`.audit`), whenever a base and
  the adapters are given.

The plugin's items, the README's tables (:mod:`pytest_llmmerge.docs`) and scripts all read
:data:`GROUPS`; nothing here imports pytest.
"""

from __future__ import annotations

from collections.abc import Iterable

from . import audit, files, shards, stops, tensors
from .base import Check, CheckOutcome, Context, run_check

# Items are collected in this order, group by group.
ALL_CHECKS: tuple[Check, ...] = (
    Check("config", ("CFG001", "CFG004", "CFG005"), False, files.check_config),
    Check("config_vs_base", ("CFG002", "CFG003", "CFG006", "CFG007", "CFG008"), True, files.check_config_vs_base),
    Check("generation_config", ("GEN001", "GEN002", "GEN004", "GEN005", "GEN007"), False,
          files.check_generation_config),
    Check("generation_config_vs_base", ("GEN003", "GEN006"), True, files.check_generation_config_vs_base),
    Check("stop_sets", ("GEN008",), False, stops.check_stop_sets, figures=stops.stop_set_figures),
    Check("tokenizer", ("TOK001",), False, files.check_tokenizer),
    Check("tokenizer_vs_base", ("TOK002", "TOK003", "TOK007", "TOK008"), True, files.check_tokenizer_vs_base),
    Check("chat_template_vs_base", ("TOK004", "TOK005", "TOK006"), True, files.check_chat_template_vs_base),
    Check("weight_files", ("WGT001", "WGT002", "WGT003", "WGT004", "WGT005", "WGT006", "WGT011", "WGT019",
                           "WGT020", "WGT022", "WGT023"), False, shards.check_weight_files),
    Check("weights_vs_base", ("WGT007", "WGT008", "WGT009", "WGT021"), True, shards.check_weights_vs_base),
    Check("lora_leftovers", ("WGT010", "WGT012"), False, shards.check_lora_leftovers),
    Check("safety", ("SAF001", "SAF002"), False, files.check_safety),
    Check("finite", ("WGT013",), False, tensors.check_finite, "weights"),
    Check("constant_tensors", ("WGT014",), False, tensors.check_degenerate, "weights"),
    Check("tied_embeddings", ("WGT015", "WGT016"), False, tensors.check_tied_embeddings, "weights"),
    Check("change_vs_base", ("WGT017", "WGT018"), True, tensors.check_weight_change, "weights",
          figures=tensors.change_figures),
    Check("merge_diagnosis", ("MRG001", "MRG002", "MRG003", "MRG004", "MRG005", "MRG006", "MRG007", "MRG008",
                              "MRG009", "MRG010", "MRG011", "MRG012"), True, audit.check_merge_diagnosis, "audit",
          figures=audit.diagnosis_figures, summary=audit.diagnosis_summary),
)
# group -> its checks, in order: {"integrity": (...), "weights": (...), "audit": (...)}.
GROUPS: dict[str, tuple[Check, ...]] = {
    group: tuple(c for c in ALL_CHECKS if c.group == group) for group in dict.fromkeys(c.group for c in ALL_CHECKS)
}


def checks_of(group: str) -> tuple[Check, ...]:
    """The checks of one group; KeyError names a group that does not exist."""
    return GROUPS[group]


def run_all(ctx: Context, groups: Iterable[str] = ("integrity",)) -> list[CheckOutcome]:
    """Every check of `groups` on one checkpoint; what a script or notebook calls.  The default,
    the integrity group, reads headers only; add "weights" to read the tensor data."""
    return [run_check(check, ctx) for group in groups for check in checks_of(group)]
