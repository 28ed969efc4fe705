"""The README's tables are generated from the code; this keeps them equal."""

from __future__ import annotations

from conftest import REPO
from pytest_llmmerge.docs import codes_table, options_table


def test_readme_lists_every_option() -> None:
    assert options_table() in (REPO / "README.md").read_text(encoding="utf-8")


def test_readme_lists_every_integrity_code() -> None:
    assert codes_table() in (REPO / "README.md").read_text(encoding="utf-8")
