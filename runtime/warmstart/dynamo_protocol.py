"""Dynamo's checkpoint protocol (its env vars and marker files), so existing workers work unchanged.

Container env the worker may set: DYN_CHECKPOINT_HASH (the id), DYN_CHECKPOINT_PATH
(the store root as seen in the container; only reported back), DYN_CHECKPOINT_READY_FILE
(on-ready's ready file), DYN_CHECKPOINT_SIGNAL_FILE (written when a checkpoint
attempt ends: the marker JSON, `success: false` with the error on failure), and
DYN_RESTORE_MARKER_FILE (written into a restored container).  Files go into the
container from a throwaway child chrooted into /proc/<pid>/root, with the
container process's uid, gid, groups and capabilities, walking the path without
following any symlink and writing only a regular file (never a device node or a
FIFO), within WRITE_TIMEOUT_S.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from . import nsrun, rootfs
from .spec import Spec

if TYPE_CHECKING:
    from .log import Logger

T = TypeVar("T")


WRITE_TIMEOUT_S = 5.0  # a write into the container is a few syscalls; past this the child is killed


@dataclass(frozen=True)
class Creds:
    """Who the container's process is, as the host sees it: what a write on its behalf may do."""
    uid: int
    gid: int
    groups: tuple[int, ...]
    caps: int  # effective capabilities; none when it sits in another user namespace

    @classmethod
    def of(cls, pid: int) -> Creds:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        f = {k: v.split() for k, _, v in (ln.partition(":") for ln in lines)}
        foreign = os.stat(f"/proc/{pid}/ns/user").st_ino != os.stat("/proc/self/ns/user").st_ino
        return cls(int(f["Uid"][1]), int(f["Gid"][1]), tuple(int(g) for g in f["Groups"]),
                   0 if foreign else int(f["CapEff"][0], 16))

    def assume(self) -> None:
        """Become this uid/gid/groups and keep only these capabilities (for good: a forked child only)."""
        os.setgroups(list(self.groups))
        os.setgid(self.gid)
        os.setuid(self.uid)  # a non-zero uid drops every capability by itself
        import ctypes  # noqa: PLC0415 - nsrun loads it before the chroot, in that child only
        libc = ctypes.CDLL(None, use_errno=True)
        head = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        data = (ctypes.c_uint32 * 6)()  # (effective, permitted, inheritable) for caps 0-31, then 32-63
        if libc.capget(head, data) != 0:
            raise OSError(ctypes.get_errno(), "capget")
        for i in (0, 1):
            keep = data[3 * i + 1] & (self.caps >> (32 * i)) & 0xFFFFFFFF
            data[3 * i:3 * i + 3] = [keep, keep, 0]
        if libc.capset(head, data) != 0:
            raise OSError(ctypes.get_errno(), "capset")


def run_in_container(pid: int, fn: Callable[[], T], creds: Creds | None = None,
                     timeout_s: float = WRITE_TIMEOUT_S) -> tuple[int, str]:
    """Run fn in a child chrooted into the container's root (its mount namespace's view), as creds.

    Returns (code, error): 0/1/2 for fn returning True/False/anything else, 3 with the error text
    when it raised, 124 when it ran past timeout_s (nsrun kills the child: nothing the container
    plants, a FIFO say, can hold the caller).
    """
    def call() -> bytes:
        res = fn()
        return b"0" if res is True else (b"1" if res is False else b"2")
    out = nsrun.run(call, chroot=f"/proc/{pid}/root", then=creds.assume if creds else None, timeout_s=timeout_s)
    if out.ok:
        return int(out.data or b"2"), ""
    return (124 if out.error.startswith("timed out") else 3), out.error


def in_container_root(pid: int, fn: Callable[[], T], default: T) -> T:
    """Run fn in a child chrooted into the container's root; only booleans and None cross back."""
    code, _ = run_in_container(pid, fn)
    return {0: True, 1: False, 2: None}.get(code, default)  # type: ignore[return-value]


class WriteRefused(Exception):
    """A file the container asked for was not written; the message says why."""


def write_in_container(pid: int, path: str, data: bytes) -> None:
    """Write a small file at an absolute path inside the container, or raise WriteRefused.

    The container chose the path, so the write has the container's own rights (its uid, gid,
    groups and capabilities; it runs outside its device cgroup, hence the rest): no symlink is
    followed anywhere on the path, and only a regular file is ever written or truncated, never a
    device node or a FIFO (see rootfs.open_regular); the whole write is bounded by WRITE_TIMEOUT_S.
    """
    if not PurePosixPath(path).is_absolute():
        raise WriteRefused(f"{path[:200]!r}: not an absolute path")
    try:
        rel = rootfs._check_rel(path.lstrip("/"), "path")
        creds = Creds.of(pid)
    except (rootfs.RootfsError, OSError, KeyError, ValueError, IndexError) as e:
        raise WriteRefused(str(e)) from None

    def write() -> bool:
        root_fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        dfd, name = rootfs._open_parent(root_fd, rel, create=True)
        fd, _ = rootfs.open_regular(dfd, name, os.O_WRONLY, create_mode=0o644)
        os.ftruncate(fd, 0)  # only now: open_regular has checked it is a regular file
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.close(fd)
        return True
    try:
        code, err = run_in_container(pid, write, creds)
    except OSError as e:  # fork, pipe: not the container's doing, still never the container's failure
        raise WriteRefused(str(e)) from None
    if code != 0:
        raise WriteRefused(err or f"exit status {code}")


def marker_body(cid: str, checkpoint_path: str | Path, success: bool, error: str | None) -> dict[str, Any]:
    """Dynamo's signal/marker JSON (also the store's checkpoint.done); readers trust only success: true."""
    return {"checkpoint_id": cid, "checkpoint_path": str(checkpoint_path), "timestamp": time.time(),
            "success": success, "error": error}


def _put(pid: int, target: str, body: dict[str, Any], what: str, log: Logger | None) -> str | None:
    """Write body at target in the container; a refusal is logged (with log) and never fails it."""
    try:
        write_in_container(pid, target, json.dumps(body).encode())
        return target
    except WriteRefused as e:
        if log is not None:
            log.warning(f"{what} {target[:200]!r} not written into the container: {e}")
        return None


def notify_checkpoint(pid: int | None, spec: dict[str, Any], cid: str, host_path: Path, success: bool,
                      error: str | None, log: Logger | None = None) -> str | None:
    """Write DYN_CHECKPOINT_SIGNAL_FILE into the container if it asked; returns the path written."""
    env = Spec(spec).env
    target = env.get("DYN_CHECKPOINT_SIGNAL_FILE")
    if not target or not pid:
        return None
    seen = f"{env['DYN_CHECKPOINT_PATH'].rstrip('/')}/{cid}" if env.get("DYN_CHECKPOINT_PATH") else str(host_path)
    return _put(pid, target, marker_body(cid, seen, success, error), "DYN_CHECKPOINT_SIGNAL_FILE", log)


def mark_restored(pid: int | None, spec: dict[str, Any], cid: str, log: Logger | None = None) -> str | None:
    """Write DYN_RESTORE_MARKER_FILE into a restored container so the process knows."""
    target = Spec(spec).env.get("DYN_RESTORE_MARKER_FILE")
    if not target or not pid:
        return None
    body = {"checkpoint_id": cid, "restored_at": time.time(), "success": True}
    return _put(pid, target, body, "DYN_RESTORE_MARKER_FILE", log)
