"""Checkpoints as OCI images, so any registry can carry them between nodes (skopeo moves them).

Format 2 (what push writes) is built for size: the first layer is a tar of the small files
(metadata.json and checkpoint.done first), and every file over SMALL_FILE (page images, above all)
travels as fixed-size chunks, one layer each, named by their content: a chunk that did not change
since the last push has the same digest, so the registry already has it and skopeo never sends it
again.  Layers are zstd-compressed (or not) by us, under warmstart's own media types, so skopeo
copies them byte for byte (--preserve-digests) and the digests a push computes are the registry's.
A chunk layer's annotations say which file it belongs to, at which offset, and how many bytes it
holds once decompressed; the checkpoint id and namespace are manifest annotations.
Format 1 (one tar or tar+gzip layer, what earlier versions pushed) is still pulled.

A pulled image is untrusted: its manifest's blob and chunk sizes are held to a byte budget and its
chunk table must tile each file exactly before anything is downloaded; the files layer is read
through one bounded stream (_unpack): the checkpoint's own manifest comes first and every later
entry must be a plain, non-sparse file it names, of exactly its size; each chunk is decompressed to
exactly its size while its digest is computed on the same pass, several chunks at a time (_assemble),
and the same pass computes the file's manifest digest from the bytes it writes (KnownDigest); then the
store runs its full verification (signature included; a known digest stands for re-reading a file only
while the file is untouched since it was written) before the checkpoint is adopted.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tarfile
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from . import fileutil
from .fileutil import KnownDigest, stat_identity
from .ids import validate_id
from .store import CONTROL_FILES, MARKER, MAX_METADATA, METADATA

ANNOTATION = "warmstart.dev/checkpoint-id"
NAMESPACE = "warmstart.dev/namespace"  # the scope the checkpoint was made in (its signed metadata decides)
FORMAT = "warmstart.dev/format"
CHUNK_FILE, CHUNK_OFFSET, CHUNK_SIZE = "warmstart.dev/file", "warmstart.dev/offset", "warmstart.dev/size"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
FILES_TYPE = "application/vnd.warmstart.checkpoint.files.v2.tar"
CHUNK_TYPE = "application/vnd.warmstart.checkpoint.chunk.v2"
# The first layer's media types -> how it is compressed (format 1's tar and gzip layers still pull).
LAYER_TYPES: dict[str, str | None] = {
    FILES_TYPE: None, FILES_TYPE + "+zstd": "zstd", LAYER_TYPE: None, LAYER_TYPE + "+gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip"}
CHUNK_TYPES: dict[str, str | None] = {CHUNK_TYPE: None, CHUNK_TYPE + "+zstd": "zstd"}
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
MAX_MANIFEST = 1 << 20
SMALL_FILE = 1 << 20  # files up to this size go into the files layer; larger ones are chunked
MAX_CHUNK = 1 << 30  # the most bytes one chunk may decompress to (config chunk_bytes is at most this)
# The layer's first two entries, read into memory (at most these sizes) before anything is written.
CONTROL_LIMITS = {METADATA: MAX_METADATA, MARKER: 64 << 10}
HEADER_ROOM = 64 << 10  # tar bytes allowed between two entries' data: padding, header, pax/long-name records
READ_BUF = 1 << 20
# Chunks unpacked side by side (zstd, hashlib and pwrite release the GIL); each streams READ_BUF at a time,
# so memory stays a few MiB per worker whatever the chunk size.
UNPACK_WORKERS = min(4, os.cpu_count() or 1)
MAX_MTIME = 1 << 34  # year 2514; past it (or NaN, inf, 1e300) os.utime fails
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}")
Progress = Callable[[str, int, int], None]  # (what, bytes done, bytes in all)
BlobWait = Callable[[str, threading.Event], None]  # (digest, stop): returns once the blob is in the layout


class OciError(Exception):
    """A checkpoint image that cannot be pushed or adopted; the message says why."""


class OverBudget(OciError):
    """The image needs more bytes than a pull may write (max_pull_bytes, or the store's free space)."""


@dataclass(frozen=True)
class Packing:
    """How push packs a checkpoint: chunk size and compression ([registry] chunk_bytes, compress)."""

    chunk_bytes: int = 128 << 20
    compress: str = "zstd"  # or "none"
    level: int = 1

    @property
    def suffix(self) -> str:
        return "+zstd" if self.compress == "zstd" else ""


@dataclass(frozen=True)
class Chunk:
    """One chunk layer: bytes [offset, offset+size) of `file`, in blob `digest` (compressed or not)."""

    file: str
    offset: int
    size: int
    digest: str
    blob_size: int
    compression: str | None


@dataclass(frozen=True)
class Image:
    """What a checked manifest promises, before a byte of it is downloaded."""

    cid: str
    files_layer: dict[str, Any]
    chunks: tuple[Chunk, ...]
    blob_bytes: int  # config, files layer and each distinct chunk blob: what the download writes

    @property
    def chunked(self) -> dict[str, int]:
        """File name -> size, for the files that come in chunks."""
        sizes: Counter[str] = Counter()
        for c in self.chunks:
            sizes[c.file] += c.size
        return dict(sizes)


def _zstd() -> Any:
    import zstandard  # noqa: PLC0415 - only a push or pull needs it

    return zstandard


class _HashingWriter:
    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.h, self.size = raw, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.h.update(b)
        self.size += len(b)
        return self.raw.write(b)


def _put(layout: Path, data: bytes) -> tuple[str, int]:
    """Store a blob under its digest (once: a chunk seen twice in one image is one blob)."""
    digest = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest
    if not path.exists():
        tmp = path.with_name(digest + ".tmp")
        tmp.write_bytes(data)
        os.rename(tmp, path)
    return f"sha256:{digest}", len(data)


def _files_layer(layout: Path, files: list[Path], packing: Packing) -> dict[str, Any]:
    """The small files as one tar (metadata.json and the marker first: pull reads the manifest before it
    writes anything), compressed as packed."""
    tmp = layout / "files.tmp"
    with open(tmp, "wb") as raw:
        out = _HashingWriter(raw)
        comp = _zstd().ZstdCompressor(level=packing.level, threads=-1).stream_writer(out, closefd=False) \
            if packing.compress == "zstd" else nullcontext(out)
        with comp as sink, tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for f in files:
                info = tarfile.TarInfo(f.name)
                st = f.stat()
                info.size, info.mode, info.mtime = st.st_size, 0o600, int(st.st_mtime)
                with open(f, "rb") as src:
                    tar.addfile(info, src)
    digest = out.h.hexdigest()
    os.rename(tmp, layout / "blobs" / "sha256" / digest)
    return {"mediaType": FILES_TYPE + packing.suffix, "digest": f"sha256:{digest}", "size": out.size}


def _chunk_layers(layout: Path, f: Path, packing: Packing) -> Iterator[dict[str, Any]]:
    """One layer per chunk_bytes of `f`, each named by its (compressed) content."""
    comp = _zstd().ZstdCompressor(level=packing.level, threads=-1) if packing.compress == "zstd" else None
    with open(f, "rb") as src:
        offset = 0
        while data := src.read(packing.chunk_bytes):
            digest, size = _put(layout, comp.compress(data) if comp else data)
            yield {"mediaType": CHUNK_TYPE + packing.suffix, "digest": digest, "size": size,
                   "annotations": {CHUNK_FILE: f.name, CHUNK_OFFSET: str(offset), CHUNK_SIZE: str(len(data))}}
            offset += len(data)


def export_layout(ckpt: Path, cid: str, layout: Path, tag: str, packing: Packing = Packing(),
                  scope: str | None = None, progress: Progress | None = None) -> None:
    """Write an OCI image layout at `layout` whose image `tag` holds checkpoint `ckpt` (format 2)."""
    (layout / "blobs" / "sha256").mkdir(parents=True)
    files = sorted(ckpt.iterdir(), key=lambda f: (f.name != METADATA, f.name != MARKER, f.name))
    big = [f for f in files if f.name not in CONTROL_FILES and f.stat().st_size > SMALL_FILE]
    small = [f for f in files if f not in big]
    total, done = sum(f.stat().st_size for f in files), 0
    layers = [_files_layer(layout, small, packing)]
    done += sum(f.stat().st_size for f in small)
    for f in big:
        for layer in _chunk_layers(layout, f, packing):
            layers.append(layer)
            done += int(layer["annotations"][CHUNK_SIZE])
            if progress:
                progress("packed", done, total)
    config = {"architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine),
              "os": "linux", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "config": {"Labels": {ANNOTATION: cid}},
              "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in layers]}}
    digest, size = _put(layout, json.dumps(config).encode())
    annotations = {ANNOTATION: cid, FORMAT: "2", **({NAMESPACE: scope} if scope else {})}
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                "config": {"mediaType": CONFIG_TYPE, "digest": digest, "size": size},
                "layers": layers, "annotations": annotations}
    digest, size = _put(layout, json.dumps(manifest).encode())
    man = {"mediaType": MANIFEST_TYPE, "digest": digest, "size": size,
           "annotations": {"org.opencontainers.image.ref.name": tag}}
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [man]}))


