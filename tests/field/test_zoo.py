"""The field zoo: healthy is what real pipelines write.

The gate's other tests break checkpoints the project wrote itself, so they prove the gate
fails broken models; they cannot prove it passes the healthy models people actually ship.
Those are written by transformers and peft `save_pretrained` in bf16, re-saved tokenizers and
all, against bases written in older layouts (see zoo.py for each member and how it was made).
A release gate that cries wolf on them gets switched off, so every integrity and weights item
must pass on every member, run the way a user runs it: a fresh pytest process in an empty
directory, with the paths on the command line, once as given and once under `-W error`
(projects that turn warnings into errors must not see a warning-level finding fail an item).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

import zoo

SELECT = "llmmerge_integrity or llmmerge_weights"
RUN_TIMEOUT_S = 300
FINDING_CODE = re.compile(r"[A-Z]{3}[0-9]{3}")


@dataclass(frozen=True)
class ItemResult:
    item: str  # "integrity::config_vs_base"
    outcome: str  # passed, failed, error or skipped
    message: str
    findings: tuple[str, ...]  # the rendered findings the item recorded, warnings included

    def describe(self) -> str:
        lines = [f"{self.item}: {self.outcome}" + (f": {self.message}" if self.message else "")]
        lines += [f"    {finding}" for finding in self.findings]
        return "\n".join(lines)


@pytest.fixture(scope="session")
def field_zoo(tmp_path_factory: pytest.TempPathFactory) -> zoo.Zoo:
    # Built per session with the installed transformers and peft: the zoo is about what the
    # libraries write now, so a cache across library upgrades would test yesterday's files.
    return zoo.Zoo(tmp_path_factory.mktemp("zoo"))


def expected_items() -> list[str]:
    """Every integrity and weights item the installed plugin defines: a run that collects
    fewer (or none) must not pass."""
    from pytest_llmmerge.checks import checks_of

    return [f"{check.group}::{check.name}" for check in (*checks_of("integrity"), *checks_of("weights"))]


def user_environment() -> dict[str, str]:
    """The environment of a user's shell: none of this session's pytest or plugin settings
    (PYTEST_ADDOPTS, xdist's worker variables, LLMMERGE_*) leak into the run, and the hub
    stays offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "LLMMERGE_"))}
    env["HF_HUB_OFFLINE"] = "1"
    return env


Run = subprocess.CompletedProcess[str]


def run_plugin(member: zoo.Member, tmp_path: Path, warnings_as_errors: bool) -> tuple[Run, list[ItemResult]]:
    workdir = tmp_path / "run"  # empty: no conftest, no ini file, as in a fresh checkout
    workdir.mkdir()
    junit = tmp_path / "junit.xml"
    # --rootdir: pytest looks for an ini file above every path on the command line before it
    # settles on one, so without it the adapter under fixtures/ would pull in this repository's
    # pyproject.toml (and its filterwarnings = error) and the default run would not be a default.
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--rootdir={workdir}",
               *(["-W", "error"] if warnings_as_errors else []), "-q", "-rA", f"--junitxml={junit}",
               "--llm-model", str(member.model), "--llm-base", str(member.base)]
    for adapter in member.adapters:
        command += ["--llm-adapter", str(adapter)]
    command += ["-m", SELECT]
    proc = subprocess.run(command, cwd=workdir, env=user_environment(), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, check=False)
    return proc, parse_junit(junit) if junit.is_file() else []


def parse_junit(path: Path) -> list[ItemResult]:
    results = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "failed" if tag == "failure" else tag
                message = node.get("message", "") or (node.text or "").strip()[-500:]
                break
        # Findings are recorded under their code; other properties are figures (weight change).
        findings = tuple(prop.get("value", "") for prop in case.iter("property")
                         if FINDING_CODE.fullmatch(prop.get("name", "")))
        results.append(ItemResult(f"{case.get('classname')}::{case.get('name')}", outcome, message, findings))
    return results


def explain(member: zoo.Member, proc: Run, results: list[ItemResult], missing: list[str]) -> str:
    lines = [f"zoo member {member.name!r} ({zoo.MEMBERS[member.name]}) is healthy but the gate said otherwise:",
             f"  exit code {proc.returncode}; model {member.model}; base {member.base}"]
    lines += [f"  did not run: {item}" for item in missing]
    lines += ["  " + r.describe() for r in results if r.outcome != "passed"]
    noted = [r for r in results if r.outcome == "passed" and r.findings]
    if noted:
        lines.append("  passed with findings:")
        lines += ["  " + r.describe() for r in noted]
    if not results or all(r.outcome == "passed" for r in results):  # nothing to itemise: show what pytest said
        lines += ["  stdout tail:", proc.stdout[-3000:], "  stderr tail:", proc.stderr[-3000:]]
    return "\n".join(lines)


@pytest.mark.parametrize("warnings_as_errors", [False, True], ids=["default", "W-error"])
@pytest.mark.parametrize("name", list(zoo.MEMBERS))
def test_healthy_checkpoint_passes_the_gate(name: str, warnings_as_errors: bool, field_zoo: zoo.Zoo,
                                            tmp_path: Path) -> None:
    member = field_zoo.member(name)
    proc, results = run_plugin(member, tmp_path, warnings_as_errors)
    ran = {r.item for r in results}
    missing = [item for item in expected_items() if item not in ran]
    # A skip is not a pass: with the base given, every check can run on a healthy checkpoint,
    # and a check that quietly stops running hides exactly the false alarms the zoo is for.
    assert proc.returncode == 0 and not missing and all(r.outcome == "passed" for r in results), \
        explain(member, proc, results, missing)
