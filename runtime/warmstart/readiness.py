"""on-ready: when is an opted-in container ready to be checkpointed, and how we look.

Signals (documented in README): a ready file inside the container
(`warmstart.dev/ready-file`, else env DYN_CHECKPOINT_READY_FILE, else
/tmp/checkpoint-ready, as Dynamo's workers do), or an HTTP GET that answers 2xx
(`warmstart.dev/ready-http: "8080/ready"`), probed inside the container's
network namespace.  Both are looked at from the host, through /proc/<pid>.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from . import annotations as ann
from . import nsrun
from .dynamo_protocol import in_container_root
from .spec import Spec

DEFAULT_READY_FILE = "/tmp/checkpoint-ready"
MAX_WAIT_S = 24 * 3600


@dataclass(frozen=True)
class Readiness:
    ready_file: str | None = DEFAULT_READY_FILE
    http_port: int | None = None
    http_path: str = "/"
    delay_s: float = 0.0
    timeout_s: float = 3600.0


def _seconds(key: str, raw: str, upper: float) -> float:
    try:
        v = float(raw)
    except ValueError:
        raise ann.AnnotationError(f"{key}: {raw[:40]!r} is not a number of seconds") from None
    if not 0 <= v <= upper:
        raise ann.AnnotationError(f"{key}: {v} out of range; use 0..{upper:.0f} seconds")
    return v


def from_spec(spec: dict[str, Any]) -> Readiness:
    a = spec.get("annotations") or {}
    ready_file = a.get(ann.READY_FILE) or Spec(spec).env.get("DYN_CHECKPOINT_READY_FILE")
    http_port, http_path = None, "/"
    if ann.READY_HTTP in a:
        port, _, path = a[ann.READY_HTTP].strip().lstrip(":").partition("/")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ann.AnnotationError(f"{ann.READY_HTTP}: {a[ann.READY_HTTP][:60]!r}; use PORT/PATH, e.g. 8080/ready")
        http_port, http_path = int(port), "/" + path
        if any(c in http_path for c in "\r\n ") or len(http_path) > 1024:
            raise ann.AnnotationError(f"{ann.READY_HTTP}: the path must be one URL path without spaces")
    elif not ready_file:
        ready_file = DEFAULT_READY_FILE  # no signal named: Dynamo's default file
    if ready_file is not None and not PurePosixPath(ready_file).is_absolute():
        raise ann.AnnotationError(f"{ann.READY_FILE}: {ready_file[:80]!r} must be an absolute path in the container")
    delay = _seconds(ann.READY_DELAY, a[ann.READY_DELAY], 3600) if ann.READY_DELAY in a else 0.0
    timeout = _seconds(ann.READY_TIMEOUT, a[ann.READY_TIMEOUT], MAX_WAIT_S) if ann.READY_TIMEOUT in a else 3600.0
    return Readiness(ready_file, http_port, http_path, delay, timeout)


def file_ready(pid: int, path: str) -> bool:
    """The ready file exists in the container (symlinks resolved inside the container's root)."""
    return in_container_root(pid, lambda: os.path.exists(path), default=False)


def http_ready(pid: int, port: int, path: str, timeout: float = 2.0) -> bool:
    """GET http://127.0.0.1:PORT/PATH from inside the container's network namespace answers 2xx."""
    def get() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
            status = s.recv(64).split(b" ", 2)
            return b"1" if len(status) >= 2 and status[1][:1] == b"2" else b"0"
    out = nsrun.run(get, setns=((f"/proc/{pid}/ns/net", nsrun.CLONE_NEWNET),), timeout_s=timeout + 1)
    return out.ok and out.data == b"1"  # refused, reset, timed out: not ready


def is_ready(pid: int, r: Readiness) -> bool:
    if r.http_port is not None and not http_ready(pid, r.http_port, r.http_path):
        return False
    if r.ready_file is not None and not file_ready(pid, r.ready_file):
        return False
    return True
