"""Where a run's figures came from: the library versions, the compute settings and hashes of
every input that can move an output (tokenizer files, chat template, suites, corpus, the
checkpoint's tensor headers).  Two runs whose provenance differs explain their differences
by it (a tokenizer hash change explains a changed output; a torch upgrade a tiny drift).

No tensor data is read and nothing heavy is imported.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .file_names import SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, TOKENIZER_MODEL_FILES
from .report import versions

TOKENIZER_FILES = (*TOKENIZER_MODEL_FILES, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, "merges.txt", "added_tokens.json")
_CHUNK = 1 << 20


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_hashes(ckpt: Checkpoint) -> dict[str, str]:
    """sha256 of each tokenizer file the checkpoint has."""
    return {name: file_hash(ckpt.path / name) for name in TOKENIZER_FILES if (ckpt.path / name).is_file()}


def tensor_headers_hash(ckpt: Checkpoint) -> str | None:
    """One hash over every tensor's name, dtype and shape (what the headers say, not the data)."""
    shapes = ckpt.tensor_shapes()
    if not shapes:
        return None
    rows = sorted((name, str(info.dtype), list(info.shape)) for name, info in shapes.items())
    return text_hash(json.dumps(rows))


def _named(path: Path, root: Path | None) -> str:
    """A suite's name: relative to the run's root (as in node ids), so a clone elsewhere matches."""
    if root is not None and path.resolve().is_relative_to(root.resolve()):
        return path.resolve().relative_to(root.resolve()).as_posix()
    return str(path)


def provenance(model: Path, *, dtype: str, device: str, backends: Iterable[str], suites: Iterable[Path],
               corpus: Path | None, root: Path | None = None) -> dict[str, Any]:
    """The provenance of a run on `model` (see the module's docstring)."""
    ckpt = Checkpoint(model)
    template = ckpt.chat_template()
    corpus_hash = file_hash(corpus) if corpus is not None else text_hash(
        resources.files(__package__).joinpath("default_corpus.txt").read_text(encoding="utf-8"))
    return {
        "versions": versions(),
        "dtype": dtype,
        "device": device,
        "backends": sorted(set(backends)),
        "model": str(model),
        "tokenizer_files": tokenizer_hashes(ckpt),
        "chat_template": None if template is None else text_hash(template[0]),
        "suites": {_named(path, root): file_hash(path) for path in sorted(set(suites)) if path.is_file()},
        "corpus": corpus_hash,
        "tensor_headers": tensor_headers_hash(ckpt),
    }
