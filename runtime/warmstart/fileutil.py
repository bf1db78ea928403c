"""File utilities every room uses: atomic JSON writes, fsync, hashing."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HASH_CHUNK = 4 * 1024 * 1024


def fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY) if directory else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


LOCK_POLL_S = 0.05


def lock_within(lock_nb: Callable[[], object], timeout_s: float) -> bool:
    """Retry `lock_nb` (a non-blocking flock/lockf call) until it takes the lock or timeout_s passes (0: one
    try): whether it did.  The one wait-with-a-deadline of the store, create and share locks."""
    end = time.monotonic() + timeout_s
    while True:
        try:
            lock_nb()
            return True
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):  # EWOULDBLOCK is EAGAIN; lockf may say EACCES
                raise
        if time.monotonic() >= end:
            return False
        time.sleep(LOCK_POLL_S)


class WriteBehind:
    """Starts the disk on a directory's files while they are still being written, so that the fsync after
    them waits only for the tail.

    A dump's CRIU writes into the page cache at 1.5 GB/s, and the kernel's own write-back begins only at
    vm.dirty_background_ratio (10 % of memory: 12 GB on a 128 GiB GPU node): without this the disk sat idle
    until the publish's fsync.  Every TICK_S the bytes each regular file gained are handed to the disk with
    sync_file_range(SYNC_FILE_RANGE_WRITE), which only starts write-back, never waits for it.  Entries
    are opened O_NOFOLLOW | O_NONBLOCK and must be regular files: the directory is root's, but its file
    names are CRIU's.  Best effort: any error leaves that file to the fsync."""

    TICK_S = 0.2
    SYNC_FILE_RANGE_WRITE = 2

    def __init__(self, directory: Path, syscall: Any = None) -> None:
        import threading  # noqa: PLC0415 - only a dump writes behind

        self.dir = directory
        self._sync = syscall or _sync_file_range()
        self._done: dict[str, int] = {}  # name -> bytes handed to the disk so far
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="write-behind", daemon=True)
        self.started_bytes = 0

    def __enter__(self) -> "WriteBehind":
        if self._sync is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.TICK_S):
            self.tick()

    def tick(self) -> None:
        try:
            entries = list(os.scandir(self.dir))
        except OSError:
            return
        for e in entries:
            try:  # scandir's lstat: an entry that did not grow is not opened again
                if not e.is_file(follow_symlinks=False) \
                        or e.stat(follow_symlinks=False).st_size <= self._done.get(e.name, 0):
                    continue
                fd = os.open(e.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                done = self._done.get(e.name, 0)
                if stat.S_ISREG(st.st_mode) and st.st_size > done:
                    self._sync(fd, done, st.st_size - done, self.SYNC_FILE_RANGE_WRITE)
                    self._done[e.name] = st.st_size
                    self.started_bytes += st.st_size - done
            finally:
                os.close(fd)


def _sync_file_range() -> Any:
    """libc's sync_file_range(fd, offset, nbytes, flags), or None where there is none (write-behind off)."""
    import ctypes  # noqa: PLC0415

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return fn


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
