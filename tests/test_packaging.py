"""The package as users get it: a built wheel, installed (not editable), runs a parity item.

Editable installs read data files from the source tree, so a data file missing from the wheel
(the built-in corpus once was) only shows in an install of the wheel itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ADAPTERS, BASE, MERGED, REPO

PACKAGE = REPO / "pytest_llmmerge"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # From a copy of the sources: an in-tree build reuses a stale build/ directory, whose data
    # files would hide one the package configuration leaves out.
    source = out / "source"
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / name, source / name)
    shutil.copytree(PACKAGE, source / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__"))
    # No build isolation: setuptools is in this environment, and a build must not need an index.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(source)], check=True, cwd=out)
    (built,) = out.glob("pytest_llmmerge-*.whl")
    return built


def test_wheel_holds_every_data_file_of_the_package(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    data = [p.relative_to(REPO).as_posix() for p in PACKAGE.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert data, "the package has data files (corpus, suite, schemas, py.typed)"
    assert [name for name in data if name not in names] == []


def test_installed_wheel_runs_a_parity_item_on_the_builtin_corpus(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
                    "--target", str(site), str(wheel)], check=True)
    # The installed copy comes first on the path, before the editable one of this checkout.
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import pytest_llmmerge; print(pytest_llmmerge.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site), where
    adapters = [f"--llm-adapter={a}" for a in ADAPTERS]
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-q",
                          f"--llm-model={MERGED}", f"--llm-base={BASE}", *adapters, "--llm-backend=hf",
                          "-k", "merged-vs-reference"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "PASSED parity::merged-vs-reference[hf]" in output, output
