"""Build a directory at most once across processes, so that it is either whole or absent.

Merges (merge.py), the GGUF conversion and the real-model tier's inputs (tests/) are all built
the one way `build_once` builds: under an flock with a timeout that names the holder, into a
temp directory next to the output (same filesystem), fsynced, and renamed into place as the very
last step.  A build killed at any point leaves no output; the temp directory it leaves carries
a mark with its host and pid, and the next build into the same parent removes it once that
process is gone.  Nothing here imports a heavy library.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# f".{out.name}.tmp-{pid}-{8 hex digits}", the temp dirs build_once writes into.
_TEMP_NAME = re.compile(r"^\..+\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")
# How long a builder waits for another process building the same output: longer than any merge
# that streams from disk takes, short enough that a hung holder ends a CI job with a reason.
LOCK_TIMEOUT_S = 2 * 3600.0
BUILD_MARK = ".llmmerge-build"  # inside a temp dir while its build runs: "<host> <pid>"

Progress = Callable[[str], None]


class LockTimeout(TimeoutError):
    """Another process held a build lock for longer than the wait allows."""


def build_once(
    out: Path,
    build: Callable[[Path], None],
    *,
    lock: Path | None,
    complete: Callable[[Path], bool] | None = None,
    lock_timeout_s: float = LOCK_TIMEOUT_S,
    progress: Progress | None = None,
) -> tuple[Path, bool]:
    """(out, built now): `out` as it is when `complete(out)`, else built by `build(tmp)` and published.

    `build` writes into `tmp`, an existing empty temp directory next to `out`; when it returns,
    the tree is fsynced and renamed to `out` (an incomplete `out` directory is replaced), and the parent
    is fsynced.  When `build` raises (KeyboardInterrupt included) the temp directory is removed
    and `out` is left as it was.

    `lock` is the flock file that serialises builders of `out` across processes (pytest-xdist
    workers): a second builder waits, at most `lock_timeout_s`, then finds the first one's
    output.  It is never removed (see _locked).  None builds without a lock, for an output only
    its caller writes; a builder that publishes the same output first then wins and this one's
    build is dropped.  `complete` defaults to `out` being a directory: outputs appear only by
    rename, so a directory is whole.  `progress` hears whom a builder waits for.
    """
    out = Path(out)
    done = complete or Path.is_dir
    if done(out):
        return out, False
    if lock is None:
        return out, _build_and_publish(out, build, done)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with _locked(lock, lock_timeout_s, progress):
        if done(out):  # another process built it while this one waited
            return out, False
        return out, _build_and_publish(out, build, done)


def _build_and_publish(out: Path, build: Callable[[Path], None], done: Callable[[Path], bool]) -> bool:
    """True when this build became `out`; False when another builder's output was there first."""
    tmp = _temp_sibling(out)
    try:
        build(tmp)
        _fsync_tree(tmp)
        if done(out):  # published meanwhile by a builder that holds no lock
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        if out.is_dir():  # an incomplete one: an empty directory, or a stale build of older inputs
            shutil.rmtree(out, ignore_errors=True)
        try:
            os.rename(tmp, out)
        except OSError as exc:
            # Someone else finished the same output first (ENOTEMPTY/EEXIST): theirs is whole.
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and done(out):
                shutil.rmtree(tmp, ignore_errors=True)
                return False
            raise
        _unmark(out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


# --- temp dirs ---------------------------------------------------------------------------------

def _temp_sibling(out: Path) -> Path:
    """A new temp dir next to `out` (same filesystem: a rename publishes it whole), marked as a
    build of this host and process; temp dirs that killed builds left there are removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_builds(out.parent)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    # Cleanup removes only directories holding this mark, written by a build on this host.
    (tmp / BUILD_MARK).write_text(f"{socket.gethostname()} {os.getpid()}\n", encoding="utf-8")
    return tmp


def _unmark(out: Path) -> None:
    """Drop the build mark from a published output; removed only once renamed, so that a temp dir
    killed at any point before still carries it."""
    (out / BUILD_MARK).unlink(missing_ok=True)


def remove_dead_builds(directory: Path, *, pattern: re.Pattern[str] | None = None, mark: str = "") -> None:
    """Remove temp dirs that killed builds left in `directory` (their process is gone): names
    matching `pattern` (a group "pid"), holding the file `mark` with this host and that pid.

    Any build's, not only `out`'s: in a cache directory a killed build of one key must not
    stay forever because that key is never built again.  A temp dir of a live process is a
    build in progress and is left alone.
    """
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        match = (pattern or _TEMP_NAME).match(path.name)
        if match is None or not path.is_dir():
            continue
        try:
            host, pid = (path / (mark or BUILD_MARK)).read_text(encoding="utf-8").split()
        except (OSError, ValueError):
            continue  # not one of ours (a user's directory, or a build of another tool)
        # A pid means something only on its own host: another host's build on a shared volume
        # is left alone.
        if host == socket.gethostname() and pid == match["pid"] and int(pid) != os.getpid() \
                and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _fsync_tree(directory: Path) -> None:
    # The rename must not become visible before the data: fsync files, then the directory.
    for path in directory.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the lock ------------------------------------------------------------------------------------

@contextmanager
def _locked(path: Path, timeout_s: float = LOCK_TIMEOUT_S, progress: Progress | None = None) -> Iterator[None]:
    """An exclusive flock on `path`, waited for at most `timeout_s`; the holder writes its host
    and pid into the file so that a waiter can say whom it waits for."""
    # The lock file is never removed: unlinking a file another process waits on breaks flock.
    with path.open("a+") as fh:
        deadline = time.monotonic() + timeout_s
        told = False
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                if time.monotonic() > deadline:
                    raise LockTimeout(f"{path} is still held by {holder} after {timeout_s:g} s: another build of "
                                      "the same output is running or hung: stop that process, or wait for it "
                                      "and retry") from None
                if progress is not None and not told:
                    progress(f"waiting for {holder}, which is building the same output ({path.name})")
                    told = True
                time.sleep(0.5)
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"{socket.gethostname()} pid {os.getpid()}\n")
            fh.flush()
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
