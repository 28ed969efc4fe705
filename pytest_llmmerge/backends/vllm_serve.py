"""vLLM served: the checkpoint behind `vllm serve` with the deployment's own flags, asked through
the OpenAI-compatible API the way its clients ask.

The backend starts the installed vllm's `vllm serve` (see :mod:`.vllm_cli`) on a free local
port, waits until `/health` answers, and sends each suite case greedily (temperature 0,
`max_tokens` = the case's budget): chat cases to `/v1/chat/completions`, so the *server*
renders the chat template (with `--chat-template` if the deployment passes one), raw prompts
to `/v1/completions`.  The server reports the token ids it produced (`return_token_ids`), its
finish reason and stop reason, which map onto the same :class:`Generation` as the offline
engine's; the text is decoded from those ids with the checkpoint's tokenizer, as for every
other backend, so each suite expectation reads the same thing.

The server runs in the worker's process group (the worker is its own session): a missed
deadline kills the group, server and engine core with it, and the worker's lifeline does the
same when pytest dies.  `close` stops it with SIGTERM and kills what is left after a grace
period.  Requests stream, so a case killed at its deadline still shows what it had produced.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint
from ..stop_sets import flags_from_serve_args
from .base import BackendError, Generation, GenRequest, ProgressFn, ScoreRequest, TokenLogprobs
from .hf import PROGRESS_INTERVAL_S
from .vllm import finished_generation
from .vllm_sizing import kv_cache_bytes_for, lora_rank_limit

HOST = "127.0.0.1"
# How long the server gets to finish its requests and stop its engine after SIGTERM.
STOP_GRACE_S = 20.0
# The name requests use for the adapter when the server serves the base with a LoRA on top.
ADAPTER_NAME = "llmmerge-adapter"


@dataclass
class _Stream:
    """One request's answer as it streams in."""

    token_ids: list[int] = field(default_factory=list)
    prompt_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    stop_reason: int | str | None = None


