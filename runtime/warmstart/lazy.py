"""Lazy restore: CRIU lazy pages over userfaultfd, with a supervised lazy-pages daemon.

Opt-in per container with the annotation `warmstart.dev/restore: lazy`.  The
restored process starts running as soon as its non-memory state is back; its
memory pages are served on first touch (userfaultfd) by `criu lazy-pages`, which
also pushes the remaining pages in the background and exits once all are in.
Time to first response then no longer grows with the state size (benchmarks/README.md:
first touch of fresh memory is what an eager restore pays for up front).

The daemon never outlives its purpose: a small supervisor process (forked
here, detached from the runtime, which exits right after the restore) is its
parent and reaps it.  It kills the daemon when the restore did not happen (the
runtime closed the hand-off pipe without a PID) or when the container died
while pages were still being served.  A failed lazy attempt is undone and the
restore is retried eagerly; the caller's usual fallback (cold start) follows
if that fails too.  Containers with NVIDIA devices never restore lazily (page
faults into GPU-mapped memory make it slower, not faster).
"""
from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import procfs, runc
from .spec import Spec

RESTORE_ANNOTATION = "warmstart.dev/restore"
MODES = ("eager", "lazy")
SOCKET = "lazy-pages.socket"  # CRIU's name, relative to the work dir (CRIU chdirs there)
DAEMON_LOG = "lazy-pages.log"
SOCKET_WAIT_S = 5.0
GRACE_S = 2.0  # after the container died, before the daemon is killed


def requested(spec: dict[str, Any]) -> bool:
    return str((spec.get("annotations") or {}).get(RESTORE_ANNOTATION, "")).strip() == "lazy"


def eligible(spec: dict[str, Any]) -> tuple[bool, str]:
    if not requested(spec):
        return False, "eager (default)"
    if Spec(spec).has_gpu:
        return False, "eager: lazy pages are off for containers with /dev/nvidia* devices"
    return True, "lazy"


class Daemon:
    """`criu lazy-pages` under a detached supervisor; hand it the restored PID or nothing."""

    def __init__(self, criu: Path, images: Path, work: Path):
        self.criu, self.images, self.work = Path(criu), Path(images), Path(work)
        self.supervisor: int | None = None
        self._w: int | None = None

    def start(self) -> None:
        r, w = os.pipe()
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # intermediate child: detach, fork the supervisor, exit
            try:
                os.close(w)
                os.close(ready_r)
                os.setsid()
                if os.fork() == 0:
                    _supervise(self.criu, self.images, self.work, r, ready_w)
                    os._exit(0)
            finally:
                os._exit(0)
        os.close(r)
        os.close(ready_w)
        os.waitpid(pid, 0)
        self._w = w
        with os.fdopen(ready_r, "rb") as f:  # the supervisor writes its own pid, then the daemon's
            data = f.read(4096).decode(errors="replace").split()
        if len(data) < 2 or not data[0].isdigit():
            self.abandon()
            raise LazyError(f"the lazy-pages daemon did not start: {' '.join(data)[:300] or 'no word from it'}")
        self.supervisor = int(data[0])
        deadline = time.monotonic() + SOCKET_WAIT_S
        while not (self.work / SOCKET).exists():
            if time.monotonic() > deadline or not procfs.alive(self.supervisor) or not procfs.alive(int(data[1])):
                self.abandon()
                raise LazyError(f"the lazy-pages daemon did not open its socket: {_tail(self.work / DAEMON_LOG)}")
            time.sleep(0.005)

    def hand_over(self, container_pid: int) -> None:
        """The restore worked: the supervisor now watches the container."""
        if self._w is not None:
            os.write(self._w, f"{container_pid}\n".encode())
            os.close(self._w)
            self._w = None

    def abandon(self) -> None:
        """No restore: the supervisor kills the daemon and exits."""
        if self._w is not None:
            os.close(self._w)
            self._w = None


class LazyError(RuntimeError):
    pass


def _tail(p: Path) -> str:
    try:
        lines = [x for x in p.read_text(errors="replace").splitlines() if "Error" in x or "error" in x]
        return (lines[-1] if lines else "no error output")[:300]
    except OSError:
        return "no log"


