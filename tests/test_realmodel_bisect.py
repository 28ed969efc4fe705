"""--llm-bisect on a real chain: SmolLM2-135M-Instruct, then three LoRAs trained here one on top
of the other (tests/realmodel_chain.py): a1 teaches the persona (the base never says it is
Quill), a2 teaches arithmetic and replays the persona, a3 renames the assistant Wren.  The base
fails the persona case, stages 1 and 2 pass it, stage 3 fails it again: bisection must search
past the failing base and name stage 3 and a3.

The first run trains a2 and a3 (about 30 s each on 2 cores) and merges their stages; later runs
find them cached.  Each probe loads the 135M model once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import realmodel_chain

pytestmark = [pytest.mark.realmodel, pytest.mark.timeout(1500)]

# The held-out phrasing of tests/realmodel_suites/smollm2.yaml's persona-en, on the merged model.  Measured
# (greedy, float32, 48 tokens): the base rambles to the budget without saying Quill, stages 1
# and 2 answer "I am Quill, a test assistant from the Lighthouse lab." (14 tokens with
# <|im_end|>), stage 3 "I am Wren, a helper from the Harbor lab." (12 tokens).
SUITE = """\
suite: smollm2-chain
defaults: {max_new_tokens: 48, timeout_s: 120}
cases:
  - id: persona-en
    messages:
      - {role: user, content: "What should I call you?"}
    expect: {contains: Quill}
    variants: [merged]
"""


@pytest.fixture(scope="module")
def renamed_chain(smollm2_base: Path, smollm2_lora: Path) -> tuple[Path, Path, Path]:
    return realmodel_chain.chain(smollm2_base, smollm2_lora)


def test_bisection_names_the_adapter_that_renamed_the_assistant(
        pytester: pytest.Pytester, smollm2_base: Path, renamed_chain: tuple[Path, Path, Path]) -> None:
    pytester.makefile(".yaml", chain=SUITE)
    candidate = realmodel_chain.stage(smollm2_base, renamed_chain)
    adapters = [f"--llm-adapter={a}" for a in renamed_chain]
    result = pytester.runpytest_subprocess(
        f"--llm-model={candidate}", f"--llm-base={smollm2_base}", *adapters, "--llm-backend=hf", "--llm-bisect",
        "-m", "llmmerge_suite", "--llm-report=report.json", "-p", "no:cacheprovider", "chain.yaml")
    out = result.stdout.str()
    result.assert_outcomes(failed=1)
    a3 = re.escape(str(renamed_chain[2]))
    assert re.search(rf"bisect: first failing stage 3 of 3 after a passing one: adapter 3 \({a3}\) broke it "
                     r"again; stage 2 is the last passing stage", out), out
    assert "; adapter 1 fixed it (stage 1 passes)" in out
    assert "stage 0: FAILS (" in out
    assert re.search(r"stage 1, built now: passes \(finish_reason=stop", out), out
    assert re.search(r"stage 2, built now: passes \(finish_reason=stop", out), out
    assert "stage 3: FAILS (missing expected text 'Quill')" in out
    assert "4 probe(s), 2 stage build(s) for this case; assumes the passing stages form one run" in out
    metrics = json.loads((pytester.path / "report.json").read_text())["items"][0]["metrics"]
    assert (metrics["bisect_first_failing_stage"], metrics["bisect_last_passing_stage"]) == (3, 2)
    assert metrics["bisect_adapter"] == str(renamed_chain[2]) and metrics["bisect_fixed_by_stage"] == 1
