"""Peak memory and time of the streaming weight scan, against loading each shard whole.

A synthetic checkpoint (model + base, each two shards holding one 512 MiB float32 tensor and
some small ones) is written to a temporary directory once.  Each side runs in a fresh Python
process, so its peak resident set size (ru_maxrss) is its own:

- ours: `pytest_llmmerge.tensor_scan.scan(model, base)`, the data behind weights::finite,
  constant_tensors, tied_embeddings and change_vs_base;
- baseline: `safetensors.numpy.load_file` of each model shard and its base shard (what a
  script that checks tensors for NaN and compares them with the base usually does), with the
  same statistics computed with numpy on the whole tensors.

Printed: peak RSS (VmHWM) over the process's RSS before the work, and wall time, per side, and the
ratios ours/baseline.  The target (issue 6): ours at most the largest tensor plus a fixed
overhead; measured it stays at a few chunk-sized arrays, independent of tensor size.

    .venv/bin/python benchmarks/weight_scan.py [--tensor-mib 512] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

OURS = """
from pytest_llmmerge.checkpoint import Checkpoint
from pytest_llmmerge.tensor_scan import scan
result = scan(Checkpoint(MODEL), Checkpoint(BASE))
assert result.tensors["big.0"].relative_change is not None
"""

BASELINE = """
import numpy as np
from safetensors.numpy import load_file
for shard in sorted(MODEL.glob("*.safetensors")):
    mine, theirs = load_file(str(shard)), load_file(str(BASE / shard.name))
    for name, values in mine.items():
        finite = np.isfinite(values).all()
        lo, hi = float(values.min()), float(values.max())
        change = float(np.linalg.norm(values - theirs[name]) / np.linalg.norm(theirs[name]))
    del mine, theirs
"""

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec,
# and the parent wrote the big tensors.
HARNESS = """
import sys, time
from pathlib import Path
MODEL, BASE = Path(sys.argv[1]), Path(sys.argv[2])
import numpy, safetensors.numpy, pytest_llmmerge.tensor_scan  # imports are not the work measured
def status(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key))
rss_now = status("VmRSS")
started = time.perf_counter()
{body}
seconds = time.perf_counter() - started
print({{"peak_mib": (status("VmHWM") - rss_now) / 1024, "seconds": seconds}})
"""


def write_checkpoint(path: Path, tensor_mib: int, scale: float) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = tensor_mib * 2**20 // 4 // 4096
    index: dict[str, str] = {}
    for i in range(2):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        big = rng.standard_normal((rows, 4096), dtype=np.float32) * np.float32(scale)
        small = {f"small.{i}.{j}": rng.standard_normal((256, 256), dtype=np.float32) for j in range(8)}
        save_file({f"big.{i}": big, **small}, str(path / shard), metadata={"format": "pt"})
        index.update({name: shard for name in (f"big.{i}", *small)})
        del big
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))


def run(body: str, model: Path, base: Path) -> dict[str, float]:
    code = HARNESS.format(body=textwrap.dedent(body))
    out = subprocess.run([sys.executable, "-c", code, str(model), str(base)], capture_output=True, text=True,
                         check=True).stdout
    return eval(out.strip().splitlines()[-1])  # noqa: S307 (our own dict literal)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tensor-mib", type=int, default=512, help="size of each shard's large tensor")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="llmmerge-weight-scan-"))
    try:
        print(f"writing model + base: 2 shards x ({args.tensor_mib} MiB tensor + 8 x 256 KiB) each", flush=True)
        write_checkpoint(root / "model", args.tensor_mib, 1.0)
        write_checkpoint(root / "base", args.tensor_mib, 0.5)
        print(f"{'side':<36} {'peak RSS over start':>20} {'seconds':>8}")
        results = {}
        for label, body in (("ours: tensor_scan.scan (chunked)", OURS),
                            ("baseline: safetensors load_file", BASELINE)):
            results[label] = run(body, root / "model", root / "base")
            print(f"{label:<36} {results[label]['peak_mib']:>16.1f} MiB {results[label]['seconds']:>8.2f}")
        ours, base = results.values()
        print(f"ratio ours/baseline: peak memory {ours['peak_mib'] / base['peak_mib']:.3f}, "
              f"time {ours['seconds'] / base['seconds']:.2f}; largest tensor {args.tensor_mib} MiB")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