def _hex(digest: object) -> str:
    algo, _, hexd = str(digest).partition(":")
    if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
        raise OciError(f"blob digest {str(digest)[:80]!r} is not a sha256 digest")
    return hexd


def _blob_path(layout: Path, digest: str, size: int) -> Path:
    """A downloaded blob: a plain file of exactly the size its descriptor says."""
    p = layout / "blobs" / "sha256" / _hex(digest)
    if not p.is_file() or p.is_symlink():
        raise OciError(f"blob {digest} missing from the pulled image")
    if p.stat().st_size != size:
        raise OciError(f"blob {digest} is {p.stat().st_size} bytes, not the {size} its manifest says")
    return p


def _read_blob(layout: Path, desc: dict[str, Any], limit: int) -> Path:
    digest = str(desc.get("digest", ""))
    p = layout / "blobs" / "sha256" / _hex(digest)
    if not p.is_file() or p.is_symlink():
        raise OciError(f"blob {digest} missing from the pulled image")
    if p.stat().st_size > limit:
        raise OciError(f"blob {digest} is {p.stat().st_size} bytes, over the {limit}-byte limit")
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    if h.hexdigest() != _hex(digest):
        raise OciError(f"blob {digest} does not match its digest")
    return p


def budget(directory: Path, max_bytes: int) -> int:
    """Bytes a pull may still write under `directory`: `max_bytes`, or the filesystem's free space if less."""
    st = os.statvfs(directory)
    return min(max_bytes, st.f_bavail * st.f_frsize)


