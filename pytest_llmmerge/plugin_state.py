"""The run's shared state for the pytest wiring: settings, merge chain, model workers, progress.

Kept on ``config.stash`` and made on first use, so collection stays cheap and nothing heavy is
imported before an item needs it.  Like plugin.py this module is pytest wiring; the core
modules never import pytest.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .settings import Settings

if TYPE_CHECKING:
    from .runner import Runner
    from .variants import Chain


SETTINGS_KEY = pytest.StashKey[Settings]()
RUNNER_KEY = pytest.StashKey["Runner"]()
SUITE_ERRORS_KEY = pytest.StashKey[list[str]]()
CHAIN_KEY = pytest.StashKey["Chain"]()
CORPORA_KEY = pytest.StashKey[list[str]]()
CONTEXT_KEY = pytest.StashKey[Any]()
# Backends that can score text, so parity items run on them.
SCORING_BACKENDS = ("hf", "vllm")


def integrity_context(config: pytest.Config, settings: Settings) -> Any:
    """One Context per session, so every check shares the parsed files and headers."""
    context = config.stash.get(CONTEXT_KEY, None)
    if context is None:
        from .checkpoint import Checkpoint
        from .integrity import Context

        from .variants import MERGED

        context = Context(
            model=Checkpoint(get_chain(config).resolve(MERGED).path),
            base=Checkpoint(settings.base) if settings.base else None,
            allow_pickle=settings.allow_pickle,
            trust_remote_code=settings.trust_remote_code,
            adapters=settings.adapters,
            max_weight_change=settings.max_weight_change,
            audit_max_error=settings.audit_max_error,
            progress=progress_writer(config),
        )
        config.stash[CONTEXT_KEY] = context
    return context


def get_runner(config: pytest.Config) -> Runner:
    runner = config.stash.get(RUNNER_KEY, None)
    if runner is None:
        from .backends import resolve_spec
        from .runner import Runner
        from .settings import vllm_kwargs

        settings = config.stash[SETTINGS_KEY]
        # Under pytest-xdist every process has its own workers: share the cores between them.
        processes = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
        threads = max(1, (os.cpu_count() or 1) // processes) if processes > 1 else None

        chain = get_chain(config)

        def worker_kwargs(variant: str, backend: str) -> tuple[str, dict[str, Any]]:
            spec = chain.resolve(variant)
            kwargs: dict[str, Any] = {"model_path": str(spec.path), "adapters": [str(a) for a in spec.adapters],
                                      "dtype": compute_dtype(spec, settings), "device": settings.device,
                                      "threads": threads,
                                      "trust_remote_code": settings.trust_remote_code}
            if backend == "vllm":
                kwargs["tensor_parallel_size"] = settings.tensor_parallel_size
                if settings.kv_cache_gib is not None:
                    kwargs["kv_cache_bytes"] = int(settings.kv_cache_gib * 2**30)
                kwargs["extra"] = vllm_kwargs(settings)
            return resolve_spec(backend), kwargs

        runner = Runner(worker_kwargs=worker_kwargs, log_dir=_temp_dir(config, "llmmerge-workers-"),
                        batch_size=settings.batch_size, load_timeout_s=settings.load_timeout_s,
                        on_status=progress_writer(config))
        config.stash[RUNNER_KEY] = runner
    return runner


def compute_dtype(spec: Any, settings: Settings) -> str:
    """The concrete dtype a variant is computed in: its own (``name@dtype``), else --llm-dtype,
    else ("auto") the one its checkpoint (or, for ``name@as-other``, the other's) declares.  Concrete, so that two names for the same
    model in the same dtype share one worker."""
    from .checkpoint import Checkpoint

    if spec.dtype:
        return str(spec.dtype)
    if settings.dtype != "auto":
        return settings.dtype
    return Checkpoint(spec.dtype_of or spec.path).compute_dtype() or "auto"


def get_chain(config: pytest.Config) -> Chain:
    """The run's merge chain, made once; stages (and with --llm-build-merged the candidate) are
    built when an item first needs them, once, a failure reported to every item that needs them."""
    chain = config.stash.get(CHAIN_KEY, None)
    if chain is None:
        from .variants import Chain

        settings = config.stash[SETTINGS_KEY]
        # Under the pytest cache (kept between runs); with -p no:cacheprovider, a temp dir.
        cache_provider = getattr(config, "cache", None)
        cache = cache_provider.mkdir("llmmerge-merges") if cache_provider is not None else \
            _temp_dir(config, "llmmerge-merges-")
        chain = Chain(base=settings.base, adapters=settings.adapters,
                      candidate=None if settings.build_merged else settings.model,
                      given_stages=settings.stages, cache_dir=Path(cache), merge_dtype=settings.merge_dtype,
                      progress=progress_writer(config), merge_timeout_s=settings.merge_timeout_s,
                      candidate_out=settings.model if settings.build_merged else None)
        config.stash[CHAIN_KEY] = chain
    return chain


# pytest-timeout's limit on an item of ours when the user set none: past every deadline the
# plugin keeps itself (model loads, calls, cases), so it only ends an item stuck in a way no
# deadline covers.
OUTER_GUARD_MARGIN_S = 3600.0


def add_outer_deadlines(config: pytest.Config, settings: Settings, items: list[pytest.Item]) -> None:
    """Give each generated item a pytest-timeout limit when the user configured none (no
    --timeout, PYTEST_TIMEOUT or ini timeout): models loaded times the load timeout, plus a margin."""
    if config.pluginmanager.get_plugin("timeout") is None:
        return
    if config.getvalue("timeout") is not None or os.environ.get("PYTEST_TIMEOUT") or config.getini("timeout"):
        return
    for item in items:
        keys = getattr(item, "worker_keys", None)
        if keys is None or item.get_closest_marker("timeout") is not None:
            continue  # not one of ours, or the user's own limit
        item.add_marker(pytest.mark.timeout(settings.load_timeout_s * len(keys) + OUTER_GUARD_MARGIN_S))


TEMP_DIRS_KEY = pytest.StashKey[list[Path]]()


RUN_MARK = ".llmmerge-run"  # "<host> <pid>" in each temp dir of a run


def _temp_dir(config: pytest.Config, prefix: str) -> Path:
    """A directory this run owns and removes when it ends (see close_run).  A run killed before
    its end (SIGKILL, SIGTERM) cannot; the next run removes what it left, by its mark."""
    from .atomic import remove_dead_builds

    remove_dead_builds(Path(tempfile.gettempdir()), pattern=_RUN_DIR, mark=RUN_MARK)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))
    (path / RUN_MARK).write_text(f"{socket.gethostname()} {os.getpid()}\n", encoding="utf-8")
    config.stash.setdefault(TEMP_DIRS_KEY, []).append(path)
    return path


_RUN_DIR = re.compile(r"^llmmerge-(workers|merges)-(?P<pid>\d+)-")


SIGTERM_KEY = pytest.StashKey[Any]()


def unwind_on_sigterm(config: pytest.Config) -> None:
    """Let SIGTERM (how CI cancels a job) end the run the way Ctrl-C does, so workers close and
    the run's temp dirs go now, not at the next run.  Only where SIGTERM still has its default
    action: a handler the user or another plugin set is theirs.  A second SIGTERM kills at once."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return

    def interrupt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt("SIGTERM: stopping the run and removing its temporary directories")

    config.stash[SIGTERM_KEY] = signal.signal(signal.SIGTERM, interrupt)


def close_run(config: pytest.Config) -> None:
    """Close every worker, then remove the temp dirs the run made (worker logs: their tails are
    already in the failures that needed them; merges of a run without the pytest cache)."""
    runner = config.stash.get(RUNNER_KEY, None)
    if runner is not None:
        runner.close()
    for path in config.stash.get(TEMP_DIRS_KEY, []):
        shutil.rmtree(path, ignore_errors=True)
    if SIGTERM_KEY in config.stash and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, config.stash[SIGTERM_KEY])


def progress_writer(config: pytest.Config) -> Any:
    """Long steps (weight scans, merges, model loads) shown live on the terminal, quiet under -q.

    Written the way pytest's own live logging writes: the item's line is left open, each
    message goes on a line of its own after it, and the outcome word follows on the next line,
    so -v output never repeats the item's name.  Captured output is untouched.
    """
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or config.get_verbosity() < 0:
        return None
    capture = config.pluginmanager.get_plugin("capturemanager")

    def show(message: str) -> None:
        # Output capture redirects the terminal's file descriptor while an item runs; lift it
        # for the line, as pytest's live logging does, so progress never lands in a report.
        suspended = capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext()
        with suspended:
            writer = getattr(reporter, "_tw", None)
            at_line_start = writer is None or getattr(writer, "width_of_current_line", 0) == 0
            reporter.write(("" if at_line_start else "\n") + f"[llmmerge] {message}\n", flush=True)
    return show


def skip_unavailable(backend: str) -> None:
    from .backends import unavailable

    reason = unavailable(backend)
    if reason is not None:
        pytest.skip(reason)
