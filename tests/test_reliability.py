"""The README's reliability table is what tests/reliability_table.py measures now, and every
hostile input in it ends as a result, a finding or a usage error."""

from __future__ import annotations

import reliability_table
from conftest import REPO


def test_every_hostile_input_ends_well_and_the_readme_shows_the_table() -> None:
    rows = reliability_table.measure()
    assert [(r.name, r.first_problem) for r in rows if r.ended_well != r.tried] == []
    assert all(r.tried >= 30 for r in rows)
    assert reliability_table.table(rows) in (REPO / "README.md").read_text(encoding="utf-8")


def test_every_fault_row_names_a_test_that_exists() -> None:
    for _, proof in reliability_table.FAULTS:
        for ref in proof.split(", "):
            path, _, name = ref.partition("::")
            text = (REPO / "tests" / path.removeprefix("tests/")).read_text(encoding="utf-8")
            assert not name or f"def {name}(" in text, ref
