"""What every check is made of: the context it reads, the findings it returns, and the running
of one check into an outcome.

A check returns findings with stable codes (:data:`~pytest_llmmerge.checks.codes.CODES`).  A
check that cannot run (it needs a base that was not given, or the file it reads is already
reported broken by another check) raises :class:`CheckSkipped`, so that one broken file gives
exactly one failing check and a skipped check is never mistaken for a passed one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..checkpoint import Checkpoint
from ..file_names import WEIGHTS_FILE
from ..stop_sets import VllmStopFlags
from .codes import CODES

Severity = Literal["error", "warning"]


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
    # The flags that decide vLLM's stop ids: --llm-vllm-arg's (offline) and --llm-serve-arg's (served).
    offline_stop_flags: VllmStopFlags = field(default_factory=VllmStopFlags)
    served_stop_flags: VllmStopFlags = field(default_factory=VllmStopFlags)
    progress: Callable[[str], None] | None = None
    memo: dict[str, Any] = field(default_factory=dict, compare=False)  # results shared by the checks

    def require_base(self) -> Checkpoint:
        if self.base is None:
            raise CheckSkipped("needs --llm-base to compare with")
        return self.base

    def comparable_pair(self, unusable: Callable[[Checkpoint], object], *, model_skip: str,
                        base_skip: str) -> tuple[Checkpoint, Checkpoint]:
        """The model and the base, or the check skipped when either cannot be compared (the
        check of the model's own files reports why)."""
        base = self.require_base()
        if unusable(self.model):
            raise CheckSkipped(model_skip)
        if unusable(base):
            raise CheckSkipped(base_skip)
        return self.model, base


@dataclass(frozen=True)
class Check:
    name: str
    codes: tuple[str, ...]
    needs_base: bool
    run: Callable[[Context], list[Finding]]
    group: str = "integrity"  # the item is `<group>::<name>`
    # Tables the check computed, as (name, value) for the report and JUnit XML, read from the
    # Context after the check ran; only the check knows where it keeps them.
    figures: Callable[[Context], list[tuple[str, Any]]] | None = None
    # The check's verdict in one sentence, printed under its failure (None: its findings say all).
    summary: Callable[[Context], str | None] | None = None

    @property
    def description(self) -> str:
        return "; ".join(f"{c} {CODES[c][0]}" for c in self.codes)


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


def shard_of(ckpt: Checkpoint, tensor: str) -> str:
    """The weight file the loader reads a tensor from, for Finding.file."""
    where = ckpt.tensor_locations().get(tensor)
    if where is not None:
        return where[0]
    return (ckpt.loaded_weight_files() or [WEIGHTS_FILE])[0]
