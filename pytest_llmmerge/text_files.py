"""Read a text file that a user or a checkpoint names, with bounds: a regular file only (a FIFO
or a device such as /dev/zero would block or never end) and no larger than a limit."""

from __future__ import annotations

import os
import stat
from pathlib import Path


class FileRefused(OSError):
    """Not a regular file, or larger than the limit; the message says which."""


def read_text(path: Path, limit_bytes: int) -> str:
    """The file's UTF-8 text; raises FileRefused, OSError or UnicodeDecodeError."""
    # Opened without blocking (a FIFO with no writer would block open() itself), then checked.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise FileRefused(f"{path} is not a regular file")
        if info.st_size > limit_bytes:
            raise FileRefused(f"{path} is {info.st_size} bytes, more than the {limit_bytes} read here")
        data = fh.read(limit_bytes + 1)
    if len(data) > limit_bytes:  # grew while being read
        raise FileRefused(f"{path} is more than the {limit_bytes} bytes read here")
    return data.decode("utf-8")
