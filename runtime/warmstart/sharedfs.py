"""The shared-filesystem store: checkpoints on a directory every node mounts (a PVC, an NFS export).

Layout on the share (`[shared_store] path`), the local store's, which is Dynamo's under each namespace:
    <share>/<ns>/<id>/checkpoint.done, metadata.json, *.img, ...   complete checkpoints only
    <share>/<ns>/.tmp/<id>.<rand>/        a publish in progress (renamed to <id> when complete)
    <share>/<ns>/.tmp/trash.<id>.<rand>/  the version a publish replaced, being deleted
    <share>/<ns>/.locks/<id>.lock         POSIX byte-range locks (sharelock.py): byte 0 = who publishes
                                          the id, byte 1 = its content (readers shared, the swap exclusive)

What a publisher that died left in `.tmp` is deleted by the next publish of that id, and by `warmstart
gc` (`sweep_share`), both by one rule (`Share._leftovers`): an entry is a dead publisher's once byte 0
of every id it may belong to could be taken after the entry was seen.

A node publishes a checkpoint it made (in the background, after the dump): it copies and fsyncs every
file into `.tmp`, then, holding byte 1 exclusively, moves the old version aside and renames the new one
into place.  A node that misses a checkpoint fetches it: holding byte 1 shared, it copies the files into
its own store's temp dir, then `Store.adopt` verifies the copy (signature by a trusted key, namespace,
every hash) and seals it.  Restores only ever read that node-local, sealed copy.

The share is untrusted, like a registry: anyone who can write it may have written anything.  Nothing
on it is followed as a symlink, opened if it is not a regular file, or trusted before the full check
of the local copy; what is copied is bounded by `max_pull_bytes` and the store's free space.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import stat
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from . import config
from .config import Settings
from .fleet import OnMiss, _spawn, fetch_detached, worker_args
from .ids import ID_RE, validate_id
from .log import Logger
from .sharelock import LockError, LockFile
from .store import MARKER, METADATA, CheckpointError, Store
from .trust import K8S_NAMESPACE_RE, LOCAL_SCOPE

PUBLISH, CONTENT = 0, 1  # the bytes of an id's lock file
SWAP_WAIT_S = 600  # how long a publish waits for readers to finish copying before it gives up
PUBLISH_WAIT_S = 5  # how long a publish waits for byte 0: gc holds it for a listing, a publisher for its copy
READ_WAIT_S = 60  # how long a fetch waits for a swap (milliseconds, unless a publisher is stuck)
MAX_FILES = 100_000  # a checkpoint dir with more entries than this is refused unread
SENDFILE_CHUNK = 1 << 30
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class ShareError(Exception):
    """The share cannot be used for this checkpoint; the message names what and why."""


def _logger(settings: Settings, scope: str, cid: str) -> Logger:
    return Logger(settings.log_dir, context={"namespace": scope, "checkpoint_id": cid, "component": "shared_store"})


def _open_dir(name: str, dir_fd: int | None, create: bool = False) -> int:
    """A directory fd, never through a symlink; created 0700 when asked."""
    if create:
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            pass
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ShareError(f"{name}: a symlink or not a directory on the share; refusing it") from None
        raise


class Share:
    """One namespace's part of the shared store."""

    def __init__(self, settings: Settings, scope: str) -> None:
        if settings.shared_store.path is None:
            raise ShareError("[shared_store] path is not set in the config; set it to the share's mount point")
        if scope != LOCAL_SCOPE and not K8S_NAMESPACE_RE.fullmatch(scope):
            raise ValueError(f"namespace {scope[:80]!r}: not a Kubernetes namespace name or {LOCAL_SCOPE}")
        self.settings, self.scope = settings, scope
        self.root = settings.shared_store.path / scope

    @contextmanager
    def _dir(self, create: bool) -> Iterator[int | None]:
        """`<share>/<ns>` as an fd (None when absent and not created).  The share's own path is the
        admin's (it may be a mount through a symlink); everything below it is not followed."""
        share = self.settings.shared_store.path
        assert share is not None
        top = os.open(share, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                fd: int | None = _open_dir(self.scope, top, create)
            except FileNotFoundError:
                fd = None
            try:
                yield fd
            finally:
                if fd is not None:
                    os.close(fd)
        finally:
            os.close(top)

    def _lock(self, sfd: int, cid: str, writable: bool) -> LockFile | None:
        """The id's lock file; None on a share where this node can neither find nor make one."""
        try:
            lfd = _open_dir(".locks", sfd, create=writable)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and not writable:
                return None
            raise
        try:
            return LockFile(lfd, f"{cid}.lock", writable)
        except LockError as e:
            if e.errno == errno.ENOENT and not writable:
                return None
            raise
        finally:
            os.close(lfd)

    # -- read ---------------------------------------------------------------------

    def digest(self, sfd: int, cid: str) -> str | None:
        """The metadata SHA-256 the share's marker of `cid` names; None when there is no complete one."""
        try:
            ifd = _open_dir(cid, sfd)
        except (FileNotFoundError, ShareError):
            return None
        try:
            raw = _read_small(ifd, MARKER, 64 * 1024)
        except (OSError, ShareError):
            return None
        finally:
            os.close(ifd)
        import json  # noqa: PLC0415
        try:
            body = json.loads(raw)
            return str(body["metadata_sha256"]) if body.get("success") is True else None
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def fetch(self, cid: str) -> bool:
        """Copy checkpoint `cid` from the share into this node's store, verified and sealed.

        False when the share has no complete checkpoint of that id; ShareError, CheckpointError or
        OSError when it has one this node must not use (nothing is left in the store then).
        """
        validate_id(cid)
        store = Store(self.settings, self.scope)
        with self._dir(create=False) as sfd:
            if sfd is None:
                return False
            lock = self._lock(sfd, cid, writable=True)
            try:
                if lock is not None and not lock.take(CONTENT, exclusive=False, timeout_s=READ_WAIT_S):
                    raise ShareError(f"{cid}: a publish has held the share's lock for over {READ_WAIT_S}s")
                try:
                    ifd = _open_dir(cid, sfd)
                except FileNotFoundError:
                    return False
                try:
                    if not _regular(ifd, MARKER):
                        return False
                    tmp = store.new_tmp(cid)
                    try:
                        _copy_out(ifd, tmp, _budget(store.root, self.settings.max_pull_bytes))
                    except BaseException:
                        shutil.rmtree(tmp, ignore_errors=True)
                        raise
                finally:
                    os.close(ifd)
            finally:
                if lock is not None:
                    lock.close()
        try:
            store.adopt(cid, tmp)  # the full check (signature, namespace, hashes), the rename, the seal
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already when adopted
        return True

    # -- write --------------------------------------------------------------------

    def publish(self, cid: str) -> str:
        """Copy this node's checkpoint `cid` to the share, replacing any other version; returns what happened."""
        store = Store(self.settings, self.scope)
        ckpt = store.open_verified(cid)  # never publish a damaged checkpoint (the node's seal, else every hash)
        with store.lock(cid, exclusive=False, blocking=True), self._dir(create=True) as sfd:
            assert sfd is not None
            lock = self._lock(sfd, cid, writable=True)
            assert lock is not None
            with lock:
                if not lock.take(PUBLISH, exclusive=True, timeout_s=PUBLISH_WAIT_S):
                    return "skipped: another node is publishing this checkpoint"
                if self.digest(sfd, cid) == ckpt.metadata_sha256:
                    return "skipped: the share already has this version"
                tfd = _open_dir(".tmp", sfd, create=True)
                try:
                    for entry in self._leftovers(sfd, tfd, mine=cid)[0]:  # what dead publishers of cid left
                        _remove(tfd, entry)
                    name = f"{cid}.{secrets.token_hex(6)}"
                    try:
                        size = _copy_in(ckpt.path, tfd, name)
                        if not lock.take(CONTENT, exclusive=True, timeout_s=SWAP_WAIT_S):
                            raise ShareError(f"readers held {cid} on the share for over {SWAP_WAIT_S}s; not replaced")
                        try:
                            old = _swap(sfd, tfd, name, cid)
                        finally:
                            lock.release(CONTENT)
                    except BaseException:
                        _remove(tfd, name)
                        raise
                    if old:
                        _remove(tfd, old)
                finally:
                    os.close(tfd)
        return f"published {size} bytes to {self.root / cid}" + (" (replaced the version there)" if old else "")

    # -- leftovers ----------------------------------------------------------------

    def _leftovers(self, sfd: int, tfd: int, mine: str | None = None) -> tuple[list[str], list[str]]:
        """`.tmp`'s entries split into (no live publisher's, maybe a live publisher's); with `mine`, the id
        whose byte 0 the caller (a publish) holds, only the entries that may be that id's.

        The one rule, for a publish and for `warmstart gc`: a publisher holds byte 0 of its id's lock
        from before it makes an entry until it has renamed or deleted it, and no name is ever made twice.
        So an entry seen here, when byte 0 of every id it may belong to is then held by this process,
        is a dead publisher's (the kernel drops a dead holder's lock, the NFS server a dead node's when
        its lease runs out) and stays so after the locks are let go.  A name no publisher makes has no
        owner: it is stale at once.  There is no age threshold: the lock is the whole test.
        """
        taken: dict[str, LockFile | None] = {}  # the ids this call tried: their lock, None if held elsewhere

        def gone(cid: str) -> bool:
            if cid == mine:
                return True
            if cid not in taken:
                try:
                    lock = self._lock(sfd, cid, writable=True)
                except LockError:
                    lock = None  # a planted lock file: nobody can publish this id, nor judge its entries
                if lock is not None and not lock.take(PUBLISH, exclusive=True):
                    lock.close()
                    lock = None
                taken[cid] = lock
            return taken[cid] is not None

        stale, busy = [], []
        try:
            for entry in sorted(os.listdir(tfd)):
                owners = _owners(entry)
                if mine is None or mine in owners:
                    (stale if all([gone(c) for c in owners]) else busy).append(entry)
        finally:
            for lock in taken.values():
                if lock is not None:
                    lock.close()
        return stale, busy

    def sweep(self) -> Sweep:
        """Delete what dead publishers left in this namespace's `.tmp` (`warmstart gc`).

        Byte 0 of an id is held only while the listing is judged, not while the entries are deleted, so
        a publish of that id that starts meanwhile waits a moment (within PUBLISH_WAIT_S), never skips.
        """
        out = Sweep()
        with self._dir(create=False) as sfd:
            if sfd is None:
                return out
            try:
                tfd = _open_dir(".tmp", sfd)
            except FileNotFoundError:
                return out
            try:
                stale, busy = self._leftovers(sfd, tfd)
                for entry in stale:
                    try:
                        _remove(tfd, entry)
                        out.removed.append(f"{self.root}/.tmp/{entry}")
                    except OSError as e:
                        out.errors.append(f"{self.root}/.tmp/{entry}: not removed: {e.strerror}")
                out.kept += [f"{self.root}/.tmp/{entry}" for entry in busy]
            finally:
                os.close(tfd)
        return out


@dataclass
class Sweep:
    """What `warmstart gc` did to the share's `.tmp` dirs."""

    removed: list[str] = field(default_factory=list)  # paths of dead publishers' entries, deleted
    kept: list[str] = field(default_factory=list)  # entries whose id's publish lock is held: in progress
    errors: list[str] = field(default_factory=list)  # one line each: what could not be swept, and why


def sweep_share(settings: Settings) -> Sweep:
    """Sweep every namespace's `.tmp` on the configured share, logging each namespace's outcome."""
    share = settings.shared_store.path
    if share is None:
        return Sweep()
    out = Sweep()
    try:
        scopes = sorted(n for n in os.listdir(share) if n == LOCAL_SCOPE or K8S_NAMESPACE_RE.fullmatch(n))
    except OSError as e:
        out.errors.append(f"{share}: the shared store is not readable ({e.strerror}); not swept")
        return out
    for scope in scopes:
        log = Logger(settings.log_dir, context={"namespace": scope, "component": "shared_store"})
        try:
            got = Share(settings, scope).sweep()
        except (OSError, ShareError) as e:
            got = Sweep(errors=[f"{share / scope}: not swept: {e}"])
        if got.removed:
            log.info(f"gc removed {len(got.removed)} entries dead publishers left: {', '.join(got.removed)}"
                     + (f"; kept {len(got.kept)} of publishes in progress" if got.kept else ""),
                     removed=len(got.removed))
        for err in got.errors:
            log.warning(f"gc: {err}")
        out.removed += got.removed
        out.kept += got.kept
        out.errors += got.errors
    return out


def _swap(sfd: int, tfd: int, name: str, cid: str) -> str | None:
    """Move the share's `cid` aside (if any) and `.tmp/name` into its place; returns the aside name."""
    old: str | None = f"trash.{cid}.{secrets.token_hex(6)}"
    try:
        os.rename(cid, old, src_dir_fd=sfd, dst_dir_fd=tfd)
    except FileNotFoundError:
        old = None
    os.rename(name, cid, src_dir_fd=tfd, dst_dir_fd=sfd)
    os.fsync(sfd)
    os.fsync(tfd)
    return old


def _owners(entry: str) -> list[str]:
    """The ids whose publisher may have made `.tmp/entry`, `<id>.<rand>` or `trash.<id>.<rand>` (an id may
    itself begin with "trash.": then both); [] for a name no publisher makes."""
    m = re.fullmatch(r"(.+)\.[0-9a-f]{12}", entry)
    if m is None:
        return []
    ids = [m[1], m[1].removeprefix("trash.")] if m[1].startswith("trash.") else [m[1]]
    return [cid for cid in ids if ID_RE.fullmatch(cid)]


def _remove(dfd: int, name: str) -> None:
    """Delete `name` in dfd, whatever it is (a dir tree, or a symlink someone planted), following nothing."""
    try:
        if stat.S_ISDIR(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
            shutil.rmtree(name, dir_fd=dfd, ignore_errors=True)
        else:
            os.unlink(name, dir_fd=dfd)
    except FileNotFoundError:
        pass


def _budget(directory: Path, max_bytes: int) -> int:
    from .oci import budget  # noqa: PLC0415 - the registry pull's bound, shared

    return budget(directory, max_bytes)


def _regular(dfd: int, name: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _open_regular(dfd: int, name: str) -> tuple[int, os.stat_result]:
    """Open a file of the share for reading: a plain name, no symlink, no FIFO or device (rootfs.open_regular)."""
    from .rootfs import RootfsError, open_regular  # noqa: PLC0415

    if "/" in name or name.startswith(".") or name in ("", "..") or len(name) > 255:
        raise ShareError(f"{name[:80]!r}: not a checkpoint file name; refusing the checkpoint")
    try:
        return open_regular(dfd, name, os.O_RDONLY)
    except FileNotFoundError:
        raise ShareError(f"{name}: vanished from the share during the copy") from None
    except RootfsError as e:
        raise ShareError(f"{e} on the share; refusing it") from None


def _read_small(dfd: int, name: str, limit: int) -> bytes:
    fd, st = _open_regular(dfd, name)
    try:
        if st.st_size > limit:
            raise ShareError(f"{name}: {st.st_size} bytes exceeds the {limit}-byte limit")
        return os.read(fd, limit + 1)
    finally:
        os.close(fd)


def _copy_exact(src: int, dst: int, size: int, name: str) -> None:
    """Exactly `size` bytes from src to dst (a file that shrinks under the copy is an error)."""
    done = 0
    while done < size:
        n = os.sendfile(dst, src, done, min(SENDFILE_CHUNK, size - done))
        if n == 0:
            raise ShareError(f"{name}: shorter than its {size} bytes (changed during the copy)")
        done += n


def _copy_out(ifd: int, dest: Path, budget: int) -> None:
    """Every entry of the share's checkpoint dir into the node-local `dest`, each written, then fsynced."""
    with os.scandir(ifd) as it:
        names = []
        for e in it:
            names.append(e.name)
            if len(names) > MAX_FILES:
                raise ShareError(f"more than {MAX_FILES} entries in the checkpoint dir on the share; refusing it")
    total = 0
    for name in sorted(names):
        src, st = _open_regular(ifd, name)
        try:
            total += st.st_size
            if total > budget:
                raise ShareError(f"over {budget} bytes (max_pull_bytes or the store's free space) at {name}; "
                                 "refusing the checkpoint")
            out = os.open(dest / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                _copy_exact(src, out, st.st_size, name)
                os.fsync(out)
            finally:
                os.close(out)
        finally:
            os.close(src)
    fd = os.open(dest, DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_in(src_dir: Path, tfd: int, name: str) -> int:
    """A verified local checkpoint into `.tmp/name` on the share: every file written and fsynced, the
    marker last, then the dir; returns the bytes copied."""
    os.mkdir(name, 0o700, dir_fd=tfd)
    nfd = _open_dir(name, tfd)
    total = 0
    try:
        entries = sorted(src_dir.iterdir(), key=lambda p: (p.name == MARKER, p.name == METADATA, p.name))
        for p in entries:
            src = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                size = os.fstat(src).st_size
                out = os.open(p.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                              dir_fd=nfd)
                try:
                    _copy_exact(src, out, size, p.name)
                    os.fsync(out)
                finally:
                    os.close(out)
            finally:
                os.close(src)
            total += size
        os.fsync(nfd)
    finally:
        os.close(nfd)
    return total


# -- the automatic paths ---------------------------------------------------------

def fetch_on_miss(settings: Settings, scope: str, cid: str, deadline_s: float | None = None,
                  deadline_source: str = "fetch_deadline_s") -> bool:
    """`create` found no checkpoint `cid` for namespace `scope`: fetch it from the share, waiting at most
    `deadline_s` (default [shared_store] fetch_deadline_s; `deadline_source` names what set it in the log
    line).  True when the checkpoint is in the store.

    Like the registry's pull_on_miss (fleet.fetch_detached): one detached fetch per key on the node, going
    on past the deadline for the next container; any refusal is one log line and the store unchanged.
    """
    cfg = settings.shared_store
    if not cfg.fetches_on_miss:
        return False
    m = OnMiss(settings, scope, cid, "fetch", "sharedfs", "fetch from the shared store",
               f"fetch of {cfg.path}/{scope}/{cid}", deadline_source, _logger(settings, scope, cid))
    return fetch_detached(m, cfg.fetch_deadline_s if deadline_s is None else deadline_s)


def publish_in_background(settings: Settings, scope: str, cid: str) -> bool:
    """After a successful dump: copy the checkpoint to the share without waiting for it (True when started)."""
    if not settings.shared_store.publishes:
        return False
    try:
        _spawn(settings, ["publish", "--namespace", scope, cid], module="sharedfs")
        return True
    except OSError as e:
        _logger(settings, scope, cid).warning(f"publish to the shared store not started: {e}")
        return False


def _run_publish(settings: Settings, scope: str, cid: str) -> int:
    log = _logger(settings, scope, cid)
    t0 = time.monotonic()
    try:
        what = Share(settings, scope).publish(cid)
    except (OSError, ValueError, ShareError, CheckpointError) as e:
        log.warning(f"publish of {cid} to the shared store failed: {e}")
        return 1
    log.info(f"{what} in {time.monotonic() - t0:.1f}s", seconds=round(time.monotonic() - t0, 3))
    return 0


def _run_fetch(settings: Settings, scope: str, cid: str, lock_fd: int) -> int:
    """Holds the key's node-local lock (inherited from fetch_on_miss) until the fetch is over."""
    log = _logger(settings, scope, cid)
    t0 = time.monotonic()
    where = f"{settings.shared_store.path}/{scope}/{cid}"
    try:
        if Store(settings, scope).exists(cid):
            return 0
        if not Share(settings, scope).fetch(cid):
            log.info(f"no checkpoint {where} in the shared store")
            return 1
        log.info(f"fetched {where}, verified and sealed, in {time.monotonic() - t0:.1f}s",
                 seconds=round(time.monotonic() - t0, 3))
        return 0
    except (OSError, ValueError, ShareError, CheckpointError) as e:
        log.warning(f"fetch of {where} refused: {e}; the store is unchanged")
        return 1
    finally:
        os.close(lock_fd)  # after the log line: whoever waits on the lock sees the outcome logged


def main(argv: list[str] | None = None) -> int:
    args = worker_args("python -m warmstart.sharedfs", ["publish", "fetch"], __doc__, argv)
    settings = config.load()
    if args.action == "publish":
        return _run_publish(settings, args.namespace, args.id)
    return _run_fetch(settings, args.namespace, args.id, args.lock_fd)


if __name__ == "__main__":
    sys.exit(main())
