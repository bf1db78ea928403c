"""The seed's (Dynamo's) checkpoint protocol, so existing workers work unchanged.

Container env the worker may set: DYN_CHECKPOINT_HASH (the id), DYN_CHECKPOINT_PATH
(the store root as seen in the container; only reported back), DYN_CHECKPOINT_READY_FILE
(on-ready's ready file), DYN_CHECKPOINT_SIGNAL_FILE (written when a checkpoint
attempt ends: the marker JSON, `success: false` with the error on failure), and
DYN_RESTORE_MARKER_FILE (written into a restored container).  Files go into the
container through a chroot into /proc/<pid>/root from a throwaway child, so a
symlink planted by the container resolves inside the container, never on the host.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path, PurePosixPath
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def container_env(spec: dict[str, Any]) -> dict[str, str]:
    out = {}
    for e in (spec.get("process") or {}).get("env") or []:
        k, _, v = str(e).partition("=")
        out[k] = v
    return out


def in_container_root(pid: int, fn: Callable[[], T], default: T) -> T:
    """Run fn in a child chrooted into the container's root (its mount namespace's view).

    Only booleans and None cross back (through the exit status); anything else is the default.
    """
    child = os.fork()
    if child == 0:
        code = 3
        try:
            os.chroot(f"/proc/{pid}/root")
            os.chdir("/")
            res = fn()
            code = 0 if res is True else (1 if res is False else 2)
        except BaseException:  # noqa: BLE001
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    return {0: True, 1: False, 2: None}.get(code, default)  # type: ignore[return-value]


def write_in_container(pid: int, path: str, data: bytes) -> bool:
    """Write a small file at an absolute path inside the container; False if it could not."""
    if not PurePosixPath(path).is_absolute() or "\x00" in path:
        return False

    def write() -> bool:
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return True
    return in_container_root(pid, write, default=False) is True


def signal_body(cid: str, checkpoint_path: str, success: bool, error: str | None) -> dict[str, Any]:
    """The seed's signal/marker JSON."""
    return {"checkpoint_id": cid, "checkpoint_path": checkpoint_path, "timestamp": time.time(),
            "success": success, "error": error}


def notify_checkpoint(pid: int | None, spec: dict[str, Any], cid: str, host_path: Path, success: bool,
                      error: str | None) -> str | None:
    """Write DYN_CHECKPOINT_SIGNAL_FILE into the container if it asked; returns the path written."""
    env = container_env(spec)
    target = env.get("DYN_CHECKPOINT_SIGNAL_FILE")
    if not target or not pid:
        return None
    seen = f"{env['DYN_CHECKPOINT_PATH'].rstrip('/')}/{cid}" if env.get("DYN_CHECKPOINT_PATH") else str(host_path)
    body = json.dumps(signal_body(cid, seen, success, error)).encode()
    return target if write_in_container(pid, target, body) else None


def mark_restored(pid: int | None, spec: dict[str, Any], cid: str) -> str | None:
    """Write DYN_RESTORE_MARKER_FILE into a restored container so the process knows."""
    target = container_env(spec).get("DYN_RESTORE_MARKER_FILE")
    if not target or not pid:
        return None
    body = json.dumps({"checkpoint_id": cid, "restored_at": time.time(), "success": True}).encode()
    return target if write_in_container(pid, target, body) else None
