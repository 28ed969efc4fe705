"""vLLM backend: the same checkpoint served the way production serves it.

Generation is greedy with the checkpoint's own generation config, applied the way vLLM applies
it (`generation_config="auto"`): vLLM stops at the tokenizer's eos *and* at every eos id of
`generation_config.json`, so a checkpoint whose two eos sets disagree behaves differently here
than under HF `generate` -- the field failure "vLLM never stops" shows up as a generation that
runs to its budget.

Prompts are tokenized with the checkpoint's HF tokenizer exactly as the HF backend does (raw
prompts with the tokenizer's special tokens, rendered chat templates without) and passed to vLLM
as token ids, so both backends see identical inputs.

On a CPU-only machine (`device="cpu"`) the engine runs in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`: 2-3 s to start instead of ~16 s, and the worker that owns
the backend can be killed with everything it started) with a KV cache sized for the model
instead of a fraction of the machine's memory.  Starting an in-process engine changes
process-wide state: vLLM replaces `torch.set_num_threads` with a no-op, freezes the garbage
collector's current objects and initialises a one-process torch.distributed group.  The
backend is meant to own its process (the plugin's worker); tests may build several in one
process one after another.
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint
from .base import BackendError, Generation, GenRequest, ProgressFn, ScoreRequest, TokenLogprobs, render_prompt
from .hf import PROGRESS_INTERVAL_S
from .vllm_sizing import kv_cache_bytes_for, lora_rank_limit

# Scoring with full-vocabulary logprobs (needed for exact `probe_ids`) costs one Python float per
# vocabulary entry and position; above this many per engine call the probes are approximated.
FULL_VOCAB_ENTRIES = 4_000_000

# In-process engines share this process's torch.distributed state, and shutting any of them
# down (explicitly or when it is garbage collected) tears that state down for all of them.  So
# an engine closed while others still run is parked here and shut down with the last one.
_LIVE_IN_PROCESS: set[int] = set()
_PARKED: list[Any] = []
# torch.set_num_threads as it was before the first in-process engine replaced it with a no-op;
# put back when the last one shuts down.
_SAVED_SET_NUM_THREADS: list[Any] = []


@dataclass
class _Window:
    """One engine request of a score call: a slice of one sequence's tokens."""

    request: int  # index of the ScoreRequest
    start: int  # offset of the window in the sequence
    ids: list[int]
    k: int  # top-k asked for
    probes: list[tuple[int, ...]] | None  # probe ids per position of the window
    full_vocab: bool  # exact probes: every vocabulary entry requested

    @property
    def probing(self) -> bool:
        """Whether any position of the window has ids to probe."""
        return self.probes is not None and any(self.probes)

    @property
    def after_last(self) -> bool:
        """Whether distributions (not only the actual tokens' logprobs) are needed."""
        return self.k > 0 or self.probing


