"""Run a function inside a container's namespaces or root, from a throwaway child, under a deadline.

setns(2) and chroot(2) would change the runtime itself, so a forked child does
them, runs the function and sends its result back through a pipe.  The child is
SIGKILLed past the deadline: nothing a container plants (a FIFO, a port that
never answers) can hold the caller.  Each caller turns a failure into its own
error.
"""
from __future__ import annotations

import os
import select
import signal
from dataclasses import dataclass
from typing import Callable

CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000
MAX_RESULT = 1 << 16


def sethostname(name: str) -> None:
    """sethostname(2) without importing `socket` (~4 ms of every restore's `create`)."""
    import ctypes  # noqa: PLC0415

    raw = name.encode()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.sethostname(raw, len(raw)) != 0:
        raise OSError(ctypes.get_errno(), f"sethostname({name!r})")


@dataclass(frozen=True)
class Outcome:
    ok: bool          # fn returned (its bytes are in `data`)
    data: bytes = b""
    error: str = ""   # why not: fn's exception, a failed setns/chroot, or the deadline


def run(fn: Callable[[], bytes], *, setns: tuple[tuple[str, int], ...] = (), chroot: str | None = None,
        then: Callable[[], None] | None = None, timeout_s: float = 5.0) -> Outcome:
    """In a child: join each (namespace file, CLONE_* flag), chroot, call `then` (e.g. drop to the
    container's credentials), and return what fn() returns (bytes, at most MAX_RESULT)."""
    import ctypes  # noqa: PLC0415 - in the parent, so the child has it before any chroot

    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(r)
            libc = ctypes.CDLL(None, use_errno=True)  # loaded before any chroot: the container holds no Python of ours
            for path, flag in setns:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                if libc.setns(fd, flag) != 0:
                    raise OSError(ctypes.get_errno(), f"setns({path})")
                os.close(fd)
            if chroot is not None:
                os.chroot(chroot)
                os.chdir("/")
            if then is not None:
                then()
            out = fn()
            os.write(w, b"\x00" + bytes(out)[:MAX_RESULT])
            code = 0
        except BaseException as e:  # noqa: BLE001 - everything crosses back as text
            try:
                os.write(w, b"\x01" + f"{type(e).__name__}: {e}".encode(errors="replace")[:1000])
            except OSError:
                pass
        finally:
            os._exit(code)
    os.close(w)
    pidfd = os.pidfd_open(child)
    try:
        if not select.select([pidfd], [], [], timeout_s)[0]:
            os.kill(child, signal.SIGKILL)
            if select.select([pidfd], [], [], 1.0)[0]:
                os.waitpid(child, 0)
            return Outcome(False, error=f"timed out after {timeout_s:g}s")  # an unkillable child: our reaper's
        os.waitpid(child, 0)
        raw = b""
        while chunk := os.read(r, MAX_RESULT + 1):
            raw += chunk
    finally:
        os.close(pidfd)
        os.close(r)
    if raw[:1] == b"\x00":
        return Outcome(True, raw[1:])
    return Outcome(False, error=raw[1:].decode(errors="replace") or "the child died without a word")
