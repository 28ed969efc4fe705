"""Every option of the plugin, described once: its flag, ini key, environment variable, type,
help text and bounds.  The pytest wiring, the README's options table, the settings resolver
and the tests all read this table, so they cannot drift."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

OptionKind = Literal["path", "paths", "bool", "int", "float", "str", "names", "args"]


@dataclass(frozen=True)
class OptionSpec:
    """One setting with its three spellings: CLI flag, ini key and environment variable."""

    dest: str
    flag: str
    ini: str
    env: str
    kind: OptionKind
    help: str
    metavar: str | None = None
    # Past this a number is a typo, and would fail late (a wait of 1e46 s overflows the clock).
    maximum: float | None = None


A_WEEK_S = 7 * 24 * 3600.0

OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec(
        "model", "--llm-model", "llm_model", "LLMMERGE_MODEL", "path",
        "checkpoint directory under test (the merged model); turns the plugin's items on",
        "PATH",
    ),
    OptionSpec(
        "base", "--llm-base", "llm_base", "LLMMERGE_BASE", "path",
        "base model directory the checkpoint was fine-tuned from; checks that compare with "
        "it are skipped without it",
        "PATH",
    ),
    OptionSpec(
        "adapters", "--llm-adapter", "llm_adapters", "LLMMERGE_ADAPTERS", "paths",
        "LoRA adapter directory; repeat in merge order (env: separated by the OS path "
        "separator, ini: one per line)",
        "PATH",
    ),
    OptionSpec(
        "stages", "--llm-stage", "llm_stages", "LLMMERGE_STAGES", "paths",
        "your own merged checkpoint after adapter k, repeat in order for k = 1..n-1 (stage n is "
        "--llm-model); stages not given are built",
        "PATH",
    ),
    OptionSpec(
        "build_merged", "--llm-build-merged", "llm_build_merged", "LLMMERGE_BUILD_MERGED", "bool",
        "build the merged model from --llm-base and --llm-adapter (into --llm-model's path when given, "
        "which must not exist yet) and gate it",
    ),
    OptionSpec(
        "merge_dtype", "--llm-merge-dtype", "llm_merge_dtype", "LLMMERGE_MERGE_DTYPE", "str",
        "dtype the built merges are computed in: float32 (default), bfloat16, float16", "DTYPE",
    ),
    OptionSpec(
        "corpus", "--llm-corpus", "llm_corpus", "LLMMERGE_CORPUS", "path",
        "text file (documents separated by blank lines) for perplexity checks against the reference; "
        "default: the built-in English and Chinese corpus", "PATH",
    ),
    OptionSpec(
        "ppl_rtol", "--llm-ppl-rtol", "llm_ppl_rtol", "LLMMERGE_PPL_RTOL", "float",
        "fixed max relative perplexity difference, merged vs adapter-only and HF vs vLLM (default: calibrated "
        "on the measured noise, see --llm-noise-factor)", "RTOL",
    ),
    OptionSpec(
        "kl_max", "--llm-kl-max", "llm_kl_max", "LLMMERGE_KL_MAX", "float",
        "fixed max mean per-token KL from the float32 truth, in nats (default: calibrated, max(1e-3, "
        "noise factor x the KL that the dtype and backend alone cause))", "NATS",
    ),
    OptionSpec(
        "max_ppl_ratio", "--llm-max-ppl-ratio", "llm_max_ppl_ratio", "LLMMERGE_MAX_PPL_RATIO", "float",
        "max perplexity (or bits per byte) of the merged model over the base's on general text: a "
        "forgetting limit (default: off; the merge is judged against the unmerged fine-tune instead)", "RATIO",
    ),
    OptionSpec(
        "noise_factor", "--llm-noise-factor", "llm_noise_factor", "LLMMERGE_NOISE_FACTOR", "float",
        "calibrated limits are max(floor, F x the noise measured in the run) for the KL and the "
        "log-perplexity shift from the float32 truth (default 10)", "F",
    ),
    OptionSpec(
        "top_k", "--llm-top-k", "llm_top_k", "LLMMERGE_TOP_K", "int",
        "greedy outputs that differ pass when, at the first divergence, each side's token is in the "
        "other's top k (default 5)", "K", maximum=1_000_000,
    ),
    OptionSpec(
        "max_weight_change", "--llm-max-weight-change", "llm_max_weight_change", "LLMMERGE_MAX_WEIGHT_CHANGE",
        "float", "fail weights::change_vs_base when a layer's ||W - W_base|| / ||W_base|| exceeds this "
        "(default: off, the table is only reported)", "RATIO",
    ),
    OptionSpec(
        "audit_merge", "--llm-audit-merge", "llm_audit_merge", "LLMMERGE_AUDIT_MERGE", "bool",
        "require audit::merge_diagnosis (which runs whenever --llm-base and --llm-adapter are given): a usage "
        "error without them, so a CI job cannot lose the diagnosis to a missing option",
    ),
    OptionSpec(
        "audit_max_error", "--llm-audit-max-error", "llm_audit_max_error", "LLMMERGE_AUDIT_MAX_ERROR", "float",
        "share of the adapters' fp32 update ||W_candidate - (W_base + dW)|| / ||dW|| a weight rounded beyond its "
        "storage dtype may lose and only warn (MRG012; above it: MRG001; default 0.001)", "RATIO",
    ),
    OptionSpec(
        "bisect", "--llm-bisect", "llm_bisect", "LLMMERGE_BISECT", "bool",
        "when a suite case fails on the merged model of a chain, find the first stage that fails it by "
        "bisection (about log2(n) builds, cached) and name that stage's adapter; when the base fails it too, "
        "first search for a passing stage (stage 1, then midpoints) and name the stage that broke it again",
    ),
    OptionSpec(
        "report", "--llm-report", "llm_report", "LLMMERGE_REPORT", "path",
        "write the run's report as JSON to PATH (schema: pytest_llmmerge/report.schema.json)", "PATH",
    ),
    OptionSpec(
        "report_md", "--llm-report-md", "llm_report_md", "LLMMERGE_REPORT_MD", "path",
        "write the report as Markdown to PATH, and append it to $GITHUB_STEP_SUMMARY when that is set", "PATH",
    ),
    OptionSpec(
        "baseline_save", "--llm-baseline-save", "llm_baseline_save", "LLMMERGE_BASELINE_SAVE", "path",
        "write the run's baseline to DIR/baseline.json (schema: pytest_llmmerge/baseline.schema.json): every suite "
        "case's output ids and text, finish reason and stop token per variant and backend, the parity and "
        "weight figures, and the provenance (versions, dtype, device, hashes of the tokenizer files, chat template, "
        "suites, corpus and tensor headers); small enough to commit with the release", "DIR",
    ),
    OptionSpec(
        "baseline", "--llm-baseline", "llm_baseline", "LLMMERGE_BASELINE", "path",
        "compare the run with a release's baseline (DIR/baseline.json, written by --llm-baseline-save): adds "
        "baseline::<case>[<variant>-<backend>] items (a case that stopped must still stop, its token count must not "
        "grow past --llm-baseline-growth, greedy outputs equal or a near tie where they part) and "
        "baseline::perplexity[<variant>-<backend>] (drift calibrated as parity is); provenance differences are "
        "listed at the top of the run and in each failure", "DIR",
    ),
    OptionSpec(
        "baseline_strict", "--llm-baseline-strict", "llm_baseline_strict", "LLMMERGE_BASELINE_STRICT", "bool",
        "fail baseline::provenance when the run's provenance differs from the baseline's (library versions, dtype, "
        "device, tokenizer files, chat template, suites, corpus, tensor headers) or cases are gone",
    ),
    OptionSpec(
        "baseline_growth", "--llm-baseline-growth", "llm_baseline_growth", "LLMMERGE_BASELINE_GROWTH", "float",
        "factor a case's output token count may grow by against the baseline (default 1.5; a growth of up to 8 "
        "tokens always passes)", "FACTOR", maximum=1e6,
    ),
    OptionSpec(
        "report_html", "--llm-report-html", "llm_report_html", "LLMMERGE_REPORT_HTML", "path",
        "write the report as one self-contained HTML file to PATH: verdict, filterable item table, plots of the "
        "parity margins, per-layer change, merge diagnosis and KL per document (with the `html` extra: matplotlib), "
        "suite outcomes per variant and backend, and the baseline comparison side by side", "PATH",
    ),
    OptionSpec(
        "allow_pickle", "--llm-allow-pickle", "llm_allow_pickle", "LLMMERGE_ALLOW_PICKLE",
        "bool", "accept pickle-only weight files (.bin/.pt), which can run code when loaded",
    ),
    OptionSpec(
        "trust_remote_code", "--llm-trust-remote-code", "llm_trust_remote_code",
        "LLMMERGE_TRUST_REMOTE_CODE", "bool",
        "accept checkpoints whose config has auto_map (custom Python code)",
    ),
    OptionSpec(
        "backends", "--llm-backend", "llm_backends", "LLMMERGE_BACKENDS", "names",
        "backends that run the suites and parity, comma-separated: hf, vllm, vllm-serve (suites through "
        "`vllm serve` and its OpenAI-compatible API), or module:Class of your own (default: hf,vllm; vLLM items are "
        "skipped with the reason where vllm does not import)",
        "NAMES",
    ),
    OptionSpec(
        "suite_globs", "--llm-suite-glob", "llm_suite_globs", "LLMMERGE_SUITE_GLOBS", "names",
        "file-name patterns of YAML suites to collect anywhere under the test paths, comma-separated "
        "(suites named on the command line or inside a directory named there are always collected)",
        "PATTERNS",
    ),
    OptionSpec(
        "batch_size", "--llm-batch-size", "llm_batch_size", "LLMMERGE_BATCH_SIZE", "int",
        "prompts generated together per worker (default 8; 1 pins every hang to its prompt at once)",
        "N", maximum=65_536,
    ),
    OptionSpec(
        "load_timeout_s", "--llm-load-timeout", "llm_load_timeout", "LLMMERGE_LOAD_TIMEOUT", "float",
        "seconds a worker may take to load its model (default 900)", "SECONDS", maximum=A_WEEK_S,
    ),
    OptionSpec(
        "merge_timeout_s", "--llm-merge-timeout", "llm_merge_timeout", "LLMMERGE_MERGE_TIMEOUT", "float",
        "seconds one merge build may take (it runs in its own process, killed at the deadline; the items "
        "needing it fail with the reason) (default 3600)", "SECONDS", maximum=A_WEEK_S,
    ),
    OptionSpec(
        "call_timeout_s", "--llm-call-timeout", "llm_call_timeout", "LLMMERGE_CALL_TIMEOUT", "float",
        "seconds parity and agreement give a worker per text scored or prompt generated; a call of n gets "
        "n times it, and a worker that misses it is killed and the item fails (default 120)", "SECONDS",
        maximum=A_WEEK_S,
    ),
    OptionSpec(
        "tensor_parallel_size", "--llm-tensor-parallel-size", "llm_tensor_parallel_size",
        "LLMMERGE_TENSOR_PARALLEL_SIZE", "int", "GPUs vLLM splits each model over (default 1)", "N",
        maximum=4096,
    ),
    OptionSpec(
        "kv_cache_gib", "--llm-kv-cache-gib", "llm_kv_cache_gib", "LLMMERGE_KV_CACHE_GIB", "float",
        "vLLM KV cache size in GiB (default: on CPU, room for two full-length sequences; on GPU, "
        "vLLM's own sizing)", "GIB", maximum=1_048_576,
    ),
    OptionSpec(
        "vllm_args", "--llm-vllm-arg", "llm_vllm_args", "LLMMERGE_VLLM_ARGS", "names",
        "extra vllm.LLM() argument as key=value, repeatable (e.g. tensor_parallel_size=2, "
        "gpu_memory_utilization=0.5, max_model_len=4096)", "KEY=VALUE",
    ),
    OptionSpec(
        "serve_args", "--llm-serve-arg", "llm_serve_args", "LLMMERGE_SERVE_ARGS", "args",
        "a `vllm serve` flag of your deployment for the vllm-serve backend and the served stop set, repeatable: "
        "one argument, or a flag and its value separated by a space (--llm-serve-arg='--generation-config vllm'; "
        "ini: one per line; env: a shell-quoted command line)", "ARG",
    ),
    OptionSpec(
        "dtype", "--llm-dtype", "llm_dtype", "LLMMERGE_DTYPE", "str",
        "dtype the backends load models in: auto (the checkpoint's), float32, bfloat16, float16 (default auto)",
        "DTYPE",
    ),
    OptionSpec(
        "device", "--llm-device", "llm_device", "LLMMERGE_DEVICE", "str",
        "device of the HF backend: cpu, cuda, cuda:1 ... (default cpu)", "DEVICE",
    ),
)
