"""Moving a checkpoint between the store and a registry: the steps of a push and of a pull (skopeo).

Shared by the CLI (`warmstart push` / `pull`) and the automatic paths (runtime/warmstart/fleet.py); the image
format and its checks are runtime/warmstart/oci.py's.  Work dirs live under `<store>/<scope>/.tmp/` (the same
filesystem as the store: adopting is a rename, and nothing lands in a tmpfs /tmp), each held by a
shared "push" or "pull" lock that keeps `warmstart gc` off it while it runs.
"""
from __future__ import annotations

import errno
import hashlib
import json
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import oci
from .config import RegistrySettings, Settings
from .fileutil import KnownDigest
from .phases import Phases
from .store import Store

SKOPEO = "skopeo"
# skopeo's lines for each layer blob, and (--debug) for one the destination already has
_BLOB = re.compile(r"^Copying blob sha256:[0-9a-f]{64}")
_SKIPPED = re.compile(r'level=debug msg="Skipping blob sha256:[0-9a-f]{64} \(already present\)')
_FATAL = re.compile(r'level=fatal msg="(.*)"\s*$', re.M)


@dataclass(frozen=True)
class Remote:
    """How to reach the registry: TLS verification and a credentials file."""

    tls_verify: bool = True
    auth_file: Path | None = None

    @classmethod
    def of(cls, reg: RegistrySettings) -> Remote:
        return cls(reg.tls_verify, reg.auth_file)

    def flags(self, side: str) -> list[str]:
        """skopeo flags; side "src"/"dest" for skopeo copy, "" for skopeo inspect."""
        prefix = f"--{side}-" if side else "--"
        flags = [f"{prefix}tls-verify={'true' if self.tls_verify else 'false'}"]
        if self.auth_file:
            flags.append(f"{prefix}authfile={self.auth_file}")
        return flags


@dataclass(frozen=True)
class Copied:
    """What one skopeo copy moved: blobs sent, blobs the destination already had, and how long it took."""

    sent: int
    skipped: int
    seconds: float


def check_ref(ref: str) -> str:
    if "://" in ref or ref.startswith("-") or any(c.isspace() for c in ref) or not ref:
        raise ValueError(f"image reference {ref[:200]!r}: give it as host[:port]/name:tag, without a transport")
    return ref


def skopeo_copy(src: str, dst: str, extra: list[str], max_file_bytes: int | None = None,
                echo: bool = False, timeout_s: float | None = None,
                on_start: Callable[[subprocess.Popen], None] | None = None) -> Copied:
    """skopeo copy, counting the blobs it sent and skipped (its per-blob lines, echoed to stderr with
    `echo`); with max_file_bytes no file it writes may grow past that (RLIMIT_FSIZE: a registry that sends
    more than its manifest said gets EFBIG, not our disk); killed after timeout_s.  `on_start` gets the
    process (a caller running this in a thread may kill it)."""
    cap = None if max_file_bytes is None else (
        lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes)))
    t0 = time.monotonic()
    p = subprocess.Popen([SKOPEO, "--debug", "copy", *extra, src, dst], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, text=True, preexec_fn=cap)
    if on_start:
        on_start(p)
    timer = threading.Timer(timeout_s, p.kill) if timeout_s else None
    if timer:
        timer.daemon = True
        timer.start()
    tail: list[str] = []
    blobs = skipped = 0
    try:
        for line in p.stdout:  # type: ignore[union-attr]
            if "level=debug" in line:  # --debug is there only to tell sent blobs from skipped ones
                skipped += bool(_SKIPPED.search(line))
                continue
            if echo:
                print(line.rstrip(), file=sys.stderr, flush=True)
            blobs += bool(_BLOB.match(line))
            fatal = _FATAL.search(line)
            tail = [fatal.group(1)] if fatal else (tail + [line.strip()])[-4:]
        rc = p.wait()
    finally:
        if timer:
            timer.cancel()
    if rc != 0:
        why = f"killed after {timeout_s:.0f}s" if timer and rc < 0 else " ".join(tail)[-500:]
        raise oci.OciError(f"skopeo copy {src} {dst} failed: {why}")
    return Copied(blobs - skipped, skipped, time.monotonic() - t0)


