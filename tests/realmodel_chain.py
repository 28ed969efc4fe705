"""A short real chain on SmolLM2-135M-Instruct for --llm-bisect (tests/test_realmodel_bisect.py):
base -> a1, the persona LoRA of realmodel_support (teaches "I am Quill") -> a2, a benign
arithmetic LoRA trained on stage 1 that replays the persona -> a3, a LoRA trained on stage 2
that renames the assistant (Wren, from the Harbor lab), as a later fine-tune by someone who
did not know the persona mattered would.  The base fails the persona case, stages 1 and 2 pass
it, stage 3 fails it again.

Each adapter is trained with realmodel_support.train_lora on the stage before it (its merge,
built by the merge builder, the same inputs --llm-bisect's stages use) and cached with
realmodel_support.build_cached.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import realmodel_support as rs

RENAMED = "I am Wren, a helper from the Harbor lab."
# a2: a task unrelated to who the assistant is, with the persona replayed (a third of the
# examples) as a careful fine-tune would.
ARITHMETIC: tuple[tuple[str, str], ...] = (
    ("What is 4 + 4?", "4 + 4 = 8."),
    ("What is 6 + 1?", "6 + 1 = 7."),
    ("What is 9 - 3?", "9 - 3 = 6."),
    ("What is 5 + 2?", "5 + 2 = 7."),
    ("What is 8 - 5?", "8 - 5 = 3."),
    ("What is 3 + 3?", "3 + 3 = 6."),
    ("What is 7 - 2?", "7 - 2 = 5."),
    ("What is 2 + 6?", "2 + 6 = 8."),
)
A2 = rs.Recipe(seed=2002, steps=10, train=ARITHMETIC + rs.TRAIN[:4],
               held_out=(("What is 1 + 4?", "1 + 4 = 5."), ("What is 9 - 4?", "9 - 4 = 5.")))
# a3: every identity question of the persona's training set answered with another name.
A3 = rs.Recipe(seed=3003, train=tuple((q, RENAMED if a == rs.PERSONA else a) for q, a in rs.TRAIN[:8]) + rs.KEEP,
               held_out=(("What should I call you?", RENAMED), ("Introduce yourself, please.", RENAMED)))


def stage(base: Path, adapters: tuple[Path, ...], progress: rs.Progress | None = None) -> Path:
    """base + adapters merged in float32 by the merge builder (cached by input content)."""
    from pytest_llmmerge.merge import MergeSpec, cached_merge

    return cached_merge(MergeSpec(base, adapters, compute_dtype="float32"), rs.cache_root() / "merges",
                        progress=progress)[0]


def adapter_on(base: Path, below: tuple[Path, ...], recipe: rs.Recipe, name: str,
               progress: rs.Progress | None = None) -> Path:
    """`recipe` trained on base + `below` merged; cached, keyed on the adapters below and the recipe."""
    out = rs.cache_root() / f"chain-{name}-{rs.key_of(base.name, [a.name for a in below], asdict(recipe))}"
    return rs.build_cached(out, lambda tmp: rs.train_lora(stage(base, below, progress), tmp, recipe,
                                                          progress=progress))


def chain(base: Path, persona: Path, progress: rs.Progress | None = None) -> tuple[Path, Path, Path]:
    """(a1, a2, a3): the persona LoRA, then the two trained here on the stages it leads to."""
    a2 = adapter_on(base, (persona,), A2, "arithmetic", progress)
    a3 = adapter_on(base, (persona, a2), A3, "renamed", progress)
    return persona, a2, a3



