"""File utilities every room uses: atomic JSON writes, fsync, hashing."""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HASH_CHUNK = 4 * 1024 * 1024


def fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY) if directory else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# A checkpoint's big page files are hashed as a tree: SHA-256 over the SHA-256 digests of its
# consecutive 64 MiB pieces, which threads compute side by side (hashlib releases the GIL). One
# SHA-256 stream over a GPU worker's 12 GB pages file ran at ~0.9 GB/s and was most of its publish.
TREE_SCHEME = "sha256-tree-64MiB"
TREE_PIECE = 64 << 20
TREE_MIN = 256 << 20  # smaller files: one plain SHA-256 (no thread pool for a handful of pieces)


def sha256_tree(path: Path, size: int, workers: int | None = None) -> str:
    """TREE_SCHEME's digest of the first `size` bytes of `path` (links are not followed); OSError when
    the file is shorter."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def piece(off: int) -> bytes:
        h = hashlib.sha256()
        end = min(off + TREE_PIECE, size)
        while off < end:
            b = os.pread(fd, min(HASH_CHUNK, end - off), off)
            if not b:
                raise OSError(f"{path.name}: shorter than {size} bytes")
            h.update(b)
            off += len(b)
        return h.digest()
    try:
        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
            digests = list(pool.map(piece, range(0, size, TREE_PIECE)))
    finally:
        os.close(fd)
    return hashlib.sha256(b"".join(digests)).hexdigest()


def manifest_entry(path: Path, size: int) -> dict[str, Any]:
    """A checkpoint manifest's entry for one file: its size and its digest (tree-hashed when big)."""
    if size >= TREE_MIN:
        return {"sha256": sha256_tree(path, size), "size": size, "hash": TREE_SCHEME}
    return {"sha256": sha256_file(path), "size": size}


PLAIN_SCHEME = "sha256"  # a manifest entry without "hash"


def stat_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What a seal records of a file: size, mtime, inode and ctime (no user-space call sets ctime back, so any
    write after the record shows)."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


@dataclass(frozen=True)
class KnownDigest:
    """A file's manifest digest computed from the very bytes written to it (a pull hashes each chunk as it
    unpacks it), and the file's stat identity after the last write: it stands for re-reading the file only
    while that identity holds, and only for the scheme it was computed in."""

    scheme: str
    sha256: str
    identity: tuple[int, int, int, int]


def manifest_digest(path: Path, entry: dict[str, Any], known: KnownDigest | None = None) -> str:
    """The digest of `path` computed as the manifest entry says it was (plain SHA-256 by default); `known`
    instead of a re-read when it was computed in that scheme and the file is untouched since."""
    if known is not None and known.scheme == entry.get("hash", PLAIN_SCHEME) \
            and known.identity == stat_identity(os.lstat(path)):
        return known.sha256
    if entry.get("hash") == TREE_SCHEME:
        return sha256_tree(path, int(entry["size"]))
    return sha256_file(path)


def write_json_atomic(path: Path, obj: Any, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    data = json.dumps(obj, indent=1, sort_keys=True).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