class VLLMBackend:
    """A checkpoint loaded in a vLLM engine (`vllm.LLM`), with at most one LoRA adapter on top.

    `extra` is passed to `vllm.LLM()` last, so it overrides anything set here
    (`--llm-vllm-arg key=value`).  `kv_cache_bytes` sizes the KV cache (on CPU it defaults to two
    sequences of `max_model_len` tokens); `max_model_len` defaults to the model's context.
    """

    name = "vllm"

    def __init__(self, model_path: str, *, dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False,
                 adapters: Sequence[str] = (), threads: int | None = None, max_model_len: int | None = None,
                 kv_cache_bytes: int | None = None, tensor_parallel_size: int = 1,
                 extra: dict[str, Any] | None = None) -> None:
        adapters = [str(a) for a in adapters]
        if len(adapters) > 1:
            raise ValueError(f"the vLLM backend applies at most one LoRA adapter per request, got {len(adapters)} "
                             f"({', '.join(adapters)}): merge all but the last into the model first")
        on_cpu = device.split(":")[0] == "cpu"
        if on_cpu:
            # Before vllm is imported: it reads its environment once.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        elif device.startswith("cuda:"):
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", device.split(":", 1)[1])
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if threads:
            # vLLM keeps an externally set OMP_NUM_THREADS, and after its CPU worker starts,
            # torch.set_num_threads is a no-op: set both now.
            os.environ["OMP_NUM_THREADS"] = str(threads)
            import torch

            torch.set_num_threads(threads)

        from transformers import AutoTokenizer
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        checkpoint = Checkpoint(Path(model_path))
        config = {**checkpoint.config, **checkpoint.text_config}  # a multimodal config's sizes are nested
        # vLLM's "auto" downcasts a float32 checkpoint to bfloat16; HF's "auto" keeps the
        # checkpoint's dtype.  Resolve it here so both backends compute in the same dtype.
        resolved_dtype = (checkpoint.config_dtype or "auto").removeprefix("torch.") if dtype == "auto" else dtype
        kwargs: dict[str, Any] = {
            "model": model_path, "tokenizer": model_path, "generation_config": "auto", "dtype": resolved_dtype,
            "trust_remote_code": trust_remote_code, "tensor_parallel_size": tensor_parallel_size,
            "max_model_len": max_model_len, "max_logprobs": -1,  # -1: up to the vocabulary size
            "seed": 0,
        }
        if on_cpu:
            kwargs["enforce_eager"] = True
            if kv_cache_bytes is None and os.environ.get("VLLM_CPU_KVCACHE_SPACE", "") == "":
                kv_cache_bytes = kv_cache_bytes_for(config, resolved_dtype, max_model_len)
        if kv_cache_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_bytes)
        if adapters:
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=lora_rank_limit(adapters[0]))
        kwargs.update(extra or {})

        self.device = device
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self._in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        if self._in_process and not _LIVE_IN_PROCESS and not _SAVED_SET_NUM_THREADS:
            import torch

            _SAVED_SET_NUM_THREADS.append(torch.set_num_threads)
        self.llm: Any = LLM(**kwargs)
        self.lora: Any = LoRARequest("adapter", 1, adapters[0]) if adapters else None
        model_config = self.llm.llm_engine.model_config
        self.max_model_len = int(model_config.max_model_len)
        self.vocab_size = int(model_config.get_vocab_size())
        self._defaults: dict[str, Any] = dict(model_config.get_diff_sampling_param())
        self._request_ids = iter(range(1 << 62))
        if self._in_process:
            _LIVE_IN_PROCESS.add(id(self))

    # --- generation ---------------------------------------------------------------------------

    def render(self, request: GenRequest) -> tuple[str, bool]:
        return render_prompt(self.tokenizer, request)

    def sampling_params(self, max_new_tokens: int, **overrides: Any) -> Any:
        """Greedy, with the checkpoint's generation-config defaults (as `LLM.get_default_sampling_params`)."""
        from vllm import SamplingParams

        return SamplingParams.from_optional(**{**self._defaults, "temperature": 0.0, "max_tokens": max_new_tokens,
                                               "min_tokens": 0, **overrides})

    def generate(self, requests: Sequence[GenRequest], on_progress: ProgressFn | None = None) -> list[Generation]:
        """Greedy generation of every request in one engine batch.

        The engine is stepped here (not through `LLM.generate`) so that `on_progress` gets the
        text produced so far, like the HF backend: a request killed at its deadline still shows
        its last words.
        """
        if not requests:
            return []
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        rendered = [self.render(r) for r in requests]
        encoded = [[int(t) for t in self.tokenizer(text, add_special_tokens=special)["input_ids"]]
                   for text, special in rendered]
        engine = self.llm.llm_engine
        # How LLM.generate turns a prompt into engine input (the engine's raw-prompt path is
        # deprecated); a vLLM without it gets the raw prompt.
        preprocess = getattr(self.llm, "_preprocess_cmpl_one", None)
        started = time.perf_counter()
        ids = [f"llmmerge-{next(self._request_ids)}" for _ in requests]
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        finished: dict[str, Any] = {}
        try:
            for request_id, request, prompt_ids in zip(ids, requests, encoded):
                prompt = TokensPrompt(prompt_token_ids=prompt_ids)
                params = self.sampling_params(request.max_new_tokens, output_kind=RequestOutputKind.DELTA)
                engine.add_request(request_id, prompt if preprocess is None else preprocess(prompt), params,
                                   lora_request=self.lora)
            steps, last_report = 0, 0.0
            while len(finished) < len(ids) and engine.has_unfinished_requests():
                for output in engine.step():
                    if output.request_id in tokens:
                        tokens[output.request_id] += [int(t) for t in output.outputs[0].token_ids]
                        if output.finished:
                            finished[output.request_id] = output.outputs[0]
                steps += 1
                now = time.monotonic()
                if on_progress is not None and (steps <= 16 or now - last_report >= PROGRESS_INTERVAL_S):
                    last_report = now
                    on_progress([self.tokenizer.decode(tokens[i], skip_special_tokens=False) for i in ids])
        except BaseException:
            engine.abort_request([i for i in ids if i not in finished])
            raise
        missing = [i for i in ids if i not in finished]
        if missing:
            raise BackendError(f"the vLLM engine went idle with {len(missing)} of {len(ids)} requests unfinished")
        seconds = (time.perf_counter() - started) / len(requests)
        return [finished_generation(self.tokenizer, tokens[i], finished[i].finish_reason, finished[i].stop_reason,
                                    rendered[n][0], tuple(encoded[n]), seconds)
                for n, i in enumerate(ids)]

    # --- scoring ------------------------------------------------------------------------------

    def score(self, requests: Sequence[ScoreRequest]) -> list[TokenLogprobs]:
        """Teacher-forced log-probabilities from vLLM's prompt logprobs, in windows the model can see.

        The distribution after tokens 0..i comes from the prompt logprobs at position i+1, and
        the one after the last token of a window from the logprobs of one generated token.  A
        window holds at most min(max_model_len - 1, 1024) tokens (vLLM needs room for that one
        generated token), so texts longer than the HF backend's window (min(context, 1024)) are
        cut one token earlier there.

        `probe_ids` are exact when a window's full-vocabulary logprobs (positions x vocabulary
        size) fit in FULL_VOCAB_ENTRIES, as they always do for the fixtures' 1024 tokens; vLLM
        0.32's own per-position token-id scoring (`prompt_logprob_token_ids`) needs its V2 model
        runner, which needs Triton, which the CPU build lacks.  Above that budget the
        k = max(top_k, 2 x the widest probe row) most likely tokens are requested, a probed id
        among them is exact, and one outside them gets an upper bound on its log-probability:
        the smaller of the k-th largest logprob and the log of the mass outside the returned
        tokens (so a KL computed from such probes is, if anything, too small).

        With a LoRA adapter every window is a call of its own: vLLM 0.32 raises on prompt
        logprobs for a batch of more than one prompt with LoRA enabled, and its engine then
        never finishes another request.
        """
        sequences: list[list[int]] = []
        sizes: list[int] = []
        windows: list[_Window] = []
        width = max(1, min(self.max_model_len - 1, 1024))
        for n, request in enumerate(requests):
            if request.token_ids is not None:
                ids = [int(t) for t in request.token_ids]
                sizes.append(len(self.tokenizer.decode(ids).encode("utf-8")))
            else:
                assert request.text is not None
                ids = [int(t) for t in self.tokenizer(request.text)["input_ids"]]
                sizes.append(len(request.text.encode("utf-8")))
            if request.probe_ids is not None and len(request.probe_ids) < len(ids):
                raise ValueError(f"score request {n}: {len(request.probe_ids)} probe rows for {len(ids)} tokens")
            sequences.append(ids)
            for start in range(0, len(ids), width):
                chunk = ids[start:start + width]
                probes = (None if request.probe_ids is None
                          else [tuple(int(t) for t in row) for row in request.probe_ids[start:start + len(chunk)]])
                wanted = probes is not None and any(probes)
                windows.append(_Window(n, start, chunk, request.top_k, probes,
                                       wanted and len(chunk) * self.vocab_size <= FULL_VOCAB_ENTRIES))

        logprobs: list[list[float]] = [[] for _ in requests]
        top: list[list[tuple[tuple[int, float], ...]]] = [[] for _ in requests]
        probe: list[list[tuple[float, ...]]] = [[] for _ in requests]
        for batch in self._batches(windows):
            for window, output in zip(batch, self._run_scores(batch)):
                self._collect(window, output, logprobs[window.request], top[window.request], probe[window.request])
        return [TokenLogprobs(token_ids=tuple(ids), logprobs=tuple(logprobs[n]),
                              top=tuple(top[n]) if requests[n].top_k else (),
                              probe=tuple(probe[n]) if requests[n].probe_ids is not None else (),
                              n_bytes=sizes[n])
                for n, ids in enumerate(sequences)]

    def _batches(self, windows: list[_Window]) -> Iterator[list[_Window]]:
        """Windows grouped into engine calls: one each with LoRA, else up to FULL_VOCAB_ENTRIES entries."""
        batch: list[_Window] = []
        entries = 0
        for window in windows:
            cost = len(window.ids) * (self.vocab_size if window.full_vocab else self._k(window) + 1)
            if batch and (self.lora is not None or entries + cost > FULL_VOCAB_ENTRIES):
                yield batch
                batch, entries = [], 0
            batch.append(window)
            entries += cost
        if batch:
            yield batch

    def _k(self, window: _Window) -> int:
        """How many of the most likely tokens to request per position (besides the actual one)."""
        if window.full_vocab:
            return -1
        k = window.k
        if window.probes is not None and window.probing:
            k = max(k, 2 * max(len(row) for row in window.probes))
        return min(k, self.vocab_size)

    def _run_scores(self, batch: list[_Window]) -> list[Any]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = []
        for window in batch:
            k = self._k(window)
            params.append(SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k,
                                         logprobs=k if window.after_last else None, detokenize=False,
                                         flat_logprobs=True))
        prompts = [TokensPrompt(prompt_token_ids=window.ids) for window in batch]
        return list(self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora))

    def _collect(self, window: _Window, output: Any, logprobs: list[float],
                 top: list[tuple[tuple[int, float], ...]], probe: list[tuple[float, ...]]) -> None:
        ids = window.ids
        prompt = output.prompt_logprobs
        # prompt[i] (i >= 1) holds token i and the most likely tokens after tokens 0..i-1.
        for i in range(1, len(ids)):
            position = _entries(prompt, i)
            if ids[i] not in position:
                raise BackendError(f"vLLM returned no logprob for prompt token {i} (id {ids[i]})")
            logprobs.append(position[ids[i]])
        if window.probes is not None and not window.probing:
            probe += [()] * len(ids)
        if not window.after_last:
            return
        sample = output.outputs[0].logprobs
        for i in range(len(ids)):
            # The distribution after tokens 0..i: prompt position i+1, or the generated token's.
            position = _entries(prompt, i + 1) if i + 1 < len(ids) else _entries(sample, 0)
            if window.k > 0:
                top.append(tuple(sorted(position.items(), key=lambda item: -item[1])[:window.k]))
            if window.probes is not None and window.probing:
                row = window.probes[i]
                if window.full_vocab:
                    probe.append(tuple(position[t] for t in row))
                else:
                    # A missing id ranks below the k returned: its logprob is at most the k-th
                    # largest (the actual prompt token, also returned, may rank lower still) and
                    # at most the log of the mass outside everything returned.
                    values = sorted(position.values(), reverse=True)
                    kth = values[min(self._k(window), len(values)) - 1]
                    rest = 1.0 - sum(math.exp(v) for v in values)
                    bound = min(kth, math.log(max(rest, 1e-30)))
                    probe.append(tuple(position.get(t, bound) for t in row))

    def close(self) -> None:
        """Shut the engine down and free its memory.

        An in-process engine closed while another one runs in this process is only parked: its
        shutdown would tear down the distributed state the other one uses.  The last one to
        close shuts them all down.
        """
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        engines = [llm]
        if self._in_process:
            _LIVE_IN_PROCESS.discard(id(self))
            if _LIVE_IN_PROCESS:
                _PARKED.append(llm)
                return
            engines += _PARKED
            _PARKED.clear()
        try:
            for engine in engines:
                engine.llm_engine.engine_core.shutdown()
        finally:
            del llm, engines
            gc.collect()
            if self._in_process and _SAVED_SET_NUM_THREADS:
                import torch

                torch.set_num_threads = _SAVED_SET_NUM_THREADS.pop()


