"""Which image a container runs, by content, whatever client started it.

CRI records an image *name* in the spec; podman, `ctr` and plain runc record
nothing.  A checkpoint is bound to a fingerprint of the image's files instead:
for an overlay rootfs, a listing of its lower (image) layers; for a plain
directory, a listing of the rootfs taken at create, before the container ran.
The listing holds each entry's path, type, mode, owner, and for files size and
mtime (for links the target): what an image layer's tar fixes, so the same
image gives the same fingerprint on every node.  Lower layers never change, so
their fingerprint is cached per layer set.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

from . import procfs


def overlay_lowerdirs(rootfs: Path) -> list[Path] | None:
    """The lower dirs of the overlay mounted at rootfs (None when it is not an overlay)."""
    lower = procfs.overlay_option(procfs.mount_at(rootfs), "lowerdir")
    return [Path(p) for p in lower.split(":") if p] if lower else None


def _listing_hash(h: "hashlib._Hash", root: Path) -> None:
    """Feed `root`'s tree into h, sorted, without following links or crossing mounts."""
    dev = root.lstat().st_dev
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            entries = sorted(os.scandir(root / rel if rel else root), key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for e in entries:
            r = f"{rel}/{e.name}" if rel else e.name
            st = e.stat(follow_symlinks=False)
            row = [r, stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid]
            if stat.S_ISREG(st.st_mode):
                row += [st.st_size, st.st_mtime_ns // 1_000_000_000]
            elif stat.S_ISLNK(st.st_mode):
                row.append(os.readlink(e.path))
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                row.append(st.st_rdev)
            h.update(json.dumps(row).encode() + b"\n")
            if stat.S_ISDIR(st.st_mode) and st.st_dev == dev:
                subdirs.append(r)
        stack.extend(reversed(subdirs))


def fingerprint(rootfs: Path, cache_dir: Path | None = None) -> str:
    """`sha256:<hex>` of the image under `rootfs` (see the module doc)."""
    lowers = overlay_lowerdirs(rootfs)
    cache = None
    if lowers and cache_dir is not None:
        key = hashlib.sha256(json.dumps([[str(p), p.stat().st_ino, p.stat().st_ctime_ns] for p in lowers])
                             .encode()).hexdigest()
        cache = cache_dir / "image-fingerprints" / f"{key}.txt"
        try:
            hit = cache.read_text().strip()
            if hit.startswith("sha256:") and len(hit) == 71:
                return hit
        except OSError:
            pass
    h = hashlib.sha256()
    for layer in lowers or [rootfs]:
        h.update(b"layer\n")
        _listing_hash(h, layer)
    out = "sha256:" + h.hexdigest()
    if cache is not None:
        try:
            cache.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
            tmp.write_text(out)
            os.replace(tmp, cache)
        except OSError:
            pass  # only a cache
    return out
