"""Markdown tables for the README, generated from the code so the docs cannot drift.

`python -m pytest_llmmerge.docs` prints them; a test checks the README holds them verbatim.
"""

from __future__ import annotations

from .checks import ALL_CHECKS
from .checks.codes import CODES
from .option_specs import OPTIONS


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a bare | would split the Markdown table cell


def codes_table() -> str:
    owner = {code: f"{check.group}::{check.name}" for check in ALL_CHECKS for code in check.codes}
    rows = ["| code | severity | item | what it flags | field failure it catches |", "|---|---|---|---|---|"]
    for code, (what, story) in CODES.items():
        severity = "warning" if what.startswith("warning: ") else "error"
        rows.append(f"| {code} | {severity} | `{owner[code]}` | {_cell(what.removeprefix('warning: '))} | "
                    f"{_cell(story)} |")
    return "\n".join(rows)


def options_table() -> str:
    rows = ["| flag | ini | environment | meaning |", "|---|---|---|---|"]
    rows += [f"| `{s.flag}{' ' + s.metavar if s.metavar else ''}` | `{s.ini}` | `{s.env}` | {_cell(s.help)} |"
             for s in OPTIONS]
    return "\n".join(rows)


if __name__ == "__main__":
    print(options_table(), codes_table(), sep="\n\n")
