"""Mounts that differ between the dumped and the restoring container, read from CRIU's own images.

CRIU records every mount of the dumped container in `mountpoints-*.img`; a
restore needs each of them to be reproducible in the new container:

- **External mounts** (`ext_key` set: runc marks every bind mount of the spec as
  external, keyed by its destination, and masked paths by `/dev/null`).  runc
  maps them on restore by destination onto the *new* spec's source, so a volume
  or secret whose host path changed is fine; one whose destination the new spec
  lacks would make CRIU fail late, so it is refused here, before CRIU runs.
- **The NVIDIA container toolkit's hook tmpfs** (`/var/run/nvidia-ctk-hook`,
  `/run/nvidia-ctk-hook<uuid>`, `/run/nvidia-ctk-hook/<uuid>`: a fresh random
  path per container) and the bind of its params file over
  `/proc/driver/nvidia/params`.  CRIU dumps a tmpfs's content and restores it
  at the *old* path; all it needs is that path's directory in the new rootfs.
  We recreate that directory (journaled, undone on failure) rather than map the
  mount onto the new container's path with `ext-mount-map`: the restoring
  bundle's createContainer hooks do not run on restore, so there is no new
  tmpfs to map onto; `ext-mount-map` applies only to mounts marked external at
  dump; and the content (a params file of the same driver: a driver mismatch is
  refused, see gpu.py) is the dumped process's own view, which is what it needs.
  Any other tmpfs that exists only in the checkpoint is handled the same way.
- **Binds over /proc files** (the toolkit's params): CRIU bind-mounts the
  restored file over the same /proc path, which must exist on this node
  (`/proc/driver/nvidia/params` exists only where the driver is loaded).

`plan()` reads the images and decides; `apply()` creates the mountpoints.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from . import criu, rootfs
from .fileutil import write_json_atomic

# The three path formats of the toolkit's hook tmpfs (resolved: /var/run is usually a link to /run).
CTK_HOOK_RE = re.compile(r"^(?:/var)?/run/nvidia-ctk-hook(?:[0-9A-Za-z-]+|/[^/]+)?$")
PARAMS = "/proc/driver/nvidia/params"
# CRIU's fstype codes (images/mnt.proto): the ones we reason about.
FSTYPE_PROC, FSTYPE_TMPFS = 1, 5


@dataclass
class MountPlan:
    reason: str | None = None                 # why the checkpoint cannot be restored here (refuse, cold start)
    mkdirs: list[str] = field(default_factory=list)   # mountpoints (absolute, container view) to recreate
    ext_mount_maps: dict[str, str] = field(default_factory=dict)  # for criu.restore_config
    notes: list[str] = field(default_factory=list)    # what was recognized, for the log


def _norm(p: str) -> str:
    p = "/" + str(p).lstrip(".").lstrip("/")
    return str(PurePosixPath(p))


def is_ctk_hook(mountpoint: str) -> bool:
    return bool(CTK_HOOK_RE.match(_norm(mountpoint)))


def spec_destinations(spec: dict[str, Any]) -> set[str]:
    return {_norm(m.get("destination", "")) for m in spec.get("mounts") or [] if m.get("destination")}


def plan(image_dir: Path, spec: dict[str, Any], proc_root: Path = Path("/proc"),
         cache: Path | None = None, key: str = "") -> MountPlan:
    """Read the checkpoint's mount entries and decide (see the module doc).

    Decoding the images loads pycriu and protobuf (~50 ms); with `cache` (a node-local
    file) and `key` (the verified checkpoint's metadata hash) that happens once per checkpoint.
    """
    try:
        entries = entries_cached(image_dir, cache, key)
    except Exception as e:  # noqa: BLE001 - an unreadable image: refuse rather than let CRIU fail late
        return MountPlan(reason=f"cannot read the checkpoint's mount images: {type(e).__name__}: {e}")
    return plan_entries(entries, spec, proc_root)


def entries_cached(image_dir: Path, cache: Path | None, key: str) -> list[dict[str, Any]]:
    """The checkpoint's mount entries, decoded once per checkpoint (the cache holds them under `key`).
    Store.seal calls it too, so that a checkpoint's first restore decodes nothing."""
    entries = _cached_entries(cache, key) if cache and key else None
    if entries is None:
        entries = criu.mount_entries(image_dir)
        if cache and key:
            _store_entries(cache, key, entries)
    return entries


def _cached_entries(cache: Path, key: str) -> list[dict[str, Any]] | None:
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return None
    return data.get("entries") if isinstance(data, dict) and data.get("key") == key else None


def _store_entries(cache: Path, key: str, entries: list[dict[str, Any]]) -> None:
    try:
        write_json_atomic(cache, {"key": key, "entries": entries})
    except (OSError, TypeError, ValueError):
        pass  # only a cache


def plan_entries(entries: list[dict[str, Any]], spec: dict[str, Any],
                 proc_root: Path = Path("/proc")) -> MountPlan:
    out = MountPlan()
    dests = spec_destinations(spec)
    runc_made = {_norm(m["destination"]) for m in spec.get("mounts") or []
                 if m.get("destination") and m.get("type") in ("cgroup", "cgroup2")}
    by_id = {e.get("mnt_id"): e for e in entries}
    root_ids = {e.get("mnt_id") for e in entries if _norm(e.get("mountpoint", "/")) == "/"}
    for e in entries:
        mp = _norm(e.get("mountpoint", "/"))
        if mp == "/":
            continue
        key = e.get("ext_key")
        if key or e.get("ext_mount"):
            if key == "/dev/null" or mp in dests or (key and _norm(key) in dests):
                continue  # runc's masked paths, and spec mounts runc maps by destination
            if any(mp.startswith(d.rstrip("/") + "/") for d in runc_made):
                continue  # runc's own binds under a cgroup mount (cgroup v1: one per hierarchy)
            out.reason = (f"mount {mp} (bind from the host) of the checkpoint is missing in the restoring "
                          f"container's spec; add the same volume/mount destination or remove the checkpoint")
            return out
        if mp in dests:
            continue  # in the new spec: runc/CRIU recreate it
        fstype = e.get("fstype")
        if mp.startswith("/proc/"):
            if not (proc_root / mp[len("/proc/"):]).exists():
                what = "the NVIDIA driver's params file" if mp == PARAMS else "a /proc file"
                out.reason = f"the checkpoint binds over {mp} ({what}), which this node lacks"
                return out
            if fstype != FSTYPE_PROC:
                out.notes.append(f"bind over {mp} restored from the checkpoint")
            continue
        parent = by_id.get(e.get("parent_mnt_id"))
        on_rootfs = e.get("parent_mnt_id") in root_ids or parent is None
        if fstype == FSTYPE_TMPFS and on_rootfs:
            out.mkdirs.append(mp)
            kind = "NVIDIA toolkit hook tmpfs" if is_ctk_hook(mp) else "tmpfs not in the spec"
            out.notes.append(f"{kind} {mp}: mountpoint recreated in the new rootfs; CRIU restores its content")
        elif on_rootfs and not (e.get("ext_key") or fstype == FSTYPE_PROC):
            # another filesystem a hook mounted directly on the rootfs: CRIU can restore it only at its old
            # mountpoint, which we recreate; CRIU itself refuses what it cannot remount
            out.mkdirs.append(mp)
            out.notes.append(f"mount {mp} (fstype {fstype}) not in the spec: mountpoint recreated")
    return out


def apply(rootfs_dir: Path, mkdirs: list[str], journal: rootfs.Journal) -> list[str]:
    """Create each missing mountpoint directory under rootfs_dir without following symlinks.

    Directories made are recorded in the journal, so `rootfs.undo` removes them
    when the restore fails.  Returns the mountpoints that had to be created.
    """
    made: list[str] = []
    root_fd = os.open(rootfs_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for mp in mkdirs:
            rel = _norm(mp).lstrip("/")
            if not rel or any(p in ("", ".", "..") for p in rel.split("/")):
                raise rootfs.RootfsError(f"mountpoint {mp!r}: not a plain path")
            rel = _resolve_var_run(root_fd, rel)
            dfd, name = rootfs._open_parent(root_fd, rel, create=True, journal=journal)
            try:
                try:
                    os.mkdir(name, 0o755, dir_fd=dfd)
                    journal.created.append(rel)
                    made.append("/" + rel)
                except FileExistsError:
                    pass
            finally:
                os.close(dfd)
    finally:
        os.close(root_fd)
    return made


def _resolve_var_run(root_fd: int, rel: str) -> str:
    """`var/run/...` where the rootfs has the usual `var/run -> /run` (or `../run`) link: use `run/...`."""
    if not rel.startswith("var/run/"):
        return rel
    try:
        target = os.readlink("var/run", dir_fd=root_fd)
    except OSError:
        return rel
    if target in ("/run", "../run", "/run/"):
        return "run/" + rel[len("var/run/"):]
    return rel
