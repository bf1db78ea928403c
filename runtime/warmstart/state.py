"""Per-container runtime state under <state_dir>/containers/<container id>/.

Its existence is what the pass-through launcher stats to know a container is
ours; it holds the policy decided at create, the CRIU config file runc reads
through `org.criu.config`, the plain-dir baseline and restore work dirs.
Removed at delete and by the poststop hook (runtime/warmstart/hooks/main.py), so nothing outlives the container.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .fileutil import write_json_atomic


@dataclass
class ContainerState:
    container_id: str
    checkpoint_id: str
    mode: str
    bundle: str
    rootfs: str
    runc_root: str | None = None
    # created, checkpointed or failed (container.Status): the checkpoint outcome.  Restored-ness is
    # recorded only by the marker file (StateDir.restored_marker), which launch.py stats.
    status: str = "created"
    cgroup_path: str | None = None
    share_pid_ns: bool = False
    identity: dict | None = None
    id_source: str = "auto"
    pid_file: str | None = None
    runc_log: str | None = None
    runc_global: list[str] = field(default_factory=list)  # the shim's global flags, for later runc calls
    scope: str = "_local"  # the tenant (trust.scope_of): whose store the checkpoint lives in
    image_fingerprint: str = ""  # image_id.fingerprint of the rootfs at create, before anything ran


class StateDir:
    def __init__(self, state_dir: Path, container_id: str):
        if "/" in container_id or container_id in (".", "..") or not container_id:
            raise ValueError(f"container id {container_id!r}: not usable as a state dir name")
        self.path = state_dir / "containers" / container_id

    @property
    def criu_conf(self) -> Path:
        return self.path / "criu.conf"

    @property
    def baseline(self) -> Path:
        return self.path / "baseline.json"

    @property
    def restored_marker(self) -> Path:
        """Exists once the container was restored (holding the checkpoint id): the one record of it.
        launch.py stats this name to answer `start`."""
        return self.path / "restored"

    @property
    def work(self) -> Path:
        return self.path / "work"

    @property
    def supervisor_pid(self) -> Path:
        """The on-ready supervisor's pid (supervisor.py); the poststop hook stops it."""
        return self.path / "supervisor.pid"

    @property
    def busy_lock(self) -> Path:
        """flock(2)ed while warmstart-runtime works on this dir and will release it itself: by `create`
        (a restore and its undo journal) and `delete`.

        runc runs poststop hooks inside a failed restore's cleanup too (its own, and the
        `runc delete --force` of Runc.discard_failed_restore) and inside every `runc
        delete`: the hook (runtime/warmstart/hooks/main.py, which checks this name before importing
        anything) leaves the dir alone then.
        """
        return self.path / "busy.lock"

    def hold_busy(self) -> int:
        """Take busy_lock until this process exits or execs runc (the fd is close-on-exec); returns the fd."""
        fd = os.open(self.busy_lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    @property
    def dump_lock(self) -> Path:
        """flock'ed by an on-stop dump until its stop signal is sent; `delete` waits on it (hold, wait_unheld)."""
        return self.path / "dump.lock"

    def hold(self) -> int:
        """Take the container for a dump: returns the lock's fd, held until it is closed or its holder exits.

        Not close-on-exec: the exec of `runc kill` that ends the stop inherits it, so a client's
        `delete --force` (podman's cleanup) waits until the container got its signal, not only its checkpoint.
        """
        fd = os.open(self.dump_lock, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.set_inheritable(fd, True)  # Python opens close-on-exec; subprocess still closes it in children
        return fd

    def wait_unheld(self, timeout_s: float) -> float | None:
        """Wait until no dump holds the container; the seconds waited, or None after timeout_s."""
        try:
            fd = os.open(self.dump_lock, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0.0
        t0 = time.monotonic()
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    return time.monotonic() - t0
                except BlockingIOError:
                    if time.monotonic() - t0 >= timeout_s:
                        return None
                    time.sleep(0.05)
        finally:
            os.close(fd)

    def create(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.mkdir(mode=0o700, exist_ok=True)

    def exists(self) -> bool:
        return (self.path / "state.json").exists()

    def load(self) -> ContainerState:
        """state.json; one written by an earlier version (restored/dumped flags) reads as its status."""
        data = json.loads((self.path / "state.json").read_text())
        if data.pop("dumped", False):
            data["status"] = "checkpointed"
        known = {f.name for f in fields(ContainerState)}
        return ContainerState(**{k: v for k, v in data.items() if k in known})

    def save(self, st: ContainerState, missing_ok: bool = False) -> bool:
        """Write state.json; with missing_ok, a state dir already removed (the client deleted the
        container meanwhile) is no error: returns False, and nothing is recreated."""
        try:
            write_json_atomic(self.path / "state.json", asdict(st))
        except FileNotFoundError:
            if missing_ok and not self.path.is_dir():
                return False
            raise
        return True

    def remove(self) -> None:
        """Detach what a killed restore may have left mounted inside (CRIU's cgroup yard), then remove the
        dir without ever crossing a mount (procfs.remove_tree); a dir that cannot go is left, not forced."""
        from . import procfs  # noqa: PLC0415 - ctypes: only on delete

        procfs.umount_under(self.path)
        try:
            procfs.remove_tree(self.path)
        except OSError:
            pass