def _chunk(desc: Any) -> Chunk:
    """A chunk layer's descriptor, every field checked (a plain file name, decimal offset and size)."""
    what = f"chunk layer {str(desc.get('digest'))[:80]!r}"
    notes = desc.get("annotations") or {}
    name, offset, size = notes.get(CHUNK_FILE), str(notes.get(CHUNK_OFFSET)), str(notes.get(CHUNK_SIZE))
    if not isinstance(name, str) or not 0 < len(name) <= 255 or "/" in name or "\0" in name \
            or name.startswith(".") or name in CONTROL_FILES:
        raise OciError(f"{what}: {CHUNK_FILE} {str(name)[:80]!r} is not a checkpoint file name")
    if not _DECIMAL.fullmatch(offset) or not _DECIMAL.fullmatch(size) or not 0 < int(size) <= MAX_CHUNK:
        raise OciError(f"{what}: offset {offset[:24]!r} and size {size[:24]!r} must be byte counts "
                       f"(a size from 1 to {MAX_CHUNK})")
    _hex(desc["digest"])
    return Chunk(name, int(offset), int(size), desc["digest"], desc["size"], CHUNK_TYPES[desc["mediaType"]])


def _check_tiling(chunks: list[Chunk]) -> None:
    """Each chunked file's chunks, in order, cover it from byte 0 with no gap and no overlap."""
    ends: dict[str, int] = {}
    for c in sorted(chunks, key=lambda c: (c.file, c.offset)):
        if c.offset != ends.get(c.file, 0):
            raise OciError(f"chunk layers of {c.file[:80]!r}: one starts at byte {c.offset}, "
                           f"expected {ends.get(c.file, 0)} (a gap or an overlap)")
        ends[c.file] = c.offset + c.size