def _supervise(criu: Path, images: Path, work: Path, handoff_r: int, ready_w: int) -> None:
    """Runs in the detached supervisor: parent and reaper of `criu lazy-pages`."""
    try:
        os.closerange(3, min(handoff_r, ready_w))  # keep only the two pipes
        os.closerange(min(handoff_r, ready_w) + 1, max(handoff_r, ready_w))
        os.closerange(max(handoff_r, ready_w) + 1, 65536)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)  # never hold the container's stdio pipes open
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        log = os.open(work / DAEMON_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        daemon = subprocess.Popen([str(criu), "lazy-pages", "--images-dir", str(images), "--work-dir", str(work),
                                   "-v2", "-o", DAEMON_LOG], stdin=devnull, stdout=log, stderr=log, cwd=str(work))
        os.write(ready_w, f"{os.getpid()} {daemon.pid}\n".encode())
        os.close(ready_w)
        with os.fdopen(handoff_r, "rb") as f:
            data = f.read(32).decode().strip()  # blocks until the runtime hands over or gives up
        if not data.isdigit():
            _stop(daemon)
            return
        try:
            target = os.pidfd_open(int(data))
        except OSError:  # the container is already gone
            _stop(daemon)
            return
        dpid = os.pidfd_open(daemon.pid)
        while True:
            ready, _, _ = select.select([target, dpid], [], [])
            if dpid in ready:  # all pages served (or the daemon failed): nothing left to do
                daemon.wait()
                return
            if target in ready:  # container died: whatever pages remain will never be needed
                try:
                    daemon.wait(timeout=GRACE_S)
                except subprocess.TimeoutExpired:
                    _stop(daemon)
                return
    except BaseException as e:  # noqa: BLE001 - a supervisor never raises into anyone; it tells the runtime
        try:
            os.write(ready_w, f"error {type(e).__name__}: {e}\n".encode())
        finally:
            os._exit(1)


def _stop(daemon: subprocess.Popen) -> None:
    daemon.terminate()
    try:
        daemon.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()


def run_restore(rc: runc.Runc, container_id: str, opts: runc.RestoreOpts, run: runc.RestoreRun,
                checkpoint: Path, spec: dict[str, Any], log: Any = None) -> tuple[subprocess.CompletedProcess, str]:
    """`runc restore`: lazily when asked and possible, else eagerly.

    `run.env` is the environment of an eager restore (criu.restore_env); `run.watch` fails either
    attempt fast when its CRIU dies (runc.CriuGoneWatch); `run.stdio` hands the container's stdio
    over (runc.StdioHandOff).  `checkpoint` is the checkpoint itself (the lazy-pages daemon reads it).

    Returns runc's result and how it restored ("lazy", "eager", or "eager after lazy failed: ...").
    """
    ok, why = eligible(spec)
    if ok:
        work = opts.work_path
        daemon = Daemon(rc.criu or Path("criu"), checkpoint, work)
        try:
            t = time.perf_counter()
            daemon.start()
            if log is not None:
                log.context["lazy_daemon_start_s"] = round(time.perf_counter() - t, 6)
            p = rc.restore(container_id, replace(opts, lazy_pages=True), replace(run, env=None))
            pid = runc.read_pid(opts.of.pid_file) if p.returncode == 0 else None
            if pid:
                daemon.hand_over(pid)
                return p, "lazy"
            why = f"runc restore --lazy-pages failed (exit {p.returncode})"
        except (OSError, LazyError, subprocess.SubprocessError, runc.Timeout) as e:
            why = f"{type(e).__name__}: {e}"
        finally:
            daemon.abandon()
        # undo the lazy attempt, then the eager one from a clean work dir
        for note in rc.discard_failed_restore(container_id):
            if log is not None:
                log.warning(note)
        if opts.of.pid_file:
            Path(opts.of.pid_file).unlink(missing_ok=True)
        for name in ("restore.log", DAEMON_LOG):  # kept next to the work dir for the operator
            if (work / name).exists():
                shutil.copyfile(work / name, work.parent / f"lazy-failed-{name}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(mode=0o700, parents=True)
        if log is not None:
            log.warning(f"lazy restore failed, restoring eagerly: {why}")
        why = f"eager after lazy failed: {why}"
    return rc.restore(container_id, opts, run), why
