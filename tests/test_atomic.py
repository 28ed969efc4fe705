"""atomic.build_once without a model: a failed build leaves nothing, a built output is not built
again, only dead builds of this host are cleaned up, and a held lock times out naming its holder."""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_llmmerge.atomic import BUILD_MARK, LockTimeout, build_once


def write(name: str, text: str = "x") -> tuple[list[Path], Callable[[Path], None]]:
    """A build that writes `name` and records the temp dirs it was given."""
    given: list[Path] = []

    def build(tmp: Path) -> None:
        given.append(tmp)
        assert tmp.is_dir() and [p.name for p in tmp.iterdir()] == [BUILD_MARK]
        (tmp / name).write_text(text)

    return given, build


def test_a_build_is_published_whole_and_unmarked(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "out"
    given, build = write("weights")
    assert build_once(out, build, lock=tmp_path / "out.lock") == (out, True)
    assert sorted(p.name for p in out.iterdir()) == ["weights"]  # the mark went with the rename
    assert not given[0].exists() and given[0].parent == out.parent and given[0].name.startswith(".out.tmp-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.lock", "sub"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_a_build_that_raises_leaves_no_temp_dir_and_no_output(tmp_path: Path, error: BaseException) -> None:
    out = tmp_path / "out"
    given: list[Path] = []

    def build(tmp: Path) -> None:
        given.append(tmp)
        (tmp / "half").write_text("half")
        raise error

    with pytest.raises(type(error)):
        build_once(out, build, lock=tmp_path / "out.lock")
    assert given and not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out.lock"]


def test_a_complete_output_is_not_built_again(tmp_path: Path) -> None:
    out = tmp_path / "out"
    calls: list[Path] = []
    assert build_once(out, calls.append, lock=tmp_path / "out.lock") == (out, True)
    mtime = out.stat().st_mtime_ns
    assert build_once(out, calls.append, lock=tmp_path / "out.lock") == (out, False)
    assert build_once(out, calls.append, lock=None) == (out, False)
    assert len(calls) == 1 and out.stat().st_mtime_ns == mtime


def test_an_incomplete_output_is_replaced(tmp_path: Path) -> None:
    """`complete` says what whole means (here a stamp): a directory without it is built again."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "half").write_text("from a build of older inputs")
    given, build = write("stamp")
    stamped = lambda directory: (directory / "stamp").is_file()  # noqa: E731
    assert build_once(out, build, lock=None, complete=stamped) == (out, True)
    assert sorted(p.name for p in out.iterdir()) == ["stamp"]
    assert build_once(out, build, lock=None, complete=stamped) == (out, False)
    assert len(given) == 1


def test_without_a_lock_a_builder_that_published_first_wins(tmp_path: Path) -> None:
    out = tmp_path / "out"

    def build(tmp: Path) -> None:
        (tmp / "mine").write_text("mine")
        out.mkdir()  # another builder's rename lands while this one builds
        (out / "theirs").write_text("theirs")

    assert build_once(out, build, lock=None) == (out, False)
    assert [p.name for p in out.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # this build's temp dir is gone


@pytest.mark.parametrize("theirs_whole", [True, False], ids=["whole", "half"])
def test_a_rename_that_loses_the_race_keeps_a_whole_output_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, theirs_whole: bool) -> None:
    """Another builder's rename lands between this one's last look and its own rename."""
    import pytest_llmmerge.atomic as atomic

    out = tmp_path / "out"
    real_rename = os.rename

    def rename_after_theirs(src: Path, dst: Path) -> None:
        out.mkdir()
        (out / ("stamp" if theirs_whole else "half")).write_text("theirs")
        real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename_after_theirs)
    _, build = write("stamp")
    stamped = lambda directory: (directory / "stamp").is_file()  # noqa: E731
    if theirs_whole:
        assert build_once(out, build, lock=None, complete=stamped) == (out, False)
    else:
        with pytest.raises(OSError):
            build_once(out, build, lock=None, complete=stamped)
    assert [p.name for p in out.iterdir()] == ["stamp" if theirs_whole else "half"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # this build's temp dir is gone


def test_concurrent_builders_of_one_output_build_once(tmp_path: Path) -> None:
    # flock conflicts between separate open()s even inside one process: threads stand in for
    # two xdist workers.
    out = tmp_path / "out"
    calls: list[str] = []
    started = threading.Event()

    def build(tmp: Path) -> None:
        calls.append(threading.current_thread().name)
        started.set()
        threading.Event().wait(0.3)
        (tmp / "weights").write_text("x")

    results: list[tuple[Path, bool]] = []
    threads = [threading.Thread(target=lambda: results.append(build_once(out, build, lock=tmp_path / "out.lock")),
                                name=f"worker{i}") for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and sorted(results) == [(out, False), (out, True)]


def test_dead_builds_of_this_host_go_live_ones_and_foreign_ones_stay(tmp_path: Path) -> None:
    """Only our own marked temp dirs of dead builds on this host go; a look-alike name is not enough."""
    gone = 2 ** 22 + 1  # above any pid_max: no such process
    dead = tmp_path / f".other.tmp-{gone}-deadbeef"  # another output's killed build: it goes too
    live = tmp_path / f".other.tmp-{os.getppid()}-feedbeef"  # another process's build in progress
    own = tmp_path / f".other.tmp-{os.getpid()}-0ddba11e"  # this process's build in progress
    other_host = tmp_path / f".other.tmp-{gone}-0badf00d"  # a build on a shared volume, pid not ours to judge
    wrong_pid = tmp_path / f".other.tmp-{gone}-0ddba115"  # the mark names another process than the name
    look_alike = tmp_path / f".mine.tmp-{gone}-12345678"  # a user's directory with a similar name, no mark
    unrelated = tmp_path / ".other.tmp-notes"
    marks = {dead: f"{socket.gethostname()} {gone}", live: f"{socket.gethostname()} {os.getppid()}",
             own: f"{socket.gethostname()} {os.getpid()}",
             other_host: f"another-host {gone}", wrong_pid: f"{socket.gethostname()} {os.getpid()}",
             look_alike: None, unrelated: None}
    for directory, mark in marks.items():
        directory.mkdir()
        if mark is not None:
            (directory / BUILD_MARK).write_text(mark)
    (look_alike / "notes.txt").write_text("keep me")
    _, build = write("weights")
    build_once(tmp_path / "out", build, lock=None)
    assert not dead.exists()
    assert all(d.exists() for d in (live, own, other_host, wrong_pid, look_alike, unrelated))


def test_a_lock_held_too_long_is_a_clear_timeout_naming_the_holder(tmp_path: Path) -> None:
    """A hung builder of the same output must not block another session forever."""
    out, lock = tmp_path / "out", tmp_path / "key.lock"
    said: list[str] = []
    building = threading.Event()
    release = threading.Event()

    def hang(tmp: Path) -> None:
        building.set()
        release.wait(30)

    calls: list[Path] = []
    thread = threading.Thread(target=lambda: build_once(out, hang, lock=lock))
    thread.start()
    try:
        assert building.wait(10)
        with pytest.raises(LockTimeout, match=rf"key.lock is still held by {re.escape(socket.gethostname())} pid "
                                              rf"{os.getpid()} after 1 s: another build of the same output"):
            build_once(out, calls.append, lock=lock, lock_timeout_s=1, progress=said.append)
        assert not calls
        assert said == [f"waiting for {socket.gethostname()} pid {os.getpid()}, which is building the same "
                        "output (key.lock)"]
    finally:
        release.set()
        thread.join()
    assert build_once(out, calls.append, lock=lock, lock_timeout_s=1) == (out, False)  # free, and built