def check_manifest(manifest: Any, limit: int, expect_id: str | None, expect_scope: str | None = None) -> Image:
    """What an image manifest promises, refused before any blob is fetched or unpacked when the blobs and
    chunks would take more than `limit` bytes, the chunk table is not a tiling of files, or the id (or the
    namespace, when the image names one) is not the one asked for."""
    try:
        notes = manifest.get("annotations") or {}
        cid = validate_id(str(notes.get(ANNOTATION, "")), f"manifest {ANNOTATION}")
        scope = notes.get(NAMESPACE)
        layers = list(manifest["layers"])
        sizes = [d["size"] for d in [manifest["config"], *layers]]
        if not layers or layers[0].get("mediaType") not in LAYER_TYPES or \
                any(d.get("mediaType") not in CHUNK_TYPES for d in layers[1:]):
            raise OciError(f"expected a files layer, then chunk layers; got {[x.get('mediaType') for x in layers][:4]}")
        if not all(type(n) is int and n >= 0 for n in sizes):
            raise OciError(f"blob sizes {str(sizes)[:80]} are not byte counts")
        chunks = [_chunk(d) for d in layers[1:]]
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise OciError(f"not a warmstart checkpoint image: {type(e).__name__}: {e}") from None
    if expect_id is not None and cid != expect_id:
        raise OciError(f"the image holds checkpoint {cid!r}, not {expect_id!r} (--id)")
    if expect_scope is not None and scope is not None and scope != expect_scope:
        raise OciError(f"the image holds a checkpoint of namespace {str(scope)[:80]!r}, not {expect_scope!r}")
    _check_tiling(chunks)
    distinct = {c.digest: c.blob_size for c in chunks}
    blobs = sizes[0] + sizes[1] + sum(distinct.values())
    if blobs > limit:
        raise OverBudget(f"the image's blobs take {blobs} bytes, over the {limit}-byte limit "
                       "(max_pull_bytes, or the store's free space)")
    if blobs + sum(c.size for c in chunks) > limit:
        raise OverBudget(f"the image's blobs and chunked files take {blobs + sum(c.size for c in chunks)} bytes, "
                       f"over the {limit}-byte limit (max_pull_bytes, or the store's free space)")
    return Image(cid, layers[0], tuple(chunks), blobs)


