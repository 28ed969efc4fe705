"""The suites through the real `vllm serve` (backend vllm-serve), started with a deployment's
flags: the served path passes a healthy checkpoint, fails one whose generation config lost the
end-of-turn id, passes it again under the flag that really restores it, and fails a healthy
checkpoint under a flag that breaks it -- each a real server process, and each time the stop-set
item (integrity::stop_sets) predicts the served outcome from the files alone.

Each run starts one server: about 30 s on an idle 2-core machine, 60-80 s beside other tests.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import BASE, MERGED, REPO

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")

CHAT = str(REPO / "example_suites" / "chat.yaml")
SMOKE = str(REPO / "example_suites" / "smoke.yaml")
# Chat cases the fixture model answers and ends with <|im_end|>.
CHAT_CASES = "greeting or add"


def served(pytester: pytest.Pytester, model: Path, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(f"--llm-model={model}", "--llm-backend=vllm-serve", "-rA", "-p",
                                         "no:randomly", *args)


def test_healthy_merge_passes_the_suites_through_the_server(pytester: pytest.Pytester) -> None:
    result = served(pytester, MERGED, f"--llm-base={BASE}", "-m", "llmmerge_suite or llmmerge_integrity", SMOKE, CHAT)
    outcomes = result.parseoutcomes()
    assert "failed" not in outcomes and "skipped" not in outcomes and "error" not in outcomes, result.stdout.str()
    result.stdout.fnmatch_lines_random(["PASSED *chat.yaml::greeting[[]merged-vllm-serve[]]",
                                        "PASSED *smoke.yaml::repeat-en[[]merged-vllm-serve[]]",
                                        "PASSED *integrity::stop_sets*",
                                        "*loaded merged-vllm-serve in * s*"])


def test_lost_end_of_turn_runs_to_the_budget_on_the_served_path(pytester: pytest.Pytester,
                                                                 broken: Callable[[str], Path]) -> None:
    model = broken("end_of_turn_dropped_from_eos")
    result = served(pytester, model, "-m", "llmmerge_suite or llmmerge_integrity", "-k",
                    f"{CHAT_CASES} or stop_sets or generation_config", CHAT)
    output = result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    # The file's gap is reported once, by the generation config's item; the stop-set table
    # shows the served path without <|im_end|>.
    result.stdout.fnmatch_lines_random([
        "FAILED *chat.yaml::greeting[[]merged-vllm-serve[]]*",
        "FAILED *integrity::generation_config*",
        "PASSED *integrity::stop_sets*",
    ])
    assert "GEN005" in output and "GEN008" not in output, output
    assert "did not terminate" in output and "finish_reason=length" in output, output


def test_override_generation_config_does_not_restore_it_on_the_real_server(
        pytester: pytest.Pytester, broken: Callable[[str], Path]) -> None:
    """vLLM #45591, on the installed vLLM: the override's eos_token_id never reaches the stop
    ids, so the served answer still runs to its budget -- as the stop-set item says."""
    model = broken("end_of_turn_dropped_from_eos")
    override = json.dumps({"eos_token_id": [2, 0]})
    result = served(pytester, model, f"--llm-serve-arg=--override-generation-config {override}", "-m",
                    "llmmerge_suite or llmmerge_integrity", "-k", "greeting and not zh or stop_sets", CHAT)
    result.stdout.fnmatch_lines_random([
        "FAILED *chat.yaml::greeting[[]merged-vllm-serve[]]*",
        "*vLLM served stops at*eos_token_id [[]2[]] does not help: vLLM applies no eos id from it (vLLM #45591)*",
    ])


def test_generation_config_flag_restores_the_served_path(pytester: pytest.Pytester,
                                                         broken: Callable[[str], Path]) -> None:
    """The fix that works: --generation-config pointing at a folder whose generation_config.json
    lists <|im_end|> (here the base's)."""
    model = broken("end_of_turn_dropped_from_eos")
    result = served(pytester, model, f"--llm-serve-arg=--generation-config {BASE}", "-m",
                    "llmmerge_suite or llmmerge_integrity", "-k", f"{CHAT_CASES} or stop_sets or generation_config",
                    CHAT)
    output = result.stdout.str()
    result.stdout.fnmatch_lines_random(["PASSED *chat.yaml::greeting[[]merged-vllm-serve[]]",
                                        "PASSED *chat.yaml::add[[]merged-vllm-serve[]]"])
    # The file is still broken for HF and the offline engine (GEN005); the deployment's flag
    # repairs the served path, so the stop-set item has nothing to add.
    result.stdout.fnmatch_lines_random(["FAILED *integrity::generation_config*", "PASSED *integrity::stop_sets*"])
    assert "GEN005" in output and "GEN008" not in output, output


def test_deploy_flag_that_ignores_the_checkpoints_eos_fails_a_healthy_merge(pytester: pytest.Pytester,
                                                                             tmp_path: Path) -> None:
    """A healthy checkpoint deployed with --generation-config naming a pretrained base's folder
    (eos <|endoftext|> only): HF and the offline engine are fine, the server never stops."""
    folder = tmp_path / "pretrain-generation-config"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    result = served(pytester, MERGED, f"--llm-serve-arg=--generation-config {folder}", "-m",
                    "llmmerge_suite or llmmerge_integrity", "-k", f"{CHAT_CASES} or stop_sets", CHAT)
    result.stdout.fnmatch_lines_random([
        "FAILED *chat.yaml::greeting[[]merged-vllm-serve[]]*",
        "FAILED *integrity::stop_sets*",
        f"*GEN008*vLLM served stops at*Fix: add 2 to eos_token_id in {folder}/generation_config.json*",
    ])
    output = result.stdout.str()
    assert "HF generate stops at" not in output and "vLLM offline stops at" not in output, output
