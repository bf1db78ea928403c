"""Checkpoints as OCI images, so any registry can carry them between nodes (skopeo moves them).

An image is one tar layer holding the checkpoint's flat file list (metadata.json and
checkpoint.done first), a config naming the checkpoint id, and the manifest annotation
`warmstart.dev/checkpoint-id`. skopeo always compresses layers it uploads to a registry;
we ask for gzip at level 1 (CRIU pages compress poorly, so speed matters more than ratio),
and pull accepts plain or gzip tar layers.
A pulled image is untrusted: its manifest's blob sizes are held to a byte budget before
anything is downloaded, digests are checked, and the layer is read through one bounded
stream (_unpack): the checkpoint's own manifest comes first and every later entry must be a
plain, non-sparse file it names, of exactly its size; then the store runs its full
verification before the checkpoint is adopted.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import resource
import subprocess
import tarfile
import time
import zlib
from contextlib import nullcontext
from pathlib import Path
from typing import Any, BinaryIO

from .ids import validate_id
from .store import CONTROL_FILES, MARKER, MAX_METADATA, METADATA

ANNOTATION = "warmstart.dev/checkpoint-id"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
LAYER_TYPES = {LAYER_TYPE: False, LAYER_TYPE + "+gzip": True,  # media type -> gzip-compressed
               "application/vnd.docker.image.rootfs.diff.tar.gzip": True}
PUSH_FLAGS = ["--dest-compress-format", "gzip", "--dest-compress-level", "1"]
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
MAX_MANIFEST = 1 << 20
# The layer's first two entries, read into memory (at most these sizes) before anything is written.
CONTROL_LIMITS = {METADATA: MAX_METADATA, MARKER: 64 << 10}
HEADER_ROOM = 64 << 10  # tar bytes allowed between two entries' data: padding, header, pax/long-name records
READ_BUF = 1 << 20
MAX_MTIME = 1 << 34  # year 2514; past it (or NaN, inf, 1e300) os.utime fails
SKOPEO = "skopeo"


class OciError(Exception):
    """A checkpoint image that cannot be pushed or adopted; the message says why."""


def _blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def export_layout(ckpt: Path, cid: str, layout: Path, tag: str) -> None:
    """Write an OCI image layout at `layout` whose image `tag` holds checkpoint `ckpt`."""
    (layout / "blobs" / "sha256").mkdir(parents=True)
    layer_tmp = layout / "layer.tar"
    h = hashlib.sha256()
    with open(layer_tmp, "wb") as raw:
        class _Hashing:
            def write(self, b: bytes) -> int:
                h.update(b)
                return raw.write(b)
        with tarfile.open(fileobj=_Hashing(), mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[arg-type]
            # metadata.json and the marker first: pull reads the manifest before it writes anything
            for f in sorted(ckpt.iterdir(), key=lambda f: (f.name != METADATA, f.name != MARKER, f.name)):
                info = tarfile.TarInfo(f.name)
                st = f.stat()
                info.size, info.mode, info.mtime = st.st_size, 0o600, int(st.st_mtime)
                with open(f, "rb") as src:
                    tar.addfile(info, src)
    digest = h.hexdigest()
    size = layer_tmp.stat().st_size
    os.rename(layer_tmp, layout / "blobs" / "sha256" / digest)
    layer = {"mediaType": LAYER_TYPE, "digest": f"sha256:{digest}", "size": size}
    config = {"architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine),
              "os": "linux", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "config": {"Labels": {ANNOTATION: cid}},
              "rootfs": {"type": "layers", "diff_ids": [f"sha256:{digest}"]}}
    cfg = {"mediaType": CONFIG_TYPE, **_blob(layout, json.dumps(config).encode())}
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "config": cfg, "layers": [layer],
                "annotations": {ANNOTATION: cid}}
    man = {"mediaType": MANIFEST_TYPE, **_blob(layout, json.dumps(manifest).encode()),
           "annotations": {"org.opencontainers.image.ref.name": tag}}
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [man]}))


def _read_blob(layout: Path, desc: dict[str, Any], limit: int) -> Path:
    digest = str(desc.get("digest", ""))
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
        raise OciError(f"blob digest {digest[:80]!r} is not a sha256 digest")
    p = layout / "blobs" / "sha256" / hexd
    if not p.is_file() or p.is_symlink():
        raise OciError(f"blob {digest} missing from the pulled image")
    if p.stat().st_size > limit:
        raise OciError(f"blob {digest} is {p.stat().st_size} bytes, over the {limit}-byte limit")
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    if h.hexdigest() != hexd:
        raise OciError(f"blob {digest} does not match its digest")
    return p


def budget(directory: Path, max_bytes: int) -> int:
    """Bytes a pull may still write under `directory`: `max_bytes`, or the filesystem's free space if less."""
    st = os.statvfs(directory)
    return min(max_bytes, st.f_bavail * st.f_frsize)


def check_manifest(manifest: Any, limit: int, expect_id: str | None) -> tuple[str, dict[str, Any]]:
    """The checkpoint id and layer descriptor of an image manifest; refused before any blob is fetched or
    unpacked when the blobs would take more than `limit` bytes or the id is not the one asked for."""
    try:
        cid = validate_id(str((manifest.get("annotations") or {}).get(ANNOTATION, "")), f"manifest {ANNOTATION}")
        layers = list(manifest["layers"])
        sizes = [d["size"] for d in [manifest["config"], *layers]]
        if len(layers) != 1 or layers[0].get("mediaType") not in LAYER_TYPES:
            raise OciError(f"expected one tar or tar+gzip layer, got {[x.get('mediaType') for x in layers]}")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise OciError(f"not a warmstart checkpoint image: {type(e).__name__}: {e}") from None
    if expect_id is not None and cid != expect_id:
        raise OciError(f"the image holds checkpoint {cid!r}, not {expect_id!r} (--id)")
    if not all(type(n) is int and n >= 0 for n in sizes):
        raise OciError(f"blob sizes {str(sizes)[:80]} are not byte counts")
    if sum(sizes) > limit:
        raise OciError(f"the image's blobs take {sum(sizes)} bytes, over the {limit}-byte limit "
                       "(max_pull_bytes, or the store's free space)")
    return cid, layers[0]