def serve_command() -> list[str]:
    """`vllm serve` of the vllm installed beside this Python: its console script where the
    package's metadata lets it run, else the same CLI through :mod:`.vllm_cli` (the CPU build)."""
    import importlib.metadata

    script = Path(sys.executable).with_name("vllm")
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        script = Path("/nonexistent")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script), "serve"]
    return [sys.executable, "-m", "pytest_llmmerge.backends.vllm_cli", "serve"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


class VLLMServeBackend:
    """A checkpoint behind a `vllm serve` process of its own, with at most one LoRA adapter.

    `serve_args` are the deployment's flags, passed last so that they override the plugin's
    (`--dtype`, `--max-model-len`, `--kv-cache-memory-bytes`, ...); `--host` and `--port` are
    the plugin's.  `start_seconds` is how long the server took to answer `/health`.
    """

    name = "vllm-serve"

    def __init__(self, model_path: str, *, dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False,
                 adapters: Sequence[str] = (), threads: int | None = None, max_model_len: int | None = None,
                 kv_cache_bytes: int | None = None, tensor_parallel_size: int = 1, serve_args: Sequence[str] = (),
                 ready_timeout_s: float = 900.0) -> None:
        adapters = [str(a) for a in adapters]
        if len(adapters) > 1:
            raise ValueError(f"the vllm-serve backend serves at most one LoRA adapter, got {len(adapters)} "
                             f"({', '.join(adapters)}): merge all but the last into the model first")
        from transformers import AutoTokenizer

        flags = flags_from_serve_args(serve_args)
        checkpoint = Checkpoint(Path(model_path))
        resolved_dtype = (checkpoint.config_dtype or "auto").removeprefix("torch.") if dtype == "auto" else dtype
        on_cpu = device.split(":")[0] == "cpu"
        self.port = free_port()
        argv = [*serve_command(), model_path, "--host", HOST, "--port", str(self.port), "--dtype", resolved_dtype,
                "--seed", "0", "--tensor-parallel-size", str(tensor_parallel_size), "--disable-uvicorn-access-log"]
        if trust_remote_code:
            argv.append("--trust-remote-code")
        if max_model_len is not None:
            argv += ["--max-model-len", str(max_model_len)]
        if on_cpu:
            argv.append("--enforce-eager")
            if kv_cache_bytes is None and os.environ.get("VLLM_CPU_KVCACHE_SPACE", "") == "":
                config = {**checkpoint.config, **checkpoint.text_config}
                kv_cache_bytes = kv_cache_bytes_for(config, resolved_dtype, max_model_len)
        if kv_cache_bytes is not None:
            argv += ["--kv-cache-memory-bytes", str(int(kv_cache_bytes))]
        if adapters:
            argv += ["--enable-lora", "--max-loras", "1", "--max-lora-rank", str(lora_rank_limit(adapters[0])),
                     "--lora-modules", f"{ADAPTER_NAME}={adapters[0]}"]
        argv += list(serve_args)

        env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1"}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        if not on_cpu and device.startswith("cuda:"):
            env.setdefault("CUDA_VISIBLE_DEVICES", device.split(":", 1)[1])
        self.tokenizer: Any = AutoTokenizer.from_pretrained(flags.tokenizer or model_path,
                                                            trust_remote_code=trust_remote_code)
        self.argv = argv
        started = time.perf_counter()
        # The worker's stdout is its log: the server's lines land there, and its tail is shown
        # when loading or a request fails.
        print("llmmerge: starting " + " ".join(self.argv), flush=True)
        self.server: subprocess.Popen[bytes] | None = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, env=env)
        try:
            self._wait_ready(ready_timeout_s)
            self.model = ADAPTER_NAME if adapters else self._served_name()
        except BaseException:
            self.close()
            raise
        self.start_seconds = time.perf_counter() - started
        print(f"llmmerge: vllm serve answered /health after {self.start_seconds:.1f} s", flush=True)

    # --- the server's life ----------------------------------------------------------------------

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.server is not None
            code = self.server.poll()
            if code is not None:
                raise BackendError(f"vllm serve exited with code {code} before it was ready (its log is the "
                                   "worker log below)")
            try:
                status, _ = self._get("/health", timeout_s=2.0)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BackendError(f"vllm serve did not answer /health within {timeout_s:g} s")
            time.sleep(0.25)

    def _served_name(self) -> str:
        status, body = self._get("/v1/models", timeout_s=30.0)
        models = json.loads(body).get("data") if status == 200 else None
        if not models:
            raise BackendError(f"vllm serve lists no model at /v1/models (HTTP {status})")
        return str(models[0]["id"])

    def _get(self, path: str, timeout_s: float) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=timeout_s)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def close(self) -> None:
        """Stop the server (SIGTERM: it shuts its engine down), then kill whatever of it is left."""
        server, self.server = getattr(self, "server", None), None
        if server is None:
            return
        import psutil  # type: ignore[import-untyped]  # a dependency of vllm

        try:
            family = psutil.Process(server.pid).children(recursive=True)
        except psutil.Error:
            family = []
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        for process in family:
            try:
                process.kill()
            except psutil.Error:
                pass

    # --- generation -----------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenRequest], on_progress: ProgressFn | None = None) -> list[Generation]:
        """Every request at once, as concurrent streamed API calls (the server batches them)."""
        if not requests:
            return []
        streams = [_Stream() for _ in requests]
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(requests), thread_name_prefix="llmmerge-serve") as pool:
            futures = [pool.submit(self._stream, request, stream) for request, stream in zip(requests, streams)]
            while wait(futures, timeout=PROGRESS_INTERVAL_S).not_done:
                if on_progress is not None:
                    on_progress([self.tokenizer.decode(list(s.token_ids), skip_special_tokens=False)
                                 for s in streams])
            for future in futures:
                future.result()  # raises the first request's error
        seconds = (time.perf_counter() - started) / len(requests)
        return [finished_generation(self.tokenizer, s.token_ids, s.finish_reason, s.stop_reason,
                                    self.tokenizer.decode(list(s.prompt_ids), skip_special_tokens=False),
                                    s.prompt_ids, seconds)
                for s in streams]

    def _stream(self, request: GenRequest, stream: _Stream) -> None:
        body: dict[str, Any] = {"model": self.model, "temperature": 0.0, "max_tokens": request.max_new_tokens,
                                "stream": True, "return_token_ids": True}
        if request.messages is not None:
            path = "/v1/chat/completions"
            body["messages"] = [{"role": role, "content": content} for role, content in request.messages]
        else:
            path = "/v1/completions"
            body["prompt"] = request.prompt
        connection = http.client.HTTPConnection(HOST, self.port)
        try:
            connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status != 200:
                raise BackendError(f"vllm serve refused {path} (HTTP {response.status}): "
                                   f"{_error_text(response.read())}")
            for raw in response:
                line = raw.decode("utf-8", errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                self._take(json.loads(data), stream)
        finally:
            connection.close()
        if stream.finish_reason is None:
            raise BackendError(f"vllm serve closed the {path} stream without a finish reason after "
                               f"{len(stream.token_ids)} tokens")

    @staticmethod
    def _take(chunk: dict[str, Any], stream: _Stream) -> None:
        if "error" in chunk:
            raise BackendError(f"vllm serve reported an error mid-stream: {_error_text(json.dumps(chunk).encode())}")
        if chunk.get("prompt_token_ids"):  # chat: on the first chunk
            stream.prompt_ids = tuple(int(t) for t in chunk["prompt_token_ids"])
        for choice in chunk.get("choices") or ():
            if choice.get("prompt_token_ids"):  # completions: on the choice
                stream.prompt_ids = tuple(int(t) for t in choice["prompt_token_ids"])
            stream.token_ids += [int(t) for t in choice.get("token_ids") or ()]
            if choice.get("finish_reason") is not None:
                stream.finish_reason = str(choice["finish_reason"])
                stream.stop_reason = choice.get("stop_reason")

    def score(self, requests: Sequence[ScoreRequest]) -> list[TokenLogprobs]:
        raise BackendError("the vllm-serve backend runs suite cases only; parity and agreement score on the hf "
                           "and vllm backends")


def _error_text(body: bytes) -> str:
    """The message of an OpenAI-style error body, else the body itself, cut short."""
    text = body.decode("utf-8", errors="replace")
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        return text[:500]
    error = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
    message = error.get("message") if isinstance(error, dict) else None
    return str(message or text)[:500]
