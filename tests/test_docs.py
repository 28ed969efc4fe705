"""The README's tables are generated from the code; this keeps them equal."""

from __future__ import annotations

from pathlib import Path

from conftest import REPO

from pytest_llmmerge.docs import codes_table, options_table
from pytest_llmmerge.option_specs import OPTIONS


def test_readme_lists_every_option() -> None:
    assert options_table() in (REPO / "README.md").read_text(encoding="utf-8")


def test_readme_holds_no_merge_conflict_markers() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert not [line for line in readme.splitlines() if line.startswith(("<<<<<<< ", ">>>>>>> ", "======="))]


def test_readme_lists_every_integrity_code() -> None:
    assert codes_table() in (REPO / "README.md").read_text(encoding="utf-8")


def test_readme_options_table_equals_help(tmp_path: Path) -> None:
    """The flags `pytest --help` lists in the plugin's group are exactly the README table's."""
    import re
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pytest", "--help"], capture_output=True, text=True,
                         check=True, cwd=tmp_path).stdout
    group = out[out.index("LLM merge gating (pytest-llmmerge)"):]
    group = group[:group.index("\n\n")]
    in_help = set(re.findall(r"^  (--llm-[a-z0-9-]+)", group, flags=re.M))
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    in_readme = set(re.findall(r"^\| `(--llm-[a-z0-9-]+)", readme, flags=re.M))
    assert in_help == in_readme and len(in_help) == len(OPTIONS)


def test_github_actions_example_uses_real_options_and_gates_release() -> None:
    import yaml

    workflow = yaml.safe_load((REPO / "examples" / "github-actions.yml").read_text(encoding="utf-8"))
    gate = workflow["jobs"]["gate"]
    command = next(step["run"] for step in gate["steps"] if step.get("name") == "Gate")
    flags = {word.split("=")[0] for word in command.split() if word.startswith("--llm-")}
    assert flags <= {spec.flag for spec in OPTIONS}
    assert {"--llm-report", "--llm-report-md", "--llm-model"} <= flags
    upload = next(step for step in gate["steps"] if step.get("name") == "Upload the report")
    assert upload["if"] == "always()" and "llmmerge-report.json" in upload["with"]["path"]
    assert workflow["jobs"]["release"]["needs"] == "gate"


def test_readme_layout_names_every_module_and_no_module_that_is_gone() -> None:
    """"How the code is laid out" keeps up with the package: every module has its row."""
    import re

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## How the code is laid out"):readme.index("## Development")]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    named = {name for row in rows for name in re.findall(r"`([^`]+)`", row)}
    package = REPO / "pytest_llmmerge"
    modules = {str(p.relative_to(package)) for p in package.rglob("*.py") if p.name != "__init__.py"}
    modules |= {f"{p.parent.relative_to(package)}/__init__.py" for p in package.rglob("__init__.py")
                if p.parent != package}
    covered = {m for m in modules if m in named or f"{m.split('/')[0]}/" in named}
    assert covered == modules, sorted(modules - covered)
    gone = {n for n in named if n.endswith(".py") and n not in modules}
    assert not gone, sorted(gone)
