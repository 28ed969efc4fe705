"""Time the merge diagnosis on weights shaped like a 70B Llama's, and show it streams.

The base and the candidate are the sparse 70B-shaped checkpoints of integrity_scan.py (real
safetensors headers, the data left as holes that read as zeros); the adapter is a real PEFT
file layout with random rank-16 factors on the seven projections of the first --layers layers
(every layer of a 70B has the same shapes, so the cost per layer times 80 is the whole model's).

Baseline, run side by side: reading the same adapted tensors of both checkpoints in the same
chunks with the same reader (what any streamed comparison of the two must at least do).
Printed: seconds of both, their ratio, values per second, the 80-layer estimate and the peak
resident memory (the largest weight is 235 M values: 1.9 GB in float64 if it were held whole).

    python benchmarks/merge_diagnosis.py [--layers 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from integrity_scan import LAYERS, tensor_shapes, write_sparse_checkpoint
from safetensors.numpy import save_file

from pytest_llmmerge.checkpoint import Checkpoint
from pytest_llmmerge.merge_diagnosis import diagnose
from pytest_llmmerge.tensor_scan import TensorReader, locations

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 16


def write_adapter(out: Path, layers: int) -> list[str]:
    """A LoRA on the seven projections of layers 0..layers-1; returns the weights it updates."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shapes = tensor_shapes()
    tensors, targets = {}, []
    for name, shape in shapes.items():
        parts = name.split(".")
        if len(parts) > 3 and parts[2].isdigit() and int(parts[2]) < layers and parts[-2] in TARGETS:
            module = "base_model.model." + name.removesuffix(".weight")
            tensors[module + ".lora_A.weight"] = rng.standard_normal((RANK, shape[1])).astype(np.float32) * 0.01
            tensors[module + ".lora_B.weight"] = rng.standard_normal((shape[0], RANK)).astype(np.float32) * 0.01
            targets.append(name)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": 32,
                                                         "target_modules": list(TARGETS)}))
    return targets


def plain_read(model: Path, base: Path, targets: list[str]) -> float:
    started = time.perf_counter()
    for ckpt in (Checkpoint(model), Checkpoint(base)):
        at, _ = locations(ckpt)
        reader = TensorReader(ckpt)
        try:
            for name in targets:
                for chunk in reader.chunks(*at[name]):
                    chunk.sum()
        finally:
            reader.close()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1, help="layers the adapter targets (default 1)")
    parser.add_argument("--keep", type=Path, help="build the checkpoints here and keep them")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="llmmerge-70b-diag-"))
    model, base, adapter = root / "merged", root / "base", root / f"adapter-{args.layers}"
    if not model.exists():
        write_sparse_checkpoint(model)
        write_sparse_checkpoint(base)
    targets = write_adapter(adapter, args.layers) if not adapter.exists() else \
        [n for n in tensor_shapes() if n.split(".")[-2] in TARGETS and int(n.split(".")[2]) < args.layers]
    shapes = tensor_shapes()
    values = sum(int(np.prod(shapes[n])) for n in targets)
    print(f"{len(targets)} adapted weights in {args.layers} layer(s), {values / 1e9:.2f} G values each side")

    baseline = plain_read(model, base, targets)
    started = time.perf_counter()
    diagnosis = diagnose(Checkpoint(model), Checkpoint(base), (adapter,))
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"plain read (baseline): {baseline:8.1f} s")
    print(f"merge diagnosis:       {seconds:8.1f} s   ratio {seconds / baseline:.2f} x the plain read, "
          f"{values / seconds / 1e6:.0f} M values/s")
    print(f"80 layers (estimate):  {seconds * LAYERS / args.layers / 60:8.1f} min")
    print(f"peak resident memory:  {peak:8.0f} MiB")
    print(f"verdict on the zero-filled candidate: {diagnosis.summary()[:120]}")


if __name__ == "__main__":
    main()
