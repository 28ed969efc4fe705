"""What the plugin costs over a bare generate loop, on the same prompts and model.

Baseline ("bare"): one Python process that loads the model with transformers and calls
`generate` greedily on each prompt in turn, the way a user would script it.  Candidate: the
same prompts as a YAML suite run by `pytest --llm-model ...` (pytest start-up, collection,
the worker process, the deadline plumbing and the checks included).  Both are timed end to
end as fresh processes, three times each, and the best runs are compared.

    python benchmarks/suite_overhead.py [--model fixtures/merged] [--prompts 48] [--tokens 48]

Targets: plugin/bare <= 1.10 with one prompt at a time (--llm-batch-size 1), <= 0.7 batched.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORDS = ["apple", "river", "stone", "moon", "tiger", "cloud", "paper", "glass", "horse", "lemon"]
ZH = ["苹果", "河流", "石头", "月亮", "老虎", "云朵"]

BARE = textwrap.dedent('''
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_path, prompts_file, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    for prompt in json.load(open(prompts_file)):
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            model.generate(**ids, max_new_tokens=budget, do_sample=False)
''')


def prompts(count: int) -> list[str]:
    out = []
    for i in range(count):
        words = " ".join(WORDS[(i + k * 3) % len(WORDS)] for k in range(3 + i % 3))
        task = ["Repeat", "Reverse", "Uppercase"][i % 3]
        out.append(f"{task}: {words}\nAnswer:" if i % 4 else f"重复: {ZH[i % 6]} {ZH[(i + 2) % 6]}\n答案:")
    return out


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    if result.returncode not in (0, 1):  # 1: some case failed its expectations, which is fine here
        raise SystemExit(f"{cmd[:4]} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "fixtures" / "merged")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    model = args.model.resolve()
    work = Path(tempfile.mkdtemp(prefix="llmmerge-bench-"))
    texts = prompts(args.prompts)
    (work / "prompts.json").write_text(json.dumps(texts, ensure_ascii=False))
    (work / "bare.py").write_text(BARE)
    suite = {"defaults": {"max_new_tokens": args.tokens, "must_terminate": False, "timeout_s": 600},
             "cases": [{"id": f"p{i}", "prompt": t} for i, t in enumerate(texts)]}
    (work / "bench.yaml").write_text(json.dumps(suite, ensure_ascii=False))  # JSON is YAML

    bare_cmd = [sys.executable, "bare.py", str(model), "prompts.json", str(args.tokens)]
    plugin_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--llm-model={model}",
                  "-m", "llmmerge_suite", "bench.yaml"]
    runs = {
        "bare loop (baseline)": bare_cmd,
        "plugin, one prompt at a time": plugin_cmd + ["--llm-batch-size", "1"],
        "plugin, batched (8)": plugin_cmd + ["--llm-batch-size", "8"],
    }
    best: dict[str, float] = {}
    for _ in range(args.repeat):  # interleaved, so drift on a shared machine hits all alike
        for name, cmd in runs.items():
            best[name] = min(best.get(name, float("inf")), timed(cmd, work))
    baseline = best["bare loop (baseline)"]
    print(f"model {model}, {args.prompts} prompts x {args.tokens} new tokens, best of {args.repeat}, "
          f"wall time of a fresh process each")
    for name, seconds in best.items():
        print(f"  {name:32s} {seconds:7.2f} s   ratio to baseline {seconds / baseline:5.2f}")
    print("targets: one at a time <= 1.10, batched <= 0.70")


if __name__ == "__main__":
    main()