def import_layout(layout: Path, dest: Path, max_bytes: int, expect_id: str | None = None,
                  expect_scope: str | None = None, progress: Progress | None = None,
                  known: dict[str, KnownDigest] | None = None) -> str:
    """Unpack the checkpoint image in `layout` into the empty dir `dest`; returns the checkpoint id.

    The blobs already in `layout` and the files written to `dest` together stay within `max_bytes`
    and the free space of dest's filesystem; `expect_id` (pull --id) must be the image's annotated id.
    `known` as for unpack_image.
    """
    try:
        index = json.loads((layout / "index.json").read_text())
        manifest = json.loads(_read_blob(layout, index["manifests"][0], MAX_MANIFEST).read_text())
    except (AttributeError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise OciError(f"not a warmstart checkpoint image: {type(e).__name__}: {e}") from None
    image = check_manifest(manifest, max_bytes, expect_id, expect_scope)
    unpack_image(image, layout, dest, max_bytes, progress, known)
    return image.cid


def unpack_image(image: Image, layout: Path, dest: Path, max_bytes: int, progress: Progress | None = None,
                 known: dict[str, KnownDigest] | None = None, arrival: BlobWait | None = None) -> None:
    """Unpack checked `image`, whose blobs are (or, with `arrival`, are being downloaded) in `layout`, into
    the empty dir `dest`.

    Each chunk blob is deleted once its last use is written, so the pull holds little more than the
    download at any time.  `known` receives the chunked files' digests, computed as they were written,
    for the store's verification (Store.adopt).  With `arrival` (a download still running) each blob is
    waited for before it is read, and the free space is counted as if the whole download were still to
    come.
    """
    layer = image.files_layer
    if arrival is not None:
        arrival(layer["digest"], threading.Event())
    blob = _read_blob(layout, layer, max_bytes)
    limit = budget(dest, max_bytes - image.blob_bytes) if arrival is None \
        else budget(dest, max_bytes) - image.blob_bytes
    try:
        entries = _unpack(blob, LAYER_TYPES[layer["mediaType"]], dest, limit, image.chunked)
        digests = _assemble(layout, dest, image.chunks, entries, progress, arrival)
    except (tarfile.TarError, EOFError, zlib.error, OSError, ValueError, OverflowError) as e:
        raise OciError(f"cannot unpack the layer: {type(e).__name__}: {e}") from None
    except _zstd().ZstdError as e:
        raise OciError(f"cannot decompress the layer: {e}") from None
    if known is not None:
        known.update(digests)


def arrivals(layout: Path, over: Callable[[], bool], poll_s: float = 0.02) -> BlobWait:
    """A BlobWait for a download into `layout` that is still running: a blob is there once its file is (the
    downloader renames each finished blob into place; its size and digest are checked as it is read);
    once `over()` says the download ended, a missing blob is the reader's error, not a wait."""
    def wait(digest: str, stop: threading.Event) -> None:
        path = layout / "blobs" / "sha256" / _hex(digest)
        while not path.exists() and not over():
            if stop.wait(poll_s):
                raise _Stopped
    return wait


class _HashingReader:
    """A blob read once: its digest is computed as its bytes go by."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.h = raw, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.h.update(data)
        return data


class _Stopped(OciError):
    """Another chunk failed: this one stops where it is."""


def _pieces(entry: dict[str, Any], size: int, c: Chunk) -> dict[int, Any]:
    """The pieces of the file's manifest digest that lie wholly inside chunk `c`, each with a fresh hasher:
    TREE_SCHEME's 64 MiB pieces, or the whole file for a plain SHA-256 (no hasher when neither fits)."""
    scheme = entry.get("hash", fileutil.PLAIN_SCHEME)
    if scheme not in (fileutil.PLAIN_SCHEME, fileutil.TREE_SCHEME) or entry.get("size") != size:
        return {}
    piece = fileutil.TREE_PIECE if scheme == fileutil.TREE_SCHEME else size
    end, out = c.offset + c.size, {}
    k = -(-c.offset // piece)
    while k * piece < size and min((k + 1) * piece, size) <= end:
        out[k] = hashlib.sha256()
        k += 1
    return out


def _unpack_chunk(layout: Path, fd: int, c: Chunk, piece: int, pieces: dict[int, Any],
                  stop: threading.Event, arrival: BlobWait | None = None) -> None:
    """Decompress chunk `c` to exactly its size into `fd` at its offset, checking its blob's digest on the same
    pass and feeding the bytes to the file-digest `pieces` (of `piece` bytes each) that it holds whole."""
    if arrival is not None:
        arrival(c.digest, stop)
    blob = _blob_path(layout, c.digest, c.blob_size)
    with open(blob, "rb") as raw:
        hashing = _HashingReader(raw)
        src = _zstd().ZstdDecompressor().stream_reader(hashing, read_size=READ_BUF) \
            if c.compression == "zstd" else hashing
        pos, end = c.offset, c.offset + c.size
        while pos < end:
            if stop.is_set():
                raise _Stopped
            data = memoryview(src.read(min(end - pos, READ_BUF)))
            if not data:
                raise OciError(f"chunk {c.digest} of {c.file!r}: the data ends {end - pos} bytes short")
            k, at = pos // piece, 0
            while at < len(data):
                cut = min(len(data), (k + 1) * piece - pos)
                if k in pieces:
                    pieces[k].update(data[at:cut])
                at, k = cut, k + 1
            at = 0
            while at < len(data):
                at += os.pwrite(fd, data[at:], pos + at)
            pos += len(data)
        if src.read(1):
            raise OciError(f"chunk {c.digest} of {c.file!r}: more than the {c.size} bytes it declares")
        while hashing.read(READ_BUF):
            pass
    if hashing.h.hexdigest() != _hex(c.digest):
        raise OciError(f"chunk {c.digest} of {c.file!r} does not match its digest (tampered?)")


def _one_chunk(layout: Path, fd: int, c: Chunk, piece: int, pieces: dict[int, Any], stop: threading.Event,
               arrival: BlobWait | None) -> None:
    """One worker's job: nothing once another chunk failed, and a failure here stops the others at once
    (before this worker takes the next queued chunk)."""
    if stop.is_set():
        raise _Stopped
    try:
        _unpack_chunk(layout, fd, c, piece, pieces, stop, arrival)
    except BaseException:
        stop.set()
        raise


def _assemble(layout: Path, dest: Path, chunks: tuple[Chunk, ...], entries: dict[str, dict[str, Any]],
              progress: Progress | None, arrival: BlobWait | None = None) -> dict[str, KnownDigest]:
    """Write each chunked file from its chunks, UNPACK_WORKERS chunks at a time: every chunk decompressed to
    exactly its size and its blob's digest checked on the same pass; a blob is removed once its last chunk
    is written.  Returns the files' manifest digests computed from the bytes written (where a file's
    digest pieces each lie within one chunk).  On any failure the other chunks stop and every file this
    wrote is removed."""
    uses = Counter(c.digest for c in chunks)
    sizes = {name: sum(c.size for c in chunks if c.file == name) for name in sorted({c.file for c in chunks})}
    total, done = sum(sizes.values()), 0
    fds: dict[str, int] = {}
    stop = threading.Event()
    pieces: dict[str, dict[int, Any]] = {name: {} for name in sizes}
    try:
        for name in sizes:
            fds[name] = os.open(dest / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                0o600)
            os.fchmod(fds[name], 0o600)  # whatever the umask
        with ThreadPoolExecutor(max_workers=UNPACK_WORKERS, thread_name_prefix="unpack") as pool:
            jobs = {}
            for c in sorted(chunks, key=lambda c: (c.file, c.offset)):
                entry = entries.get(c.file, {})
                mine = _pieces(entry, sizes[c.file], c)
                pieces[c.file].update(mine)
                piece = fileutil.TREE_PIECE if entry.get("hash") == fileutil.TREE_SCHEME else sizes[c.file]
                jobs[pool.submit(_one_chunk, layout, fds[c.file], c, piece, mine, stop, arrival)] = c
            try:
                for job in as_completed(jobs):  # the first failure as soon as it happens
                    job.result()
                    c = jobs[job]
                    uses[c.digest] -= 1
                    if not uses[c.digest]:
                        _blob_path(layout, c.digest, c.blob_size).unlink()
                    done += c.size
                    if progress:
                        progress("unpacked", done, total)
            except BaseException as e:
                stop.set()  # the running chunks stop at their next read; the queued ones never start
                for job in jobs:
                    job.cancel()
                wait(jobs)
                failed = [j.exception() for j in jobs if not j.cancelled() and j.exception() is not None]
                raise next((f for f in failed if not isinstance(f, _Stopped)), e) from None  # the cause
        known = {}
        for name, size in sizes.items():
            got, scheme = pieces[name], entries.get(name, {}).get("hash", fileutil.PLAIN_SCHEME)
            tree = scheme == fileutil.TREE_SCHEME
            if len(got) == (-(-size // fileutil.TREE_PIECE) if tree else 1):  # each piece whole in one chunk
                sha = hashlib.sha256(b"".join(got[k].digest() for k in range(len(got)))).hexdigest() if tree \
                    else got[0].hexdigest()
                known[name] = KnownDigest(scheme, sha, stat_identity(os.fstat(fds[name])))
        return known
    except BaseException:
        for name in fds:  # the pool has stopped: nothing writes to these any more
            (dest / name).unlink(missing_ok=True)
        raise
    finally:
        for fd in fds.values():
            os.close(fd)


class _Capped:
    """The layer's tar stream (gunzipped), refused past byte `limit`.

    tarfile reads headers, pax records and file data through this; _unpack moves `limit` on only by what
    the manifest accounts for, so neither a gzip bomb nor a huge header record is read or held in memory.
    """

    def __init__(self, raw: BinaryIO, limit: int) -> None:
        self.raw, self.limit, self.pos = raw, limit, 0

    def read(self, n: int) -> bytes:
        if self.pos >= self.limit:
            if n and self.raw.read(1):
                raise OciError(f"the layer holds more tar data than its manifest accounts for "
                               f"(past byte {self.limit})")
            return b""
        data = self.raw.read(min(n, self.limit - self.pos))
        self.pos += len(data)
        return data


def _check_member(m: tarfile.TarInfo, least: int, most: int) -> None:
    """One layer entry: a plain file, not sparse, of least..most bytes, with an mtime os.utime takes."""
    what = f"layer entry {m.name[:80]!r}"
    if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or m.issparse() or \
            any(k.startswith("GNU.sparse.") for k in m.pax_headers):
        raise OciError(f"{what}: only plain, non-sparse files are allowed")
    if not least <= m.size <= most:
        allowed = most if least == most else f"at most {most}"
        raise OciError(f"{what}: {m.size} bytes in the tar header, {allowed} allowed")
    if not 0 <= m.mtime < MAX_MTIME:
        raise OciError(f"{what}: mtime {m.mtime!r} out of range")


def _manifest_entries(raw: bytes) -> dict[str, dict[str, Any]]:
    """File name -> manifest entry (size, digest, scheme) from a pulled metadata.json (schema-checked, so names
    are plain file names; its signature is the store's to check)."""
    from .metadata import validate  # noqa: PLC0415 - jsonschema is heavy; only a pull needs it here
    try:
        metadata = json.loads(raw)
        validate(metadata)
    except ValueError as e:
        raise OciError(f"{METADATA}: {e}") from None
    manifest = metadata["manifest"]
    if set(manifest) & CONTROL_FILES:
        raise OciError(f"{METADATA}: the manifest lists {sorted(set(manifest) & CONTROL_FILES)}")
    return dict(manifest)


def _write(path: Path, src: BinaryIO, m: tarfile.TarInfo) -> None:
    """Copy m.size bytes (already held to the manifest) from src into a new file, counted: never more."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(fd, 0o600)  # whatever the umask
        left = m.size
        while left:
            chunk = src.read(min(left, READ_BUF))[:left]
            if not chunk:
                raise OciError(f"layer entry {path.name!r}: the data ends {left} bytes short")
            out.write(chunk)
            left -= len(chunk)
        out.flush()
        os.utime(fd, (m.mtime, m.mtime))


def _unpack(blob: Path, compression: str | None, dest: Path, limit: int,
            chunked: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Unpack the files layer: metadata.json and checkpoint.done first, then only the files their manifest
    names (but not those that come in chunks), each of exactly its manifest size; all the checkpoint's
    files, chunked ones included, together at most `limit` bytes.  Returns the (pulled) manifest's entries."""
    with open(blob, "rb") as raw, _decompressed(raw, compression) as plain:
        stream = _Capped(plain, HEADER_ROOM)  # type: ignore[arg-type]
        with tarfile.open(fileobj=stream, mode="r|", bufsize=READ_BUF) as tar:  # type: ignore[call-overload]
            members = iter(tar)
            control: dict[str, tuple[tarfile.TarInfo, bytes]] = {}
            while len(control) < len(CONTROL_LIMITS):  # held in memory until the manifest is known to fit
                m = next(members, None)
                if m is None or m.name not in CONTROL_LIMITS or m.name in control:
                    what = "the layer ends" if m is None else f"layer entry {m.name[:80]!r}"
                    raise OciError(f"{what}: a checkpoint layer starts with {METADATA} and {MARKER} "
                                   "(push it again with this version)")
                _check_member(m, 0, CONTROL_LIMITS[m.name])
                stream.limit = m.offset_data + m.size + HEADER_ROOM
                control[m.name] = m, tar.extractfile(m).read(m.size)  # type: ignore[union-attr]
            entries = _manifest_entries(control[METADATA][1])
            sizes = {name: entry["size"] for name, entry in entries.items()}
            for name, size in chunked.items():
                if sizes.get(name) != size:
                    raise OciError(f"chunk layers of {name[:80]!r}: {size} bytes in all, "
                                   f"its manifest entry says {sizes.get(name, 'nothing')}")
            total = sum(sizes.values()) + sum(len(data) for _, data in control.values())
            if total > limit:
                raise OverBudget(f"the checkpoint's files take {total} bytes, over the {limit}-byte limit "
                               "(max_pull_bytes less the download, or the store's free space)")
            for name in chunked:
                del sizes[name]  # not in this layer: _assemble writes them
            for name, (info, data) in control.items():
                _write(dest / name, io.BytesIO(data), info)
            for m in members:
                if m.name not in sizes:
                    raise OciError(f"layer entry {m.name[:80]!r}: not in the manifest, or there twice")
                size = sizes.pop(m.name)
                _check_member(m, size, size)
                stream.limit = m.offset_data + size + HEADER_ROOM
                _write(dest / m.name, tar.extractfile(m), m)  # type: ignore[arg-type]
    return entries


def _decompressed(raw: BinaryIO, compression: str | None) -> Any:
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw)
    if compression == "zstd":
        return _zstd().ZstdDecompressor().stream_reader(raw, read_size=READ_BUF)
    return nullcontext(raw)
