"""runtime/warmstart/sharelock.py: POSIX byte-range locks between processes (as between nodes on NFS).

POSIX locks never conflict inside one process, so every contention here is with a second process:
a child that takes a lock, says so on a pipe, and holds it until told to go (or is killed).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from warmstart.sharelock import LockError, LockFile

HOLDER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[1])
    from warmstart.sharelock import LockFile
    dfd = os.open(sys.argv[2], os.O_RDONLY | os.O_DIRECTORY)
    lock = LockFile(dfd, "x.lock")
    for spec in sys.argv[3].split(","):
        byte, how = spec.split(":")
        assert lock.take(int(byte), how == "ex", timeout_s=10)
    print("held", flush=True)
    sys.stdin.readline()  # until the test says go (or kills us)
    lock.close()
    print("released", flush=True)
""")
RUNTIME = str(Path(__file__).resolve().parents[2] / "runtime")


class Holder:
    """A second process holding locks on <dir>/x.lock: "0:ex,1:sh" = byte 0 exclusive, byte 1 shared."""

    def __init__(self, d: Path, spec: str) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", HOLDER, RUNTIME, str(d), spec], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == "held"

    def release(self) -> None:
        self.p.stdin.write("go\n")
        self.p.stdin.flush()
        assert self.p.stdout.readline().strip() == "released"
        self.p.wait(timeout=10)

    def kill(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(timeout=10)


@pytest.fixture
def lock(tmp_path):
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    lk = LockFile(dfd, "x.lock")
    os.close(dfd)
    yield lk
    lk.close()


def test_exclusive_is_refused_while_another_process_holds_it_then_taken_after_release(tmp_path, lock):
    h = Holder(tmp_path, "0:ex")
    try:
        assert not lock.take(0, exclusive=True)
        assert not lock.take(0, exclusive=False)
        t0 = time.monotonic()
        assert not lock.take(0, exclusive=True, timeout_s=0.3)
        assert time.monotonic() - t0 >= 0.3
        assert lock.take(1, exclusive=True)  # another byte of the same file: not contended
    finally:
        h.release()
    assert lock.take(0, exclusive=True)


def test_shared_holders_coexist_and_keep_out_an_exclusive(tmp_path, lock):
    h = Holder(tmp_path, "1:sh")
    try:
        assert lock.take(1, exclusive=False)  # a second reader
        lock.release(1)
        assert not lock.take(1, exclusive=True)  # the swap waits for readers
    finally:
        h.release()
    assert lock.take(1, exclusive=True)


def test_a_waiter_gets_the_lock_when_the_holder_releases_it(tmp_path, lock):
    h = Holder(tmp_path, "0:ex")
    import threading
    threading.Timer(0.3, h.release).start()
    t0 = time.monotonic()
    assert lock.take(0, exclusive=True, timeout_s=10)
    assert 0.2 < time.monotonic() - t0 < 5


def test_the_lock_goes_with_the_process_that_held_it(tmp_path, lock):
    h = Holder(tmp_path, "0:ex,1:ex")
    assert not lock.take(0, exclusive=True) and not lock.take(1, exclusive=False)
    h.kill()  # SIGKILL: no cleanup of its own; the kernel drops its locks
    assert lock.take(0, exclusive=True) and lock.take(1, exclusive=True)


def test_held_locks_keep_out_a_second_process(tmp_path, lock):
    assert lock.take(0, exclusive=True)
    p = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os, sys
        sys.path.insert(0, sys.argv[1])
        from warmstart.sharelock import LockFile
        lock = LockFile(os.open(sys.argv[2], os.O_RDONLY | os.O_DIRECTORY), "x.lock")
        print(lock.take(0, True), lock.take(0, False), lock.take(1, True))
    """), RUNTIME, str(tmp_path)], capture_output=True, text=True, check=True)
    assert p.stdout.split() == ["False", "False", "True"]


def test_a_symlink_or_fifo_is_never_a_lock_file(tmp_path):
    (tmp_path / "x.lock").symlink_to(tmp_path / "target")
    os.mkfifo(tmp_path / "f.lock")
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(LockError, match="x.lock"):
            LockFile(dfd, "x.lock")
        assert not (tmp_path / "target").exists()  # not created through the link
        with pytest.raises(LockError, match="f.lock: not a regular file"):
            LockFile(dfd, "f.lock")  # and the open did not block on the FIFO
    finally:
        os.close(dfd)


def test_read_only_lock_file_takes_shared_locks_only(tmp_path):
    (tmp_path / "x.lock").touch()
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with LockFile(dfd, "x.lock", writable=False) as ro:
            assert not ro.writable
            assert ro.take(1, exclusive=False)
            with pytest.raises(LockError, match="read-only"):
                ro.take(0, exclusive=True)
    finally:
        os.close(dfd)
