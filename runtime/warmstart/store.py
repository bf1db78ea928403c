"""The checkpoint store: layout, atomic publish, per-id locks, sealing and verification.

Layout (one dir per namespace, each compatible with Dynamo's store):
    <root>/<id>/checkpoint.done   JSON marker, written last, then the dir is renamed into place
                metadata.json     schema-checked; carries a SHA-256 manifest of every other file
                dump.log rootfs-diff.tar deleted.files descriptors.json *.img
    <root>/.tmp/<id>.<rand>/      dumps in progress (never seen as complete; `warmstart gc` reaps)
    <root>/.locks/<id>.lock       flock: exclusive for dump/remove/gc, shared while restoring
    <root>/.quarantine/<id>.json  consecutive failed restores; quarantined ids are not used
    <root>/.status/<id>.json      why the last dump of an id failed (cleared by a success)
    <seal_dir>/<id>.json          node-local seal: stat identity of each file, taken after hashing

Dot-names cannot collide with ids (ids never start with '.').  A checkpoint is
untrusted input: `open_verified` checks ownership, modes, symlinks, the marker,
the schema, and either the node's seal (cheap: stats) or every hash (then seals).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Iterator

from .ids import validate_id
from .config import Settings
from .phases import Phases
from .trust import K8S_NAMESPACE_RE, LOCAL_SCOPE
from .dynamo_protocol import marker_body
from .fileutil import KnownDigest, fsync_path, lock_within, manifest_digest, manifest_entry, sha256_file, \
    stat_identity, write_json_atomic  # noqa: F401
from .signing import SignatureError, TrustPolicy, sign

MARKER = "checkpoint.done"
METADATA = "metadata.json"
ROOTFS_DIFF = "rootfs-diff.tar"
DELETED = "deleted.files"
DUMP_LOG = "dump.log"
CONTROL_FILES = {MARKER, METADATA}
DERIVED = ("mounts", "security")  # node-local caches of what a restore decodes from the images
USED = "used"  # <seal_dir>/<scope>/<id>.used.json: when this node last restored it (gc --budget, LRU)
MAX_METADATA = 16 * 1024 * 1024


class CheckpointError(Exception):
    """A checkpoint that must not be used; the message names the offending entry."""


@dataclass
class Checkpoint:
    id: str
    path: Path
    metadata: dict[str, Any]
    verified_by: str  # "seal" or "hash"
    metadata_sha256: str = ""  # identifies this exact checkpoint: a key for what is derived from it
    signer: str = ""  # the trusted key that signed it (signing.TrustPolicy.verify)


class Store:
    """One scope's checkpoints: `<store>/<scope>/`, laid out as Dynamo's store (see trust.py for scopes)."""

    def __init__(self, settings: Settings, scope: str = LOCAL_SCOPE):
        if scope != LOCAL_SCOPE and not K8S_NAMESPACE_RE.fullmatch(scope):
            raise ValueError(f"scope {scope[:80]!r}: not a Kubernetes namespace name or {LOCAL_SCOPE}")
        self.settings = settings
        self.scope = scope
        self.root = settings.store / scope
        self.seal_dir = settings.seal_dir / scope
        self.policy = TrustPolicy(settings.trusted_keys)

    # -- layout ---------------------------------------------------------------
    def path(self, cid: str) -> Path:
        return self.root / validate_id(cid)

    def ensure(self) -> None:
        for d in (self.settings.store, self.root, self.root / ".tmp", self.root / ".locks", self.root / ".quarantine",
                  self.settings.seal_dir, self.seal_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    @staticmethod
    def scopes(settings: Settings) -> list[str]:
        """The scopes that have a store dir (a dir holding checkpoint.done is a pre-scope checkpoint, not one)."""
        try:
            return sorted(p.name for p in settings.store.iterdir() if p.is_dir() and not p.is_symlink()
                          and (p.name == LOCAL_SCOPE or K8S_NAMESPACE_RE.fullmatch(p.name))
                          and not (p / MARKER).exists())
        except FileNotFoundError:
            return []

    def exists(self, cid: str) -> bool:
        """A complete checkpoint is present (cheap; no verification)."""
        return (self.path(cid) / MARKER).is_file()

    def ids(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir() if not p.name.startswith("."))
        except FileNotFoundError:
            return []

    # -- locks ----------------------------------------------------------------
    @contextmanager
    def lock(self, cid: str, exclusive: bool = True, blocking: bool = False,
             timeout_s: float | None = None) -> Iterator[bool]:
        """Yields True when the lock is held, False when someone else holds it (non-blocking, or still
        after timeout_s when blocking with one).

        `remove` and `gc` unlink a lock file while holding it exclusively; whoever was waiting on
        the old file then holds a lock nobody else can see, so a lock counts only while its file is
        still the one at the path (else it is taken again on the new file).
        """
        lock_path = self.root / ".locks" / f"{validate_id(cid)}.lock"
        end = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                self.ensure()
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as e:
                if e.errno != errno.EROFS or exclusive:
                    raise
                try:  # a read-only store can still be restored from: flock works on a read-only fd
                    fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    yield True  # no lock file on a read-only store: nothing can remove the checkpoint anyway
                    return
            try:
                flags = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
                try:
                    if blocking and end is not None:
                        if not lock_within(partial(fcntl.flock, fd, flags | fcntl.LOCK_NB),
                                                  end - time.monotonic()):
                            raise BlockingIOError
                    else:
                        fcntl.flock(fd, flags | (0 if blocking else fcntl.LOCK_NB))
                except BlockingIOError:
                    yield False
                    return
                try:
                    current = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    current = False
                if current:
                    yield True
                    return
            finally:
                os.close(fd)

    # -- publish --------------------------------------------------------------
    def new_tmp(self, cid: str) -> Path:
        self.ensure()
        tmp = self.root / ".tmp" / f"{validate_id(cid)}.{secrets.token_hex(6)}"
        tmp.mkdir(mode=0o700)
        return tmp

    def publish(self, cid: str, tmp: Path, metadata: dict[str, Any]) -> Path:
        """Hash, fsync and atomically rename a finished dump into place (caller holds the lock).

        The marker is the last file written, inside the temp dir, and the rename
        makes the whole checkpoint appear at once: no reader sees half of it.
        """
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415 - only a dump publishes

        files: list[tuple[Path, int]] = []
        for entry in sorted(tmp.iterdir()):
            st = entry.lstat()
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError(f"{entry.name}: not a regular file in the dump; refusing to publish")
            if entry.name in CONTROL_FILES:
                continue
            entry.chmod(0o600)
            files.append((entry, st.st_size))
        # The write-back to disk (fsync) and the hash (reading the page cache) each release the
        # GIL: run them side by side instead of one after the other.  Both end before the marker.
        with ThreadPoolExecutor(max_workers=1) as pool:
            synced = pool.submit(lambda: [fsync_path(entry) for entry, _ in files])
            manifest = {entry.name: manifest_entry(entry, size) for entry, size in files}
            synced.result()
        total = sum(size for _, size in files)
        metadata = dict(metadata, manifest=manifest)
        metadata["sizes"] = dict(metadata.get("sizes") or {}, total_bytes=total, files=len(manifest))
        from .metadata import validate  # noqa: PLC0415 - jsonschema is heavy; only at publish
        validate(metadata)
        write_json_atomic(tmp / METADATA, metadata)
        final = self.path(cid)
        marker = marker_body(cid, final, True, None)
        marker["metadata_sha256"] = sha256_file(tmp / METADATA)  # the manifest cannot cover its own file
        try:
            marker["signature"] = sign(self.settings.signing_key, marker["metadata_sha256"])
        except SignatureError as e:
            raise CheckpointError(str(e)) from None
        write_json_atomic(tmp / MARKER, marker)
        fsync_path(tmp, directory=True)
        if final.exists() or final.is_symlink():
            if (final / MARKER).is_file():
                raise CheckpointError(f"{cid}: a complete checkpoint already exists; not replacing it")
            self._discard(final)  # a leftover without marker (crash before this design's rename)
        os.rename(tmp, final)
        fsync_path(self.root, directory=True)
        (self.root / ".status" / f"{cid}.json").unlink(missing_ok=True)
        self.seal(cid, final, metadata, signer=f"{marker['signature']['key_id']} (this node)")
        return final

    def _discard(self, path: Path) -> None:
        """Move aside then delete, so a half-deleted dir is never at a checkpoint's name."""
        trash = self.root / ".tmp" / f"trash.{secrets.token_hex(6)}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        if trash.is_symlink() or not trash.is_dir():
            trash.unlink()
        else:
            shutil.rmtree(trash, ignore_errors=True)

    def remove(self, cid: str) -> bool:
        """Remove checkpoint `cid` and everything kept about it; True when there was anything to remove."""
        with self.lock(cid) as held:
            if not held:
                raise CheckpointError(f"{cid}: checkpoint is in use (restore or dump running); try again")
            path = self.path(cid)
            existed = path.exists() or path.is_symlink() or self.dump_failure(cid) is not None \
                or self._qpath(cid).exists()
            self._discard(path)
            self._forget(cid)
            return existed

    def _forget(self, cid: str) -> None:
        """Drop what is kept about `cid` besides its dir (caller holds its lock exclusively): seal, derived
        caches, its quarantine here and in the scopes it is shared with, dump status, and the lock file."""
        for f in [self.seal_dir / f"{cid}.json", *self.seal_dir.glob(f"{glob_escape(cid)}.*.json"),
                  self._qpath(cid), self.root / ".status" / f"{cid}.json",
                  *(Store(self.settings, other)._qpath(cid, self.scope)
                    for other in Store.scopes(self.settings) if other != self.scope)]:
            f.unlink(missing_ok=True)
        (self.root / ".locks" / f"{cid}.lock").unlink(missing_ok=True)

    # -- seal -----------------------------------------------------------------
    def _stat_record(self, path: Path) -> dict[str, list[int]]:
        return {entry.name: list(stat_identity(entry.lstat())) for entry in path.iterdir()}

    def seal(self, cid: str, path: Path, metadata: dict[str, Any], signer: str = "") -> None:
        """Record what the files looked like right after a full hash and signature check.

        ctime cannot be set from user space, so any later write to a file is seen
        by a stat at restore time without rereading GiBs of images.  The trust
        policy's fingerprint is recorded too: a changed key list means a full check.
        """
        self.seal_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = sha256_file(path / METADATA)
        write_json_atomic(self.seal_dir / f"{cid}.json", {
            "id": cid, "path": str(path), "sealed_at": time.time(), "signer": signer,
            "trust": self.policy.fingerprint, "metadata_sha256": key, "files": self._stat_record(path)})
        self._derive(cid, path, key)

    def _derive(self, cid: str, path: Path, key: str) -> None:
        """What a restore derives from the images, derived when the checkpoint is sealed, off create's path:
        the mount entries and the tasks' credentials (pycriu and protobuf: 0.09-0.16 s on the first restore
        of each checkpoint on the H200).  Only caches keyed by the metadata hash: a restore that finds none,
        or an image these cannot read, decodes and judges for itself."""
        from . import mounts, trust  # noqa: PLC0415 - pycriu; only where a checkpoint is sealed
        for derive, name in ((mounts.entries_cached, "mounts"), (trust.tasks_cached, "security")):
            try:  # a cache already holding `key` (a re-seal) is read, not decoded again
                derive(path, self._derived_path(cid, name), key)
            except Exception:  # noqa: BLE001 - the restore reads the images again and refuses with the reason
                pass

    def _seal_matches(self, cid: str, path: Path) -> str | None:
        """None when the seal holds; else why not."""
        try:
            seal = json.loads((self.seal_dir / f"{cid}.json").read_text())
        except FileNotFoundError:
            return "no seal on this node"
        except (OSError, ValueError) as e:
            return f"unreadable seal ({e})"
        if seal.get("path") != str(path):
            return "seal is for another path"
        if seal.get("trust") != self.policy.fingerprint:
            return "sealed under another trust policy"
        now = self._stat_record(path)
        if now != seal.get("files"):
            changed = sorted(set(now) ^ set(seal.get("files") or {}) |
                             {k for k in now if now.get(k) != (seal.get("files") or {}).get(k)})
            return f"files changed since sealed: {', '.join(changed[:5])}"
        return None

    # -- verify ---------------------------------------------------------------
    def open_verified(self, cid: str, full: bool = False) -> Checkpoint:
        """Everything we check before a checkpoint may touch a rootfs or CRIU.

        The node's seal (stats) stands for the hashes; without a matching seal,
        or with full=True, every file is hashed and the checkpoint re-sealed.
        """
        path = self.path(cid)
        _check_owned_dir(self.settings.store, "store root")
        _check_owned_dir(self.root, f"store of {self.scope}")
        if not full and self._seal_matches(cid, path) is None:
            _check_owned_dir(path, f"checkpoint {cid}")
            _marker(path)
            raw = _read_control(path / METADATA, MAX_METADATA)
            seal = json.loads((self.seal_dir / f"{cid}.json").read_text())
            if hashlib.sha256(raw).hexdigest() == seal.get("metadata_sha256"):
                try:
                    return Checkpoint(cid, path, json.loads(raw), "seal", seal["metadata_sha256"],
                                      str(seal.get("signer", "")))
                except ValueError:
                    pass  # cannot happen for a sealed file; fall through to the full check
        metadata, signer = verify_dir(path, cid, self.policy, self.scope)
        self.seal(cid, path, metadata, signer)
        return Checkpoint(cid, path, metadata, "hash", sha256_file(path / METADATA), signer)

    def derived_cache(self, ckpt: Checkpoint, name: str) -> Path:
        """A node-local file for data derived from a verified checkpoint (keyed by its metadata hash)."""
        return self._derived_path(ckpt.id, name)

    def _derived_path(self, cid: str, name: str) -> Path:
        return self.seal_dir / f"{cid}.{name}.json"

    def adopt(self, cid: str, tmp: Path, phases: Phases | None = None,
              known: dict[str, KnownDigest] | None = None) -> Path:
        """Move a checkpoint that came from elsewhere (a registry) into place, after a full check in tmp.

        The files are hashed once, here in tmp (`known`: digests the pull computed from the bytes it wrote,
        each valid only while its file's stat identity holds); the seal is then written under the final
        path from the same check, unless a file's stat changed since just before it (then all is checked
        again there).
        """
        phase = phases or Phases()
        with phase("verify"):
            before = self._stat_record(tmp)
            metadata, signer = verify_dir(tmp, cid, self.policy, self.scope, known)
        final = self.path(cid)
        with self.lock(cid) as held:
            if not held:
                raise CheckpointError(f"{cid}: the id is locked by a dump, restore or gc; try again")
            if (final / MARKER).is_file():
                raise CheckpointError(f"{cid}: a complete checkpoint already exists; `warmstart remove {cid}` first")
            if final.exists() or final.is_symlink():
                self._discard(final)
            os.rename(tmp, final)
            fsync_path(self.root, directory=True)
        with phase("seal"):
            _check_owned_dir(self.settings.store, "store root")
            _check_owned_dir(self.root, f"store of {self.scope}")
            if self._stat_record(final) == before:
                self.seal(cid, final, metadata, signer)
            else:
                self.open_verified(cid, full=True)  # touched while checked: check again, and seal that
        return final

    # -- quarantine -----------------------------------------------------------
    def _qpath(self, cid: str, owner: str | None = None) -> Path:
        """Quarantine counts per restoring scope: a shared checkpoint's under `<owner>~<id>` (ids have no '~')."""
        name = validate_id(cid) if owner is None else f"{Store(self.settings, owner).scope}~{validate_id(cid)}"
        return self.root / ".quarantine" / f"{name}.json"

    def quarantine_state(self, cid: str, owner: str | None = None) -> dict[str, Any]:
        try:
            return json.loads(self._qpath(cid, owner).read_text())
        except (OSError, ValueError):
            return {"failures": 0, "quarantined": False}

    def record_restore(self, cid: str, ok: bool, reason: str | None = None, owner: str | None = None) -> dict[str, Any]:
        qpath = self._qpath(cid, owner)
        if ok:
            if qpath.exists():  # unlink(missing_ok) still fails with EROFS on a read-only store
                qpath.unlink(missing_ok=True)
            return {"failures": 0, "quarantined": False}
        q = self.quarantine_state(cid, owner)
        q["failures"] = int(q.get("failures", 0)) + 1
        q["last_error"] = reason
        q["last_failure"] = time.time()
        q["quarantined"] = q["failures"] >= self.settings.max_restore_failures
        try:
            self.ensure()
            write_json_atomic(qpath, q)
        except OSError as e:  # a read-only store: the failure still counts for this attempt's message
            q["not_recorded"] = f"{type(e).__name__}: {e.strerror or e}"
        return q

    def record_dump_failure(self, cid: str, reason: str) -> None:
        """Why the last attempt to checkpoint this id failed (shown by `warmstart list`)."""
        self.ensure()
        (self.root / ".status").mkdir(mode=0o700, exist_ok=True)
        write_json_atomic(self.root / ".status" / f"{validate_id(cid)}.json",
                          {"state": "failed", "error": reason[:500], "time": time.time()})

    def dump_failure(self, cid: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.root / ".status" / f"{validate_id(cid)}.json").read_text())
        except (OSError, ValueError):
            return None

    # -- use (gc --budget) -------------------------------------------------------
    def mark_used(self, cid: str) -> None:
        """Record that this node restored `cid` now (node-local, beside the seal); never fails a restore."""
        try:
            p = self.seal_dir / f"{validate_id(cid)}.{USED}.json"
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.close(fd)
            os.utime(p)
        except (OSError, ValueError):
            pass

    def last_used(self, cid: str) -> float:
        """When this node last restored `cid`, else when it was published here."""
        for p in (self.seal_dir / f"{cid}.{USED}.json", self.path(cid) / MARKER):
            try:
                return p.lstat().st_mtime
            except OSError:
                continue
        return 0.0

    def bytes_used(self, cid: str) -> int:
        return tree_bytes(self.path(cid))

    def clear_quarantine(self, cid: str, owner: str | None = None) -> None:
        self._qpath(cid, owner).unlink(missing_ok=True)

    # -- gc -------------------------------------------------------------------
    def gc(self, max_tmp_age_s: float = 0) -> list[str]:
        """Reap abandoned temp dirs and incomplete checkpoints whose lock is free."""
        removed = []
        tmpdir = self.root / ".tmp"
        if tmpdir.is_dir():
            for entry in tmpdir.iterdir():
                cid = entry.name.rsplit(".", 1)[0]  # ids may contain dots; the suffix is ours
                if entry.name.startswith("trash."):
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(str(entry))
                    continue
                try:
                    if time.time() - entry.lstat().st_mtime < max_tmp_age_s:
                        continue
                    with self.lock(cid) as held:
                        if held:
                            shutil.rmtree(entry, ignore_errors=True)
                            removed.append(str(entry))
                except (ValueError, OSError):
                    continue
        for cid in self.ids():
            p = self.root / cid
            if not (p / MARKER).is_file():
                try:
                    with self.lock(cid) as held:
                        if held and not (p / MARKER).is_file():
                            self._discard(p)
                            self._forget(cid)
                            removed.append(str(p))
                except ValueError:
                    continue
        removed += self._reap_orphans(max_tmp_age_s)
        return removed

    def _reap_orphans(self, max_age_s: float) -> list[str]:
        """Locks, seals and caches of ids that have no checkpoint (and no dump in progress), and dump
        failures older than max_age_s: what `list` would otherwise show forever."""
        out = []
        known = {p.name.rsplit(".", 1)[0] for p in (self.root / ".tmp").glob("*")} | set(self.ids())
        names = {p.name.split(".lock")[0] for p in (self.root / ".locks").glob("*.lock")}
        names |= {_seal_owner(p.name) for p in self.seal_dir.glob("*.json")} if self.seal_dir.is_dir() else set()
        names |= {p.stem for p in (self.root / ".status").glob("*.json")}
        for cid in sorted(names - known):
            status = self.root / ".status" / f"{cid}.json"
            try:
                if status.exists() and time.time() - status.stat().st_mtime < max_age_s:
                    continue
                with self.lock(cid) as held:
                    if held and not self.path(cid).exists():
                        self._forget(cid)
                        out.append(f"{self.root}/{cid} (status, lock, seal)")
            except (ValueError, OSError):
                continue
        return out


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (links not followed; 0 when it is absent)."""
    total, stack = 0, [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(Path(e.path))
                    else:
                        total += e.stat(follow_symlinks=False).st_size
        except OSError:
            continue
    return total


def _seal_owner(name: str) -> str:
    """The checkpoint id of a seal-dir file: <id>.json or <id>.<derived|used>.json (ids may hold dots)."""
    stem = name.removesuffix(".json")
    base, _, kind = stem.rpartition(".")
    return base if kind in DERIVED or kind == USED else stem


@dataclass(frozen=True)
class Eviction:
    evicted: list[str]   # "<scope>/<id>", least recently used first
    busy: list[str]      # over budget but in use (a restore or dump holds its lock): kept
    total_bytes: int     # what the store holds afterwards


def evict_to_budget(settings: Settings, budget_bytes: int) -> Eviction:
    """Remove the least recently used complete checkpoints, over all scopes, until the store holds at most
    budget_bytes; one in use is skipped, never waited for (the node agent runs this on a timer)."""
    entries = []
    for scope in Store.scopes(settings):
        s = Store(settings, scope)
        entries += [(s.last_used(cid), scope, cid, s.bytes_used(cid)) for cid in s.ids() if s.exists(cid)]
    total = sum(e[3] for e in entries)
    evicted, busy = [], []
    for _, scope, cid, size in sorted(entries):
        if total <= budget_bytes:
            break
        try:
            if Store(settings, scope).remove(cid):
                evicted.append(f"{scope}/{cid}")
                total -= size
        except CheckpointError:
            busy.append(f"{scope}/{cid}")
    return Eviction(evicted, busy, total)


def locate(settings: Settings, scope: str, cid: str) -> Store | None:
    """The store holding checkpoint `cid` for a container of `scope`: its own, else one the config shares."""
    own = Store(settings, scope)
    if own.exists(cid):
        return own
    for entry in settings.shared_checkpoints:
        owner, _, shared_id = entry.partition("/")
        if shared_id == cid and owner != scope:
            other = Store(settings, owner)
            if other.exists(cid):
                return other
    return None


def _marker(path: Path) -> dict[str, Any]:
    """checkpoint.done's JSON, trusted only when it says success: true (Dynamo's reader did not check)."""
    raw = _read_control(path / MARKER, 64 * 1024)
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError:
        raise CheckpointError(f"{MARKER}: not JSON") from None
    if not isinstance(body, dict) or body.get("success") is not True:
        raise CheckpointError(f"{MARKER}: marker does not say success: true ({str(body)[:120]})")
    return body


def verify_dir(path: Path, cid: str, policy: TrustPolicy, scope: str,
               known: dict[str, KnownDigest] | None = None) -> tuple[dict[str, Any], str]:
    """The full check of one checkpoint dir: ownership, marker, schema, signature, scope, every file's hash
    (a `known` digest stands for a file's re-read: fileutil.manifest_digest says when).

    Returns the metadata and who signed it.
    """
    _check_owned_dir(path, f"checkpoint {cid}")
    body = _marker(path)
    raw = _read_control(path / METADATA, MAX_METADATA)
    try:
        metadata = json.loads(raw)
    except ValueError:
        raise CheckpointError(f"{METADATA}: not JSON") from None
    from .metadata import validate  # noqa: PLC0415 - jsonschema is heavy; only on a full check
    try:
        validate(metadata)
    except ValueError as e:
        raise CheckpointError(f"{METADATA}: {e}") from None
    if hashlib.sha256(raw).hexdigest() != body.get("metadata_sha256"):
        raise CheckpointError(f"{METADATA}: SHA-256 differs from the one recorded in {MARKER} (tampered?)")
    try:
        signer = policy.verify(str(body["metadata_sha256"]), body.get("signature"))
    except SignatureError as e:
        raise CheckpointError(f"{MARKER}: {e}") from None
    if metadata["id"] != cid:
        raise CheckpointError(f"{METADATA}: id {metadata['id']!r} does not match directory {cid!r}")
    if metadata["compat"]["scope"] != scope:
        raise CheckpointError(f"{METADATA}: made in namespace {metadata['compat']['scope']!r}, "
                              f"found in the store of {scope!r}")
    _check_entries(path, metadata)
    for name, want in metadata["manifest"].items():
        got = manifest_digest(path / name, want, (known or {}).get(name))
        if got != want["sha256"]:
            raise CheckpointError(f"{name}: SHA-256 mismatch (manifest {want['sha256'][:12]}…, file {got[:12]}…)")
    return metadata, signer


def _check_entries(path: Path, metadata: dict[str, Any]) -> None:
    manifest = metadata["manifest"]
    present = {e.name for e in path.iterdir()}
    extra = present - set(manifest) - CONTROL_FILES
    if extra:
        raise CheckpointError(f"{sorted(extra)[0]}: file not in the manifest")
    for name, want in manifest.items():
        if "/" in name or name.startswith(".") or name in CONTROL_FILES:
            raise CheckpointError(f"{name}: manifest entry is not a plain file name")
        try:
            st = (path / name).lstat()
        except FileNotFoundError:
            raise CheckpointError(f"{name}: listed in the manifest but missing") from None
        _check_owned_file(path / name, st)
        if st.st_size != want["size"]:
            raise CheckpointError(f"{name}: size {st.st_size} differs from manifest {want['size']}")


def _check_owned_dir(path: Path, what: str) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise CheckpointError(f"{what}: {path} does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        raise CheckpointError(f"{what}: {path} is a symlink; refusing to follow it")
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{what}: {path} is not a directory")
    if st.st_uid != 0 and os.geteuid() == 0:
        raise CheckpointError(f"{what}: {path} is owned by uid {st.st_uid}, not root")
    if st.st_mode & 0o022:
        raise CheckpointError(f"{what}: {path} is writable by group/others (mode {oct(st.st_mode & 0o777)}); chmod 0700")


def _check_owned_file(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path.name}: not a regular file (symlink or special file)")
    if st.st_uid != 0 and os.geteuid() == 0:
        raise CheckpointError(f"{path.name}: owned by uid {st.st_uid}, not root")
    if st.st_mode & 0o022:
        raise CheckpointError(f"{path.name}: writable by group/others (mode {oct(st.st_mode & 0o777)})")


def _read_control(path: Path, limit: int) -> bytes:
    """Read a small control file without following a symlink or blocking on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CheckpointError(f"{path.name}: missing (checkpoint incomplete)") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"{path.name}: is a symlink; refusing it") from None
        raise CheckpointError(f"{path.name}: cannot open ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        _check_owned_file(path, st)
        if st.st_size > limit:
            raise CheckpointError(f"{path.name}: {st.st_size} bytes exceeds the {limit}-byte limit")
        return os.read(fd, limit + 1)
    finally:
        os.close(fd)
