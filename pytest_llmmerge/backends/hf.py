"""Hugging Face transformers backend: greedy, batched generation with left padding.

Generation uses the checkpoint's own generation config, exactly as a user's `generate` call
would: a lost or changed eos in `generation_config.json` must show up here as a generation
that runs to its budget.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from .base import Generation, GenRequest, ProgressFn, ScoreRequest, TokenLogprobs, render_prompt

# How often partial output is reported while generating (seconds).
PROGRESS_INTERVAL_S = 0.5


def eos_ids_of(generation_config: Any) -> set[int]:
    value = getattr(generation_config, "eos_token_id", None)
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


class HFBackend:
    name = "hf"

    def __init__(self, model_path: str, *, dtype: str = "auto", device: str = "cpu",
                 trust_remote_code: bool = False, adapters: Sequence[str] = (), threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            # Several workers on few cores: oversubscribed OpenMP threads spin against each other
            # and a tiny matmul takes milliseconds instead of microseconds.
            torch.set_num_threads(threads)
        self._torch = torch
        self.device = device
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype,
                                                     trust_remote_code=trust_remote_code)
        for adapter in adapters:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        self.model = model.to(device).eval()
        self.generation_config = self.model.generation_config
        self.eos_ids = eos_ids_of(self.generation_config)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = min(self.eos_ids) if self.eos_ids else 0
        self.pad_id = int(pad)

    def render(self, request: GenRequest) -> tuple[str, bool]:
        return render_prompt(self.tokenizer, request)

    def generate(self, requests: Sequence[GenRequest], on_progress: ProgressFn | None = None) -> list[Generation]:
        if not requests:
            return []
        torch = self._torch
        rendered = [self.render(r) for r in requests]
        encoded = [self.tokenizer(text, add_special_tokens=special)["input_ids"] for text, special in rendered]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):  # left padding keeps every prompt's end aligned
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids):] = 1
        budget = max(r.max_new_tokens for r in requests)
        criteria = self._progress_criteria(width, on_progress)
        start = time.perf_counter()
        with torch.no_grad():
            output = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                generation_config=self.generation_config, max_new_tokens=budget, min_new_tokens=0,
                do_sample=False, num_beams=1, pad_token_id=self.pad_id,
                stopping_criteria=criteria)
        seconds = (time.perf_counter() - start) / len(requests)
        results = []
        for row, request in enumerate(requests):
            new = [int(t) for t in output[row, width:].tolist()][: request.max_new_tokens]
            results.append(self._finish(new, rendered[row][0], tuple(encoded[row]), seconds))
        return results

    def _finish(self, new: list[int], prompt_text: str, prompt_ids: tuple[int, ...], seconds: float) -> Generation:
        """Cut at the first eos id: what the model said, and whether it stopped by itself."""
        stop = next((i for i, t in enumerate(new) if t in self.eos_ids), None)
        kept = new if stop is None else new[: stop + 1]
        body = kept if stop is None else kept[:-1]
        text = self.tokenizer.decode(body, skip_special_tokens=False)
        return Generation(text=text, token_ids=tuple(kept), finish_reason="length" if stop is None else "stop",
                          stop_token_id=None if stop is None else kept[-1], seconds=seconds,
                          prompt_text=prompt_text, prompt_tokens=len(prompt_ids), prompt_ids=prompt_ids)

    def _progress_criteria(self, width: int, on_progress: ProgressFn | None) -> Any:
        from transformers import StoppingCriteria, StoppingCriteriaList

        backend = self

        class ReportProgress(StoppingCriteria):  # never stops; only reports partial text
            last = 0.0

            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                now = time.monotonic()
                steps = input_ids.shape[1] - width
                # Every early step, then at an interval: cheap, and a hang shows its last words.
                if on_progress is not None and (steps <= 16 or now - self.last >= PROGRESS_INTERVAL_S):
                    self.last = now
                    on_progress([backend.tokenizer.decode(row, skip_special_tokens=False)
                                 for row in input_ids[:, width:].tolist()])
                backend.on_step(input_ids[:, width:])
                return backend._torch.zeros(input_ids.shape[0], dtype=backend._torch.bool,
                                            device=input_ids.device)

        return StoppingCriteriaList([ReportProgress()])

    def score(self, requests: Sequence[ScoreRequest]) -> list[TokenLogprobs]:
        """Teacher-forced log-probabilities, one sequence at a time, in windows the model can see.

        A sequence longer than the model's context is cut into consecutive windows (the first
        token of each window has no logprob), as perplexity evaluations usually do.
        """
        torch = self._torch
        window = int(getattr(self.model.config, "max_position_embeddings", 0) or 1024)
        window = min(window, 1024)
        out = []
        for request in requests:
            if request.token_ids is not None:
                ids = list(request.token_ids)
                n_bytes = len(self.tokenizer.decode(ids).encode("utf-8"))
            else:
                assert request.text is not None
                ids = self.tokenizer(request.text)["input_ids"]
                n_bytes = len(request.text.encode("utf-8"))
            logprobs: list[float] = []
            top: list[tuple[tuple[int, float], ...]] = []
            probe: list[tuple[float, ...]] = []
            for start in range(0, len(ids), window):
                chunk = ids[start:start + window]
                with torch.no_grad():
                    logits = self.model(input_ids=torch.tensor([chunk], device=self.device)).logits[0]
                lp = torch.log_softmax(logits.float(), dim=-1)
                targets = torch.tensor(chunk[1:], device=lp.device)
                logprobs += lp[:-1].gather(1, targets[:, None])[:, 0].tolist()
                if request.top_k:
                    values, indices = lp.topk(request.top_k, dim=-1)
                    top += [tuple(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
                if request.probe_ids is not None:
                    for offset, row in enumerate(lp):
                        wanted = request.probe_ids[start + offset]
                        probe.append(tuple(row[list(wanted)].tolist()) if wanted else ())
            out.append(TokenLogprobs(token_ids=tuple(ids), logprobs=tuple(logprobs), top=tuple(top),
                                     probe=tuple(probe), n_bytes=n_bytes))
        return out

    def on_step(self, new_tokens: Any) -> None:
        """Called after every generated token with the new tokens so far; a hook for subclasses."""

    def close(self) -> None:
        del self.model
