"""on-ready: a small per-container supervisor that checkpoints a worker once it is ready.

runc's calls are short-lived, so something must outlive `create` to watch for
readiness.  warmstart-runtime starts this process at create (detached: its own
session, stdio on /dev/null so it never holds the container's pipes) and
`delete` stops it; it also exits by itself when the container dies, when a
checkpoint for the id already exists, or when readiness times out.  The dump
runs with --leave-running: the worker pauses for CRIU's freeze and goes on
serving.  The store's per-id lock makes sure only one checkpoint per id is made.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from . import config, dynamo_protocol, procfs, readiness, runc
from .container import Container
from .log import Logger
from .state import StateDir
from .store import Store, locate

POLL_S = 0.25


def spawn(sd: StateDir) -> None:
    """Start the supervisor for the container whose state is in sd (double fork, no shared fds)."""
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, 1024)
        os.execv(sys.executable, [sys.executable, "-I", "-m", "warmstart.supervisor", str(sd.path)])
    finally:
        os._exit(127)


def stop(sd: StateDir) -> None:
    """Stop a container's supervisor (at delete and in the poststop hook), if it still runs and is ours."""
    try:
        pid = int(sd.supervisor_pid.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if b"warmstart.supervisor" in cmdline and str(sd.path).encode() in cmdline:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


class Stopped(BaseException):
    """SIGTERM from `delete`: the container is gone (BaseException: a dump in flight unwinds and cleans up)."""


class Supervisor:
    def __init__(self, state_path: Path) -> None:
        self.settings = config.load()
        self.sd = StateDir(state_path.parent.parent, state_path.name)
        self.st = self.sd.load()
        self.log = Logger(self.settings.log_dir, Path(self.st.runc_log) if self.st.runc_log else None,
                          {"container": self.st.container_id, "checkpoint_id": self.st.checkpoint_id,
                           "component": "supervisor"})
        self.runc = runc.Runc(self.settings.runc, runc.GlobalOpts.parse(self.st.runc_global), self.settings.criu)
        self.container = Container(self.settings, self.runc, self.log, self.sd, self.st)
        self.spec = json.loads((Path(self.st.bundle) / "config.json").read_text())
        self.ready = readiness.from_spec(self.spec)
        self.store = Store(self.settings, self.st.scope)
        self.pid: int | None = None

    def run(self) -> int:
        self.sd.supervisor_pid.write_text(str(os.getpid()))
        try:
            if self.wait_until_ready():
                self.checkpoint()
        except Stopped:
            self.log.info("on-ready: the container was deleted before it was checkpointed")
        return 0

    def wait_until_ready(self) -> bool:
        """True once ready (and settled); False, with the reason logged, when no checkpoint is to be made."""
        st, log = self.st, self.log
        deadline = time.monotonic() + self.ready.timeout_s
        while True:
            if not self.sd.exists():
                log.info("on-ready: the container was deleted before it was ready; not checkpointed")
                return False
            if locate(self.settings, st.scope, st.checkpoint_id) is not None:
                log.info("on-ready: a checkpoint for this id exists already; not checkpointing this container")
                return False
            if time.monotonic() > deadline:
                log.warning(f"on-ready: not ready after {self.ready.timeout_s:.0f}s; not checkpointed")
                self.store.record_dump_failure(st.checkpoint_id, "readiness timed out")
                return False
            if self.pid is None and st.pid_file:
                try:
                    self.pid = int(Path(st.pid_file).read_text())
                except (OSError, ValueError):
                    pass
            if self.pid is not None:
                if not procfs.alive(self.pid):
                    log.info("on-ready: the container exited before it was ready; not checkpointed")
                    return False
                s = self.runc.state(st.container_id)
                if s and s.get("status") == "running" and readiness.is_ready(self.pid, self.ready):
                    break
            time.sleep(POLL_S)
        log.info(f"on-ready: ready; checkpointing in {self.ready.delay_s:g}s")
        end = time.monotonic() + self.ready.delay_s
        while time.monotonic() < end:
            if not procfs.alive(self.pid):
                log.info("on-ready: the container exited while settling; not checkpointed")
                return False
            time.sleep(min(POLL_S, max(0.0, end - time.monotonic())))
        return True

    def checkpoint(self) -> None:
        st, log = self.st, self.log
        res = self.container.checkpoint(leave_running=True)
        if res.ok:
            meta = json.loads((res.path / "metadata.json").read_text())
            frozen = (meta["dump"].get("criu_stats") or {}).get("frozen_time", 0) / 1e6
            log.info(f"on-ready: checkpointed into {res.path} while running; the worker was paused {frozen:.3f}s",
                     phases=res.phases, pause_s=frozen)
        else:
            log.warning(f"on-ready: not checkpointed: {res.reason}")
        dynamo_protocol.notify_checkpoint(self.pid, self.spec, st.checkpoint_id,
                                          res.path or self.store.path(st.checkpoint_id), res.ok,
                                          None if res.ok else res.reason, log=log)


def main() -> int:
    def stopped(*_: object) -> None:
        raise Stopped()
    signal.signal(signal.SIGTERM, stopped)  # finally blocks clean a dump's temp dir
    if len(sys.argv) != 2:
        print("usage: python -m warmstart.supervisor STATE_DIR", file=sys.stderr)
        return 2
    try:
        return Supervisor(Path(sys.argv[1])).run()
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - stdio is /dev/null: the log is the only witness
        try:
            Logger(config.load().log_dir, None, {"component": "supervisor", "state_dir": sys.argv[1]}).error(
                f"on-ready supervisor failed: {type(e).__name__}: {e}")
        finally:
            return 1


if __name__ == "__main__":
    sys.exit(main())
