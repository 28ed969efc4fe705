"""Time the full integrity scan on a checkpoint shaped like a 70B Llama.

The checkpoint is made of sparse files: real safetensors headers for 80 layers in about 30
shards (~138 GB of bf16 data), with the data regions left as holes, so it costs a few MB of
disk.  The scan must take under 1 s and read no tensor bytes.

Baseline, run side by side: opening every shard with `safetensors.safe_open` and listing its
tensors (what a loader does before it reads any data).  Printed: seconds of both, their ratio,
and the bytes the scan read (from /proc/self/io) against the bytes the headers hold.

    python benchmarks/integrity_scan.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import tempfile
import time
from pathlib import Path

from pytest_llmmerge.checkpoint import Checkpoint
from pytest_llmmerge.checks import run_all
from pytest_llmmerge.checks.base import Context

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, VOCAB = 8192, 80, 64, 8, 28672, 32000
SHARDS = 30


def tensor_shapes() -> dict[str, list[int]]:
    kv = HIDDEN // HEADS * KV_HEADS
    shapes = {"model.embed_tokens.weight": [VOCAB, HIDDEN]}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": [HIDDEN, HIDDEN], p + "self_attn.k_proj.weight": [kv, HIDDEN],
            p + "self_attn.v_proj.weight": [kv, HIDDEN], p + "self_attn.o_proj.weight": [HIDDEN, HIDDEN],
            p + "mlp.gate_proj.weight": [FFN, HIDDEN], p + "mlp.up_proj.weight": [FFN, HIDDEN],
            p + "mlp.down_proj.weight": [HIDDEN, FFN],
            p + "input_layernorm.weight": [HIDDEN], p + "post_attention_layernorm.weight": [HIDDEN],
        })
    shapes["model.norm.weight"] = [HIDDEN]
    shapes["lm_head.weight"] = [VOCAB, HIDDEN]
    return shapes


def write_sparse_checkpoint(out: Path) -> int:
    """Write the checkpoint; returns the total bytes of all headers."""
    out.mkdir(parents=True)
    shapes = tensor_shapes()
    names = list(shapes)
    per_shard = -(-len(names) // SHARDS)
    weight_map: dict[str, str] = {}
    header_total = 0
    total_size = 0
    for s in range(SHARDS):
        shard = f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in names[s * per_shard:(s + 1) * per_shard]:
            nbytes = 2 * _numel(shapes[name])
            header[name] = {"dtype": "BF16", "shape": shapes[name], "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = shard
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with (out / shard).open("wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            fh.truncate(8 + len(raw) + offset)  # a hole where the tensor data would be
        header_total += 8 + len(raw)
        total_size += offset
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}))
    vocab = {f"t{i}": i for i in range(VOCAB - 3)}
    added = [{"id": VOCAB - 3 + i, "content": c, "special": True}
             for i, c in enumerate(["<s>", "</s>", "<|eot|>"])]
    (out / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab}, "added_tokens": added}))
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot|>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "chat_template": template,
        "added_tokens_decoder": {str(t["id"]): t for t in added}}))
    (out / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "intermediate_size": FFN, "vocab_size": VOCAB, "torch_dtype": "bfloat16", "tie_word_embeddings": False}))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [VOCAB - 2, VOCAB - 1]}))
    return header_total


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="build the checkpoints here and keep them")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="llmmerge-70b-"))
    try:
        model, base = root / "merged", root / "base"
        if not model.exists():
            header_bytes = write_sparse_checkpoint(model)
            write_sparse_checkpoint(base)
        else:
            header_bytes = sum(8 + struct.unpack("<Q", p.open("rb").read(8))[0] for p in model.glob("*.safetensors"))
        apparent = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        on_disk = sum(p.stat().st_blocks * 512 for p in model.glob("*.safetensors"))
        print(f"checkpoint: {len(list(model.glob('*.safetensors')))} shards, {len(tensor_shapes())} tensors, "
              f"{apparent / 1e9:.1f} GB apparent, {on_disk / 1e6:.1f} MB on disk, headers {header_bytes / 1e6:.2f} MB")

        scan_times, read_counts = [], []
        for _ in range(args.repeat):
            before, start = bytes_read(), time.perf_counter()
            outcomes = run_all(Context(Checkpoint(model), Checkpoint(base)))
            scan_times.append(time.perf_counter() - start)
            read_counts.append(bytes_read() - before)
        errors = [f.render() for o in outcomes for f in o.errors]
        assert not errors, errors

        from safetensors import safe_open
        base_times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            for shard in sorted(model.glob("*.safetensors")):
                with safe_open(str(shard), framework="numpy") as fh:
                    list(fh.keys())
                    fh.metadata()
            base_times.append(time.perf_counter() - start)

        scan, baseline = min(scan_times), min(base_times)
        print(f"integrity scan (model + base, all {len(outcomes)} checks): {scan:.3f} s (best of {args.repeat})")
        print(f"baseline safetensors.safe_open + keys(), model only:     {baseline:.3f} s")
        print(f"ratio scan/baseline: {scan / baseline:.2f}")
        print(f"bytes read by the scan: {min(read_counts) / 1e6:.2f} MB for {2 * header_bytes / 1e6:.2f} MB of "
              f"headers (model + base) and {2 * apparent / 1e9:.0f} GB of tensor data")
        # Everything the scan may read: both checkpoints' headers and their JSON files.
        allowed = 2 * header_bytes + sum(p.stat().st_size for d in (model, base) for p in d.iterdir()
                                         if not p.name.endswith(".safetensors"))
        print(f"target < 1 s: {'met' if scan < 1 else 'NOT met'}; bytes read beyond headers and JSON files: "
              f"{max(0, min(read_counts) - allowed)}")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
