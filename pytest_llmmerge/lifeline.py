"""Child processes that never outlive the process that started them.

Each child runs in its own session (one kill takes its whole process group, grandchildren
included) and gets the read end of a pipe whose write end only the parent holds: when the
parent is gone, however it went (SIGKILL from CI included), the child reads end-of-file and
kills its own group.  Model workers and merge processes both start this way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from typing import Any


def spawn(argv: Sequence[str], *, pass_fds: Sequence[int] = (), **popen: Any) -> tuple[subprocess.Popen[bytes], int]:
    """Start `argv` + [lifeline fd] in a new session; (process, write end of its lifeline).

    The caller closes the write end (`cut`) once it is done with the child."""
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen([*argv, str(read_end)], pass_fds=(*pass_fds, read_end), start_new_session=True,
                                **popen)
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return proc, write_end


def cut(write_end: int | None) -> None:
    if write_end is not None:
        os.close(write_end)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill the child's whole process group and reap the child."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def die_with_parent(read_end: int) -> None:
    """In the child: kill this process group once the parent's end of the lifeline closes."""
    def watch() -> None:
        while True:
            try:
                if not os.read(read_end, 1):
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, name="llmmerge-lifeline", daemon=True).start()
