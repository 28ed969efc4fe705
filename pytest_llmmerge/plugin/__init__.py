"""pytest wiring of pytest-llmmerge: each hook and fixture is one call on the run object.

The run (plugin/run.py) holds the session's state and schedule; the items are in
check_items, case_items and compare_items, the report hooks in reporting.  All decisions
live in the core modules.  torch, transformers, peft, vLLM and numpy are not imported here, so
`pytest --help` stays torch-free; models load in worker processes when the first item needs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .options import add_options
from .run import LlmMergeRun


def pytest_addoption(parser: pytest.Parser) -> None:
    """One "llmmerge" group; every flag has an ini twin and an environment variable."""
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    """Markers, then the run: settings resolved once (CLI > env > ini), a bad value a usage error."""
    LlmMergeRun.start(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Close every worker and remove the run's temporary directories."""
    LlmMergeRun.of(config).close()


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    """YAML suites: named on the command line, inside a directory named there, or matching a glob."""
    return LlmMergeRun.of(parent.config).collect_file(file_path, parent)


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    """Model paths, backends, device, dtype and the versions that decide the results."""
    return LlmMergeRun.of(config).report_header()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """Add the checkpoint's items and order them so each worker loads its model once."""
    LlmMergeRun.of(config).add_items(session, items)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A check item's findings travel on its report to the reports (across xdist too)."""
    report = yield
    LlmMergeRun.carry_findings(item, report)
    return report


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Close workers no later item needs, so a chain's many variants never sit in memory together."""
    LlmMergeRun.of(item.config).after_item(item)


@pytest.fixture(scope="session")
def llm_merged(request: pytest.FixtureRequest) -> Any:
    """The merged candidate (--llm-model, or built from --llm-base + --llm-adapter)."""
    return LlmMergeRun.of(request.config).variant_handle("merged")


@pytest.fixture(scope="session")
def llm_adapter(request: pytest.FixtureRequest) -> Any:
    """Adapter-only: the last adapter applied unmerged (through peft) on the previous stage."""
    return LlmMergeRun.of(request.config).variant_handle("adapter")


@pytest.fixture(scope="session")
def llm_reference(request: pytest.FixtureRequest) -> Any:
    """The reference: the base model (--llm-base)."""
    return LlmMergeRun.of(request.config).variant_handle("reference")


@pytest.fixture(scope="session")
def llm_variant(request: pytest.FixtureRequest) -> Any:
    """Parametrized over every variant available in the run (reference, adapter, merged)."""
    return LlmMergeRun.of(request.config).variant_handle(request.param)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """llm_variant runs once per variant the run has."""
    LlmMergeRun.of(metafunc.config).parametrize_variants(metafunc)