def check_remote(ref: str, flags: list[str], limit: int, expect_id: str | None) -> tuple[str, int]:
    """check_manifest on `ref`'s manifest in the registry, before anything is downloaded.

    Returns `ref` pinned to that manifest's digest, so that the copy fetches what was checked, and the
    most bytes one downloaded file may take (skopeo_copy's max_file_bytes).
    """
    p = subprocess.run([SKOPEO, "inspect", "--raw", *flags, f"docker://{ref}"], capture_output=True)
    if p.returncode != 0:
        raise OciError(f"skopeo inspect {ref} failed: {p.stderr.decode(errors='replace').strip()[-500:]}")
    if len(p.stdout) > MAX_MANIFEST:
        raise OciError(f"the manifest is {len(p.stdout)} bytes, over the {MAX_MANIFEST}-byte limit")
    try:
        manifest = json.loads(p.stdout)
    except ValueError as e:
        raise OciError(f"the manifest is not JSON: {e}") from None
    _, layer = check_manifest(manifest, limit, expect_id)
    head, slash, last = ref.split("@", 1)[0].rpartition("/")
    pinned = f"{head}{slash}{last.split(':', 1)[0]}@sha256:{hashlib.sha256(p.stdout).hexdigest()}"
    return pinned, max(layer["size"], manifest["config"]["size"], MAX_MANIFEST)


def import_layout(layout: Path, dest: Path, max_bytes: int, expect_id: str | None = None) -> str:
    """Unpack the checkpoint image in `layout` into the empty dir `dest`; returns the checkpoint id.

    The layer blob already in `layout` and the files written to `dest` together stay within `max_bytes`
    and the free space of dest's filesystem; `expect_id` (pull --id) must be the image's annotated id.
    """
    try:
        index = json.loads((layout / "index.json").read_text())
        manifest = json.loads(_read_blob(layout, index["manifests"][0], MAX_MANIFEST).read_text())
    except (AttributeError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise OciError(f"not a warmstart checkpoint image: {type(e).__name__}: {e}") from None
    cid, layer = check_manifest(manifest, max_bytes, expect_id)
    blob = _read_blob(layout, layer, max_bytes)
    try:
        _unpack(blob, LAYER_TYPES[layer["mediaType"]], dest, budget(dest, max_bytes - layer["size"]))
    except (tarfile.TarError, EOFError, zlib.error, OSError, ValueError, OverflowError) as e:
        raise OciError(f"cannot unpack the layer: {type(e).__name__}: {e}") from None
    return cid


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


def _manifest_sizes(raw: bytes) -> dict[str, int]:
    """File name -> size from a pulled metadata.json (schema-checked, so names are plain file names)."""
    from .metadata import validate  # noqa: PLC0415 - jsonschema is heavy; only a pull needs it here
    try:
        metadata = json.loads(raw)
        validate(metadata)
    except ValueError as e:
        raise OciError(f"{METADATA}: {e}") from None
    manifest = metadata["manifest"]
    if set(manifest) & CONTROL_FILES:
        raise OciError(f"{METADATA}: the manifest lists {sorted(set(manifest) & CONTROL_FILES)}")
    return {name: entry["size"] for name, entry in manifest.items()}


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


def _unpack(blob: Path, gzipped: bool, dest: Path, limit: int) -> None:
    """Unpack the layer: metadata.json and checkpoint.done first, then only the files their manifest
    names, each of exactly its manifest size, all together at most `limit` bytes."""
    with open(blob, "rb") as raw, (gzip.GzipFile(fileobj=raw) if gzipped else nullcontext(raw)) as plain:
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
            sizes = _manifest_sizes(control[METADATA][1])
            total = sum(sizes.values()) + sum(len(data) for _, data in control.values())
            if total > limit:
                raise OciError(f"the checkpoint's files take {total} bytes, over the {limit}-byte limit "
                               "(max_pull_bytes less the layer, or the store's free space)")
            for name, (info, data) in control.items():
                _write(dest / name, io.BytesIO(data), info)
            for m in members:
                if m.name not in sizes:
                    raise OciError(f"layer entry {m.name[:80]!r}: not in the manifest, or there twice")
                size = sizes.pop(m.name)
                _check_member(m, size, size)
                stream.limit = m.offset_data + size + HEADER_ROOM
                _write(dest / m.name, tar.extractfile(m), m)  # type: ignore[arg-type]


def skopeo_copy(src: str, dst: str, extra: list[str], max_file_bytes: int | None = None) -> None:
    """skopeo copy; with max_file_bytes no file it writes may grow past that (RLIMIT_FSIZE: a registry
    that sends more than its manifest said gets EFBIG, not our disk)."""
    cap = None if max_file_bytes is None else (
        lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes)))
    p = subprocess.run([SKOPEO, "copy", "--quiet", *extra, src, dst], capture_output=True, text=True,
                       preexec_fn=cap)
    if p.returncode != 0:
        raise OciError(f"skopeo copy {src} {dst} failed: {p.stderr.strip()[-500:]}")
