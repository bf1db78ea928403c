"""Every CRIU option we use, the per-operation CRIU config file, and image reading via pycriu.

runc exposes only some CRIU options as flags; the rest reach CRIU through a
config file whose path runc reads from the container's `org.criu.config`
annotation (on checkpoint and on restore).  We give each opted-in container
its own such file and rewrite it before each operation.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

CONFIG_ANNOTATION = "org.criu.config"
MIN_VERSION = (4, 1)

# Dump: established TCP connections are dumped (runc --tcp-established),
# connections still in a listener's accept queue are skipped rather than
# failing the dump (a serving worker always has some; its clients retry), and
# open-but-deleted files are link-remapped.
DUMP_OPTIONS = ["link-remap", "ghost-limit 64M", "skip-in-flight"]  # CRIU spells it --skip-in-flight
# Restore: connections from the old pod cannot come back in a new network
# namespace with a new IP; restore them closed so the worker sees a reset.
RESTORE_OPTIONS = ["tcp-close"]
# Eager restore is bound by the first touch of fresh memory; warmstart's CRIU
# patch (packaging/criu-4.2.1-parallel-reads.patch) spreads each large task's page
# reads (a child's too) over this many workers.  An env var, not a config-file option: a CRIU
# without the patch ignores it instead of failing the restore.
PARALLEL_READS_ENV = "CRIU_PARALLEL_READS"
MAX_READ_THREADS = 8


@dataclass
class CriuConfig:
    """One CRIU config file's content, option per line, without leading dashes."""
    options: list[str] = field(default_factory=list)

    def render(self) -> str:
        for opt in self.options:
            if "\n" in opt or opt.startswith("-"):
                raise ValueError(f"CRIU option {opt!r}: must be one line without leading dashes")
        return "".join(o + "\n" for o in self.options)

    def write(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_text(self.render())
        path.chmod(0o600)


def dump_config(timeout_s: int, network_lock: str = "iptables") -> CriuConfig:
    lock = [] if network_lock == "iptables" else [f"network-lock {network_lock}"]  # iptables: CRIU's default
    return CriuConfig(DUMP_OPTIONS + lock + [f"timeout {int(timeout_s)}"])


def restore_config(cgroup_root: str | None, ext_mount_maps: dict[str, str] | None = None,
                   network_lock: str = "iptables") -> CriuConfig:
    """`cgroup-root :<path>` puts restored tasks into the *new* container's cgroup.

    runc 1.1.x otherwise restores them into the dumped container's cgroup on
    cgroup v2 (tests/e2e/test_runc_e2e.py restores into a new cgroup); with the new path CRIU
    recreates the tree there.
    """
    opts = list(RESTORE_OPTIONS) + ([] if network_lock == "iptables" else [f"network-lock {network_lock}"])
    if cgroup_root:
        opts.append(f"cgroup-root :{cgroup_root}")
    for key, val in (ext_mount_maps or {}).items():
        opts.append(f"ext-mount-map {key}:{val}")
    return CriuConfig(opts)


def read_threads(setting: int) -> int:
    """Threads for the restore's page reads: the config's `restore_read_threads`, 0 = one per CPU."""
    return setting if setting > 0 else max(1, min(os.cpu_count() or 1, MAX_READ_THREADS))


def has_parallel_reads(criu: Path) -> bool:
    """Whether this CRIU binary carries warmstart's parallel-reads patch (it names the env var)."""
    try:
        return PARALLEL_READS_ENV.encode() in criu.read_bytes()
    except OSError:
        return False


def restore_env(setting: int) -> dict[str, str]:
    """The environment for an eager `runc restore` (runc hands it on to CRIU)."""
    env = dict(os.environ)
    env[PARALLEL_READS_ENV] = str(read_threads(setting))
    return env


@lru_cache(maxsize=4)
def version(criu: Path) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([str(criu), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", out)
    if not m:
        return None
    return tuple(int(x) for x in m.groups() if x is not None)


def version_str(v: tuple[int, ...] | None) -> str:
    return ".".join(map(str, v)) if v else "unknown"


def parse_version(s: str) -> tuple[int, ...] | None:
    m = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?", s.strip())
    return tuple(int(x) for x in m.groups() if x is not None) if m else None


def load_image(path: Path) -> dict[str, Any]:
    """Decode one CRIU image file with pycriu (CRIU's own decoder)."""
    from pycriu import images  # noqa: PLC0415 - protobuf import is heavy; only on dump/inspect

    with open(path, "rb") as f:
        return images.load(f)


def record_thawed(image_dir: Path) -> bool:
    """Make the dump's cgroup image say THAWED where it says the freezer was FROZEN; True when it changed.

    With --freeze-cgroup CRIU records the freezer state it found, and warmstart's on-stop dump pauses
    the container itself (so that memory and rootfs are of one instant): the image then says FROZEN,
    and a restore whose cgroup CRIU has to create writes FROZEN back after the tasks are in it, and
    the restored container stays paused.  The workload was running; the image says so.
    """
    from pycriu import images  # noqa: PLC0415 - dump path only

    p = image_dir / "cgroup.img"
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        img = images.load(f)
    changed = False
    stack = [d for e in img.get("entries") or [] for c in e.get("controllers") or [] for d in c.get("dirs") or []]
    while stack:
        d = stack.pop()
        for prop in d.get("properties") or []:
            if prop.get("name") == "freezer.state" and prop.get("value") != "THAWED":
                prop["value"] = "THAWED"
                changed = True
        stack += d.get("children") or []
    if changed:
        tmp = p.with_name(p.name + ".tmp")
        with open(tmp, "wb") as f:
            images.dump(img, f)
        os.replace(tmp, p)
    return changed


# stats.proto, the only image read on the restore path: decoded here because importing
# pycriu (protobuf and every image's module) costs ~60 ms of `create`.
_STATS_FIELDS = {
    "dump": {1: "freezing_time", 2: "frozen_time", 3: "memdump_time", 4: "memwrite_time", 5: "pages_scanned",
             6: "pages_skipped_parent", 7: "pages_written", 8: "irmap_resolve", 9: "pages_lazy",
             10: "page_pipes", 11: "page_pipe_bufs", 12: "shpages_scanned", 13: "shpages_skipped_parent",
             14: "shpages_written"},
    "restore": {1: "pages_compared", 2: "pages_skipped_cow", 3: "forking_time", 4: "restore_time",
                5: "pages_restored"},
}
_STATS_ENTRY = {1: "dump", 2: "restore"}


def _varint(b: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        if i >= len(b) or shift > 63:
            raise ValueError("truncated varint")
        c = b[i]
        i += 1
        out |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            return out, i


def _fields(b: bytes) -> dict[int, int | bytes]:
    """One protobuf message's varint and length-delimited fields (the only wire types stats.proto uses)."""
    out: dict[int, int | bytes] = {}
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            out[num], i = _varint(b, i)
        elif wire == 2:
            n, i = _varint(b, i)
            if i + n > len(b):
                raise ValueError("truncated field")
            out[num], i = b[i:i + n], i + n
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return out


def read_stats(path: Path, which: str) -> dict[str, Any]:
    """CRIU's timings (µs) and page counts from a stats-dump/stats-restore image; {} when absent,
    {"error": ...} when unreadable (a bad stats file must never fail a finished dump or restore)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as e:
        return {"error": f"{path.name} unreadable: {e}"}
    try:
        # two magics (service image, stats), then one entry: a u32 size and the message
        if len(raw) < 12:
            raise ValueError("too short")
        size = int.from_bytes(raw[8:12], "little")
        entry = _fields(raw[12:12 + size])
        body = next((v for k, v in entry.items() if _STATS_ENTRY.get(k) == which), None)
        if not isinstance(body, bytes):
            return {}
        names = _STATS_FIELDS[which]
        return {names[k]: v for k, v in _fields(body).items() if k in names and isinstance(v, int)}
    except ValueError as e:
        return {"error": f"{path.name} unreadable: {e}"}


def dump_stats(work_dir: Path) -> dict[str, Any]:
    """CRIU's own dump timings (µs) and page counts from `stats-dump` (CRIU writes it to its cwd: the work dir)."""
    return read_stats(work_dir / "stats-dump", "dump")


def restore_stats(work_dir: Path) -> dict[str, Any]:
    return read_stats(work_dir / "stats-restore", "restore")


def mount_entries(image_dir: Path) -> list[dict[str, Any]]:
    """Mount points recorded in the dump (mountpoints-*.img), for remapping at restore."""
    out: list[dict[str, Any]] = []
    for p in sorted(image_dir.glob("mountpoints-*.img")):
        out.extend(load_image(p).get("entries") or [])
    return out
