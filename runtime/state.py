"""Per-container runtime state under <state_dir>/containers/<container id>/.

Its existence is what the pass-through launcher stats to know a container is
ours; it holds the policy decided at create, the CRIU config file runc reads
through `org.criu.config`, the plain-dir baseline and restore work dirs.
Removed at delete (and by the poststop hook), so nothing outlives the container.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
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
    restored: bool = False
    restored_from: str | None = None
    dumped: bool = False
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
        """Exists once the container was restored; launch.py stats this name to answer `start`."""
        return self.path / "restored"

    @property
    def work(self) -> Path:
        return self.path / "work"

    def create(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.mkdir(mode=0o700, exist_ok=True)

    def exists(self) -> bool:
        return (self.path / "state.json").exists()

    def load(self) -> ContainerState:
        return ContainerState(**json.loads((self.path / "state.json").read_text()))

    def save(self, st: ContainerState) -> None:
        write_json_atomic(self.path / "state.json", asdict(st))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