def finished_generation(tokenizer: Any, new: list[int], reason: str | None, stop_reason: int | str | None,
                        prompt_text: str, prompt_ids: tuple[int, ...], seconds: float) -> Generation:
    """A Generation shaped like the HF backend's from what vLLM reports (offline or served):
    token ids end with the stop token when it stopped.

    vLLM keeps the eos or stop-token id it stopped at in the output's token ids; its stop_reason
    is that id for generation-config eos ids, None for the tokenizer's eos, a string for a stop
    string (no stop token then)."""
    stop_id: int | None = None
    if reason == "length":
        body = new
    elif reason == "stop":
        if isinstance(stop_reason, int):
            stop_id = stop_reason
        elif stop_reason is None and new:
            stop_id = new[-1]
        body = new[:-1] if stop_id is not None and new and new[-1] == stop_id else new
    else:
        raise BackendError(f"vLLM ended the request with finish_reason={reason!r} "
                           f"(stop_reason={stop_reason!r}) after {len(new)} tokens")
    text = tokenizer.decode(body, skip_special_tokens=False)
    return Generation(text=text, token_ids=tuple(new), finish_reason="stop" if reason == "stop" else "length",
                      stop_token_id=stop_id, seconds=seconds, prompt_text=prompt_text,
                      prompt_tokens=len(prompt_ids), prompt_ids=prompt_ids)


def _entries(logprobs: Any, position: int) -> dict[int, float]:
    """{token id: logprob} at one position of vLLM's logprobs (flat or list-of-dicts form)."""
    if hasattr(logprobs, "start_indices"):  # FlatLogprobs: read its lists, no Logprob objects
        lo, hi = logprobs.start_indices[position], logprobs.end_indices[position]
        return dict(zip(logprobs.token_ids[lo:hi], logprobs.logprobs[lo:hi]))
    entry = logprobs[position] or {}
    return {int(t): float(lp.logprob) for t, lp in entry.items()}