@dataclass(frozen=True)
class Checked:
    """A registry manifest that passed oci.check_manifest: `ref` pinned to its digest (the copy fetches what
    was checked), the most bytes one downloaded file may take (skopeo_copy's max_file_bytes), and what it
    promises."""

    ref: str
    max_file_bytes: int
    image: oci.Image


def check_remote(ref: str, remote: Remote, limit: int, expect_id: str | None,
                 expect_scope: str | None = None, timeout_s: float = 60) -> Checked:
    """oci.check_manifest on `ref`'s manifest in the registry, before anything is downloaded."""
    try:
        p = subprocess.run([SKOPEO, "inspect", "--raw", *remote.flags(""), f"docker://{ref}"],
                           capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise oci.OciError(f"skopeo inspect {ref}: no answer from the registry in {timeout_s:.0f}s") from None
    if p.returncode != 0:
        err = p.stderr.decode(errors="replace")
        fatal = _FATAL.search(err)
        raise oci.OciError(f"skopeo inspect {ref} failed: {fatal.group(1) if fatal else ' '.join(err.split())[-500:]}")
    if len(p.stdout) > oci.MAX_MANIFEST:
        raise oci.OciError(f"the manifest is {len(p.stdout)} bytes, over the {oci.MAX_MANIFEST}-byte limit")
    try:
        manifest = json.loads(p.stdout)
    except ValueError as e:
        raise oci.OciError(f"the manifest is not JSON: {e}") from None
    image = oci.check_manifest(manifest, limit, expect_id, expect_scope)
    head, slash, last = ref.split("@", 1)[0].rpartition("/")
    pinned = f"{head}{slash}{last.split(':', 1)[0]}@sha256:{hashlib.sha256(p.stdout).hexdigest()}"
    biggest = max([image.files_layer["size"], manifest["config"]["size"], *(c.blob_size for c in image.chunks)])
    return Checked(pinned, max(biggest, oci.MAX_MANIFEST), image)


def printer(verb: str) -> oci.Progress:
    """Progress on stderr, one line rewritten in place: `verb what: 123/456 MiB`."""
    def show(what: str, done: int, total: int) -> None:
        end = "\n" if done >= total else ""
        print(f"\r{verb} {what}: {done >> 20}/{total >> 20} MiB", end=end, file=sys.stderr, flush=True)
    return show


@dataclass(frozen=True)
class Pushed:
    ref: str
    copied: Copied
    seconds: float


def push(settings: Settings, scope: str, cid: str, ref: str, remote: Remote, progress: bool = False,
         timeout_s: float | None = None) -> Pushed:
    """Ship a fully verified checkpoint as a format-2 image; unchanged chunks are not sent again."""
    t0 = time.monotonic()
    check_ref(ref)
    store = Store(settings, scope)
    ckpt = store.open_verified(cid, full=True)  # never ship a damaged checkpoint
    reg = settings.registry
    packing = oci.Packing(reg.chunk_bytes, reg.compress, reg.compress_level)
    with store.lock("push", exclusive=False, blocking=True):
        work = store.new_tmp("push")
        try:
            with store.lock(cid, exclusive=False, blocking=True):
                oci.export_layout(ckpt.path, cid, work / "layout", "checkpoint", packing, scope,
                                  printer("push") if progress else None)
            copied = skopeo_copy(f"oci:{work / 'layout'}:checkpoint", f"docker://{ref}",
                                 ["--preserve-digests", *remote.flags("dest")], echo=progress, timeout_s=timeout_s)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return Pushed(ref, copied, time.monotonic() - t0)


def pull(settings: Settings, scope: str, ref: str, remote: Remote, expect_id: str | None = None,
         progress: bool = False, timeout_s: float | None = None, phases: Phases | None = None) -> str:
    """Fetch, check, unpack, verify and adopt the checkpoint of image `ref`; returns its id.

    The manifest is checked (size budget, id, namespace) before a byte is downloaded, and the copy is
    pinned to its digest; oci.unpack_image unpacks each blob as it arrives, checking its digest and
    bounding the unpacking; the store's full verification (signature included) runs before the rename
    into place.  On any error nothing is left in the store.  `phases` times the steps (check, then
    download and unpack side by side, verify, seal).
    """
    check_ref(ref)
    phase = phases or Phases()
    store = Store(settings, scope)
    with store.lock("pull", exclusive=False, blocking=True):
        work = store.new_tmp("pull")
        layout, unpacked = work / "layout", work / "checkpoint"
        unpacked.mkdir(mode=0o700)
        try:
            with phase("check"):
                checked = check_remote(ref, remote, oci.budget(work, settings.max_pull_bytes), expect_id, scope,
                                       timeout_s=min(timeout_s or 60, 60))
            known: dict[str, KnownDigest] = {}  # the files' digests, computed as they are unpacked
            with phase("download+unpack"):
                _fetch_and_unpack(checked, layout, unpacked, settings.max_pull_bytes, remote, progress, timeout_s,
                                  known, phase)
                shutil.rmtree(layout)  # what is left of the download: no need to hold the bytes twice
            store.adopt(checked.image.cid, unpacked, phase, known)
        except (OSError, oci.OciError) as e:
            shutil.rmtree(work, ignore_errors=True)  # first, so that the free space below is what is left
            free = shutil.disk_usage(store.root).free
            # ENOSPC, or the free space (not max_pull_bytes) was the limit a size check hit midway
            if not disk_full(e) and not (isinstance(e, oci.OverBudget) and free < settings.max_pull_bytes):
                raise
            raise oci.OciError(f"the store's disk is full: {store.root} has {free} bytes free without this pull "
                               f"({e}); free space there, or keep the store smaller ([registry] "
                               "cache_budget_bytes, `warmstart gc --budget`)") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return checked.image.cid


def _fetch_and_unpack(checked: Checked, layout: Path, dest: Path, max_bytes: int, remote: Remote, progress: bool,
                      timeout_s: float | None, known: dict[str, KnownDigest], phase: Phases) -> None:
    """skopeo downloads the checked image into `layout` while its blobs are unpacked into `dest` as each one
    arrives (oci.unpack_image with oci.arrivals): the node's CPU decompresses and hashes while skopeo waits on
    the network and on its fsyncs.  A failure on either side stops the other; skopeo's own error (a full
    disk, a registry that went away) is the one reported when the unpack failed only for want of its blobs."""
    procs: list[subprocess.Popen] = []
    outcome: list[BaseException | Copied] = []
    abandon = threading.Event()

    def started(p: subprocess.Popen) -> None:
        procs.append(p)
        if abandon.is_set():  # the unpack failed before skopeo started
            p.kill()

    def download() -> None:
        try:
            outcome.append(skopeo_copy(f"docker://{checked.ref}", f"oci:{layout}:checkpoint", remote.flags("src"),
                                       checked.max_file_bytes, echo=progress, timeout_s=timeout_s,
                                       on_start=started))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            outcome.append(e)
    copier = threading.Thread(target=download, name="skopeo", daemon=True)
    t0 = time.monotonic()
    copier.start()
    try:
        with phase("unpack"):
            oci.unpack_image(checked.image, layout, dest, max_bytes, printer("pull") if progress else None, known,
                             oci.arrivals(layout, lambda: not copier.is_alive()))
    except BaseException:
        skopeo_over = not copier.is_alive()
        abandon.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
        copier.join()
        if skopeo_over and isinstance(outcome[0], oci.OciError):
            raise outcome[0] from None  # skopeo failed first (its blobs never came): its message says why
        raise
    copier.join()
    phase.timings["download"] = round(time.monotonic() - t0, 6)
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    try:
        index = json.loads((layout / "index.json").read_text())
        pinned = index["manifests"][0]["digest"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise oci.OciError(f"the downloaded image has no readable index.json: {type(e).__name__}: {e}") from None
    if not checked.ref.endswith(f"@{pinned}"):
        raise oci.OciError(f"skopeo stored manifest {str(pinned)[:80]}, not the one checked ({checked.ref})")


def disk_full(e: BaseException) -> bool:
    """ENOSPC, raised here (OSError) or reported by skopeo or an unpack step (its text in an OciError)."""
    return (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) \
        or "no space left on device" in str(e).lower() or "disk quota exceeded" in str(e).lower()
