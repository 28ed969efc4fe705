"""The same checks on CUDA: HF on the GPU and vLLM's GPU engine. Skipped where no GPU is seen."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import ADAPTERS, BASE, MERGED, REPO


def _cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _cuda(), reason="no CUDA device on this machine")]


def test_suites_parity_and_agreement_on_cuda(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(
        f"--llm-model={MERGED}", f"--llm-base={BASE}", f"--llm-adapter={ADAPTERS[0]}", f"--llm-adapter={ADAPTERS[1]}",
        "--llm-device=cuda", "--llm-vllm-arg", "gpu_memory_utilization=0.3", str(REPO / "example_suites"), "-v")
    outcomes = result.parseoutcomes()
    assert "failed" not in outcomes and outcomes.get("passed", 0) > 40, result.stdout.str()
