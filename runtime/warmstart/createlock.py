"""One opted-in create at a time per container id on the node: a lock per (runc root, id).

Why: intercept's "runc already has this id" check and runc's own (a stat, then a mkdir) are not
atomic.  Two creates of one id could both pass; the loser's restore then failed on runc's "already
exists" and its cleanup (the cgroup's processes killed, `runc delete --force` of the id) destroyed
the winner.  The lock is held from before the check until runc has made the id's state: to the end
of a restore (this process), and through the `runc create` this process execs for a cold start.

A POSIX record lock (lockf), not flock: it stays with the process across execve, so the exec'd
`runc create` holds it until it exits, and it is not inherited by fork, so `runc init` (which waits
for `start`) never holds it.  The file is named by a hash of the runc root and the id: the id is the
caller's and never becomes a path here, and two runc roots may each hold the same id.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import time
from functools import partial
from pathlib import Path

from .fileutil import lock_within


def path_for(state_dir: Path, runc_root: Path, container_id: str) -> Path:
    key = hashlib.sha256(f"{os.path.realpath(runc_root)}\0{container_id}".encode()).hexdigest()
    return state_dir / "locks" / "create" / f"{key}.lock"


def _same_file(fd: int, path: Path) -> bool:
    """The fd is still the file at path (`remove` unlinks it while holding it)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def hold(state_dir: Path, runc_root: Path, container_id: str, timeout_s: float | None = None) -> int | None:
    """Wait for the lock and take it; returns its fd, held until this process, or the runc it execs, exits.
    None when another create still holds it after timeout_s (what is left of the create's budget).

    Never closed by the caller: closing any fd of the file would drop a POSIX lock."""
    path = path_for(state_dir, runc_root, container_id)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    end = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if end is None:
                fcntl.lockf(fd, fcntl.LOCK_EX)
            elif not lock_within(partial(fcntl.lockf, fd, fcntl.LOCK_EX | fcntl.LOCK_NB),
                                        end - time.monotonic()):
                os.close(fd)
                return None
            if _same_file(fd, path):
                os.set_inheritable(fd, True)  # across the exec into `runc create`
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # removed while we waited: take the new file


def remove(state_dir: Path, runc_root: Path, container_id: str) -> None:
    """Drop the lock file once runc no longer has the id (at delete), taken first: a create that waited
    on the old file then takes the new one (hold's inode check)."""
    path = path_for(state_dir, runc_root, container_id)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        if _same_file(fd, path):
            path.unlink()
    finally:
        os.close(fd)
