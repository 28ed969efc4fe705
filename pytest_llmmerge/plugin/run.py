"""LlmMergeRun: the one object a pytest session of pytest-llmmerge keeps.

It holds the settings, the merge chain, the model runner, the shared check context, the
corpora and suite errors the suites brought, and the schedule (item order, which workers the
items after this one still need).  It is the only value on ``config.stash``; hooks find it with
``LlmMergeRun.of(config)`` and hand it to the collectors and items they make.  Nothing heavy
is imported before an item needs it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

from .. import baseline
from ..atomic import remove_dead_builds
from ..backends import resolve_spec, unavailable
from ..baseline_compare import provenance_differences
from ..checkpoint import Checkpoint
from ..checks import GROUPS
from ..checks.audit import made_diagnosis
from ..checks.base import Context
from ..handles import VariantHandle
from ..merge_diagnosis import diagnose
from ..option_specs import OPTIONS
from ..provenance import provenance
from ..report import FINDINGS, versions
from ..runner import Runner
from ..settings import Settings, SettingsError, describe, resolve_settings, stop_flags, vllm_kwargs
from ..suite import default_suite, looks_like_suite
from ..variants import ADAPTER, MERGED, REFERENCE, Chain, VariantUnavailable
from .baseline_items import BaselineChecks, BaselineItem
from .case_items import CaseItem, DefaultSuite, SuiteFile
from .check_items import CheckGroup
from .compare_items import AgreementChecks, ComparisonItem, ParityChecks
from .options import add_markers
from .reporting import Reporting

RUN_MARK = ".llmmerge-run"  # "<host> <pid>" in each temp dir of a run
_RUN_DIR = re.compile(r"^llmmerge-(workers|merges)-(?P<pid>\d+)-")
# pytest-timeout's limit on an item of ours when the user set none: past every deadline the
# plugin keeps itself (model loads, calls, cases), so it only ends an item stuck in a way no
# deadline covers.
OUTER_GUARD_MARGIN_S = 3600.0


class LlmMergeRun:
    """One pytest session's settings, chain, runner, check context and schedule."""

    _KEY = pytest.StashKey["LlmMergeRun"]()

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.suite_errors: list[str] = []
        self.corpora: list[str] = []  # texts the suites add to the parity corpus
        self.suite_files: list[Path] = []
        self._temp_dirs: list[Path] = []
        self._context: Context | None = None
        self._sigterm: Any = None
        self.chain: Chain | None = None
        self.runner: Runner | None = None
        self._verdicts: dict[int | None, str] = {}
        self.generations: dict[str, Any] = {}  # suite case node id -> its Generation, for baseline items
        self.baseline: dict[str, Any] | None = None  # --llm-baseline's baseline.json
        self._differences: dict[bool, list[str]] = {}

    # -- life cycle ------------------------------------------------------------------------
    @classmethod
    def start(cls, config: pytest.Config) -> LlmMergeRun:
        """Resolve the settings (a bad one is a usage error naming its source) and, when the
        plugin is on, make the chain and the runner (cheap: nothing loads until an item asks)."""
        add_markers(config)
        ini_dir = config.inipath.parent if config.inipath else config.rootpath
        try:
            settings = resolve_settings(
                cli={spec.dest: config.getoption(f"llm_{spec.dest}") for spec in OPTIONS},
                env=os.environ, ini=config.getini, invocation_dir=config.invocation_params.dir, ini_dir=ini_dir)
        except SettingsError as exc:
            config.stash[cls._KEY] = cls(config, Settings())  # off: unconfigure still finds a run
            raise pytest.UsageError(f"pytest-llmmerge: {exc}") from None
        run = cls(config, settings)
        config.stash[cls._KEY] = run
        if settings.baseline is not None:
            try:
                run.baseline = baseline.load(settings.baseline)
            except baseline.BaselineError as exc:
                raise pytest.UsageError(f"pytest-llmmerge: --llm-baseline: {exc}") from None
        if settings.enabled:
            config.pluginmanager.register(Reporting(run), "llmmerge-reporting")
            run._unwind_on_sigterm()
            run.chain = run._make_chain()
            run.runner = run._make_runner()
        return run

    @classmethod
    def of(cls, config: pytest.Config) -> LlmMergeRun:
        return config.stash[cls._KEY]

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def close(self) -> None:
        """Close every worker, then remove the temp dirs the run made (worker logs: their tails
        are already in the failures that needed them; merges of a run without the pytest cache)."""
        if self.runner is not None:
            self.runner.close()
        for path in self._temp_dirs:
            shutil.rmtree(path, ignore_errors=True)
        if self._sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._sigterm)

    def _unwind_on_sigterm(self) -> None:
        """Let SIGTERM (how CI cancels a job) end the run the way Ctrl-C does, so workers close
        and the run's temp dirs go now, not at the next run.  Only where SIGTERM still has its
        default action: a handler the user or another plugin set is theirs.  A second SIGTERM
        kills at once."""
        if threading.current_thread() is not threading.main_thread() or \
                signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
            return

        def interrupt(signum: int, frame: object) -> None:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            raise KeyboardInterrupt("SIGTERM: stopping the run and removing its temporary directories")

        self._sigterm = signal.signal(signal.SIGTERM, interrupt)

    def _temp_dir(self, prefix: str) -> Path:
        """A directory this run owns and removes when it ends (see close).  A run killed before
        its end (SIGKILL) cannot; the next run removes what it left, by its mark."""
        remove_dead_builds(Path(tempfile.gettempdir()), pattern=_RUN_DIR, mark=RUN_MARK)
        path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))
        (path / RUN_MARK).write_text(f"{socket.gethostname()} {os.getpid()}\n", encoding="utf-8")
        self._temp_dirs.append(path)
        return path

    def _make_chain(self) -> Chain:
        """Stages (and with --llm-build-merged the candidate) are built when an item first needs
        them, once, a failure reported to every item that needs them."""
        settings = self.settings
        # Under the pytest cache (kept between runs); with -p no:cacheprovider, a temp dir.
        cache_provider = getattr(self.config, "cache", None)
        cache = cache_provider.mkdir("llmmerge-merges") if cache_provider is not None else \
            self._temp_dir("llmmerge-merges-")
        return Chain(base=settings.base, adapters=settings.adapters,
                     candidate=None if settings.build_merged else settings.model,
                     given_stages=settings.stages, cache_dir=Path(cache), merge_dtype=settings.merge_dtype,
                     progress=self.say, merge_timeout_s=settings.merge_timeout_s,
                     candidate_out=settings.model if settings.build_merged else None)

    def _make_runner(self) -> Runner:
        settings, chain = self.settings, self.the_chain
        # Under pytest-xdist every process has its own workers: share the cores between them.
        processes = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
        threads = max(1, (os.cpu_count() or 1) // processes) if processes > 1 else None

        def worker_kwargs(variant: str, backend: str) -> tuple[str, dict[str, Any]]:
            spec = chain.resolve(variant)
            kwargs: dict[str, Any] = {"model_path": str(spec.path), "adapters": [str(a) for a in spec.adapters],
                                      "dtype": self.compute_dtype(spec), "device": settings.device,
                                      "threads": threads, "trust_remote_code": settings.trust_remote_code}
            if backend in ("vllm", "vllm-serve"):
                kwargs["tensor_parallel_size"] = settings.tensor_parallel_size
                if settings.kv_cache_gib is not None:
                    kwargs["kv_cache_bytes"] = int(settings.kv_cache_gib * 2**30)
            if backend == "vllm":
                kwargs["extra"] = vllm_kwargs(settings)
            elif backend == "vllm-serve":
                kwargs["serve_args"] = list(settings.serve_args)
                # Inside the worker's load deadline, so the server's own reason is the one reported.
                kwargs["ready_timeout_s"] = settings.load_timeout_s * 0.95
            return resolve_spec(backend), kwargs

        return Runner(worker_kwargs=worker_kwargs, log_dir=self._temp_dir("llmmerge-workers-"),
                      batch_size=settings.batch_size, load_timeout_s=settings.load_timeout_s, on_status=self.say)

    # -- what items use ----------------------------------------------------------------------
    @property
    def the_chain(self) -> Chain:
        assert self.chain is not None, "the plugin is off: no chain"
        return self.chain

    @property
    def the_runner(self) -> Runner:
        assert self.runner is not None, "the plugin is off: no runner"
        return self.runner

    @property
    def the_baseline(self) -> dict[str, Any]:
        assert self.baseline is not None, "no --llm-baseline"
        return self.baseline

    def provenance(self, suite_paths: Any) -> dict[str, Any]:
        """This run's provenance (provenance.py), suites named relative to the root as node ids are."""
        settings = self.settings
        assert settings.model is not None  # settings require --llm-model with a baseline
        return provenance(settings.model, dtype=settings.dtype, device=settings.device, backends=settings.backends,
                          suites=suite_paths, corpus=settings.corpus, root=self.config.rootpath)

    def baseline_differences(self, *, suites: bool = False) -> list[str]:
        """How this run's provenance differs from the baseline's (with the suites this process
        collected, or without them: the header is printed before collection)."""
        if self.baseline is None:
            return []
        if suites not in self._differences:
            saved = dict(self.baseline["provenance"])
            now = self.provenance(self.suite_files if suites else ())
            if not suites:
                saved["suites"] = now["suites"] = {}
            self._differences[suites] = provenance_differences(saved, now)
        return self._differences[suites]

    def check_context(self) -> Context:
        """One Context per session, so every check shares the parsed files and headers.  Made
        by the first check item: with --llm-build-merged, the candidate is built then."""
        if self._context is None:
            settings = self.settings
            offline, served = stop_flags(settings)
            self._context = Context(
                model=Checkpoint(self.the_chain.resolve(MERGED).path),
                base=Checkpoint(settings.base) if settings.base else None,
                allow_pickle=settings.allow_pickle, trust_remote_code=settings.trust_remote_code,
                adapters=settings.adapters, max_weight_change=settings.max_weight_change,
                audit_max_error=settings.audit_max_error, progress=self.say,
                offline_stop_flags=offline, served_stop_flags=served)
        return self._context

    def merge_verdict(self, stage: int | None = None) -> str:
        """The merge diagnosis's verdict in one line, for a failure that blames the merge: of
        stage k against stage k-1 and adapter k, or (None) of the candidate against the base and
        every adapter (the audit item's when it ran, with the tensors no adapter updates; else of
        the adapted weights alone).  Never raises: a diagnosis that cannot run says why instead."""
        chain = self.the_chain
        key = None if stage is None or stage == chain.n == 1 else stage
        if key not in self._verdicts:
            what = "the merge" if key is None else f"stage {key}"
            try:
                if key is None:
                    # The audit item's, when it ran; else the adapted weights alone (no full weight scan).
                    ctx = self.check_context()
                    found = made_diagnosis(ctx) or diagnose(ctx.model, ctx.require_base(), ctx.adapters)
                else:
                    found = diagnose(Checkpoint(chain.stage(key)), Checkpoint(chain.stage(key - 1)),
                                     (chain.adapters[key - 1],))
                verdict = f"merge diagnosis of {what}: {found.summary()}"
            except Exception as exc:  # noqa: BLE001 (a failure it explains must still be reported)
                verdict = f"merge diagnosis of {what} could not run: {type(exc).__name__}: {exc}"
            self._verdicts[key] = verdict
        return self._verdicts[key]

    def compute_dtype(self, spec: Any) -> str:
        """The concrete dtype a variant is computed in: its own (``name@dtype``), else
        --llm-dtype, else ("auto") the one its checkpoint (or, for ``name@as-other``, the
        other's) declares.  Concrete, so that two names for the same model in the same dtype
        share one worker."""
        if spec.dtype:
            return str(spec.dtype)
        if self.settings.dtype != "auto":
            return self.settings.dtype
        return Checkpoint(spec.dtype_of or spec.path).compute_dtype() or "auto"

    def say(self, message: str) -> None:
        """Long steps (weight scans, merges, model loads) shown live on the terminal, quiet
        under -q.  Written the way pytest's own live logging writes: the item's line is left
        open, each message goes on a line of its own after it, and the outcome word follows on
        the next line, so -v output never repeats the item's name.  Captured output is untouched."""
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None or self.config.get_verbosity() < 0:
            return
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        # Output capture redirects the terminal's file descriptor while an item runs; lift it
        # for the line, as pytest's live logging does, so progress never lands in a report.
        suspended = capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext()
        with suspended:
            writer = getattr(reporter, "_tw", None)
            at_line_start = writer is None or getattr(writer, "width_of_current_line", 0) == 0
            reporter.write(("" if at_line_start else "\n") + f"[llmmerge] {message}\n", flush=True)

    @staticmethod
    def skip_unavailable(backend: str) -> None:
        reason = unavailable(backend)
        if reason is not None:
            pytest.skip(reason)

    def variant_handle(self, variant: str) -> Any:
        """What the llm_* fixtures give a user's test: the variant's model and a client per backend."""
        if not self.enabled:
            pytest.skip("pytest-llmmerge is off: give --llm-model, or --llm-base with --llm-adapter")
        if variant not in self.the_chain.available():
            pytest.skip(f"variant {variant!r} is not available in this run (it needs --llm-base, and --llm-adapter "
                        "for the adapter-only variant)")
        try:
            return VariantHandle(variant, self.the_chain.resolve(variant), self.the_runner)
        except VariantUnavailable as exc:
            pytest.skip(f"variant {variant!r}: {exc}")

    def parametrize_variants(self, metafunc: pytest.Metafunc) -> None:
        """llm_variant over the variants this run can give (every name when the plugin is off,
        so that each test skips with the reason)."""
        if "llm_variant" in metafunc.fixturenames:
            names = self.the_chain.available() if self.enabled else [REFERENCE, ADAPTER, MERGED]
            metafunc.parametrize("llm_variant", [n for n in (REFERENCE, ADAPTER, MERGED) if n in names],
                                 indirect=True, scope="session")

    # -- collection and schedule ------------------------------------------------------------------
    def report_header(self) -> list[str] | None:
        if not self.enabled:
            return None
        found = versions()
        lines = [*describe(self.settings), "llmmerge versions: " + ", ".join(f"{k} {v}" for k, v in found.items())]
        if self.baseline is not None:
            differences = self.baseline_differences()
            lines.append(f"llmmerge baseline: {self.settings.baseline} (saved {self.baseline['created']}): "
                         + (f"{len(differences)} provenance difference(s)" if differences else "same provenance"))
            lines += [f"  {d}" for d in differences]
        return lines

    def collect_file(self, file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
        """YAML suites: named on the command line, inside a directory named there, or matching a glob."""
        if not self.enabled or file_path.suffix not in (".yaml", ".yml") or not self._is_suite(file_path):
            return None
        return SuiteFile.from_parent(parent, path=file_path, run=self)

    def _is_suite(self, file_path: Path) -> bool:
        if any(fnmatch.fnmatch(file_path.name, pattern) for pattern in self.settings.suite_globs):
            return True
        for arg in self.config.args:
            given = (self.config.invocation_params.dir / arg.split("::")[0]).resolve()
            if given == file_path.resolve():
                return True
            if given.is_dir() and given in file_path.resolve().parents:
                return looks_like_suite(file_path)
        return False

    def add_items(self, session: pytest.Session, items: list[pytest.Item]) -> None:
        """Add the checkpoint's items, then order case items so each worker loads its model once.

        Runs before -k/-m deselection, so users select generated items like any other."""
        if not self.enabled:
            return
        if self.suite_errors:
            raise pytest.UsageError("pytest-llmmerge: invalid suite\n" + "\n".join(self.suite_errors))
        settings = self.settings
        # The merge diagnosis runs whenever there are adapters to diagnose the candidate against.
        groups = [group for group in GROUPS if group != "audit" or (settings.base is not None and settings.adapters)]
        path = settings.model or settings.base or self.config.rootpath
        items[:0] = [item for group in groups for item in _generated(CheckGroup.from_parent(
            session, name=group, nodeid=group, group=group, path=path, run=self))]
        # The built-in suite runs only when no suite was given: a suite whose cases all name
        # backends this run does not use still replaces it.
        if not self.suite_files and not any(isinstance(item, CaseItem) for item in items):
            items.extend(_generated(DefaultSuite.from_parent(session, name="default-suite", nodeid="default-suite",
                                                             suite=default_suite(), run=self)))
        cases = [item for item in items if isinstance(item, CaseItem)]
        items.extend(_generated(BaselineChecks.from_parent(session, name="baseline", nodeid="baseline", run=self,
                                                           cases=cases)))
        items.extend(_generated(ParityChecks.from_parent(session, name="parity", nodeid="parity", run=self)))
        items.extend(_generated(AgreementChecks.from_parent(session, name="agreement", nodeid="agreement", run=self)))
        order = {key: i for i, key in enumerate(dict.fromkeys(i.worker_key for i in items if isinstance(i, CaseItem)))}
        # A case's baseline item right after its worker's cases, while that model is loaded.
        def place(i: pytest.Item) -> tuple[int, int, int]:
            if isinstance(i, CaseItem):
                return 1, order[i.worker_key], 0
            if isinstance(i, BaselineItem):
                return 1, order.get(i.worker_key, len(order)) if i.worker_key else len(order), 1
            return (2, 0, 0) if isinstance(i, ComparisonItem) else (0, 0, 0)

        items.sort(key=place)
        self._add_outer_deadlines(items)

    def _add_outer_deadlines(self, items: list[pytest.Item]) -> None:
        """Give each generated item a pytest-timeout limit when the user configured none (no
        --timeout, PYTEST_TIMEOUT or ini timeout): models loaded times the load timeout, plus a margin."""
        config = self.config
        if config.pluginmanager.get_plugin("timeout") is None:
            return
        if config.getvalue("timeout") is not None or os.environ.get("PYTEST_TIMEOUT") or config.getini("timeout"):
            return
        for item in items:
            keys = getattr(item, "worker_keys", None)
            if keys is None or item.get_closest_marker("timeout") is not None:
                continue  # not one of ours, or the user's own limit
            item.add_marker(pytest.mark.timeout(self.settings.load_timeout_s * len(keys) + OUTER_GUARD_MARGIN_S))

    def later_items(self, item: pytest.Item) -> list[pytest.Item]:
        items = item.session.items
        return items[items.index(item) + 1:] if item in items else []

    def workers_needed_after(self, item: pytest.Item) -> set[Any] | None:
        """The workers the items after `item` use (None: a user's test follows, which may ask
        any variant for its model, so every worker stays)."""
        later = self.later_items(item)
        if any(not hasattr(i, "worker_keys") for i in later):
            return None
        return {key for i in later for key in i.worker_keys}  # type: ignore[attr-defined]

    def after_item(self, item: pytest.Item) -> None:
        """Close workers no later item needs, so a chain's many variants never sit in memory together."""
        if self.runner is None or not self.runner.workers:
            return
        needed = self.workers_needed_after(item)
        if needed is not None:
            self.runner.keep_only(needed)

    @staticmethod
    def carry_findings(item: pytest.Item, report: pytest.TestReport) -> None:
        """A check item's findings ride on its report (plain dicts: pytest-xdist carries a
        report's attributes to the controller), not as a user property JUnit XML would print."""
        findings = getattr(item, "findings", None)
        if findings:
            setattr(report, FINDINGS, findings)


def _generated(collector: pytest.Collector) -> list[pytest.Item]:
    """Collect a generated collector and report it, so pytest counts its items as collected."""
    items = [i for i in collector.collect() if isinstance(i, pytest.Item)]
    result: list[pytest.Item | pytest.Collector] = list(items)
    report = pytest.CollectReport(collector.nodeid, "passed", None, result)
    collector.config.hook.pytest_collectreport(report=report)
    return items

