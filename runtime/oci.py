"""Checkpoints as OCI images, so any registry can carry them between nodes (skopeo moves them).

An image is one tar layer holding the checkpoint's flat file list, a config
naming the checkpoint id, and the manifest annotation `warmstart.dev/checkpoint-id`.
skopeo always compresses layers it uploads to a registry; we ask for gzip at
level 1 (CRIU pages compress poorly, so speed matters more than ratio), and
pull accepts plain or gzip tar layers.
A pulled image is untrusted: digests are checked, the layer may hold only plain
files with plain names, and the store runs its full verification before the
checkpoint is adopted.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import stat
import subprocess
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any

from .annotations import validate_id

ANNOTATION = "warmstart.dev/checkpoint-id"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
LAYER_TYPES = {LAYER_TYPE: "r:", LAYER_TYPE + "+gzip": "r:gz",
               "application/vnd.docker.image.rootfs.diff.tar.gzip": "r:gz"}
PUSH_FLAGS = ["--dest-compress-format", "gzip", "--dest-compress-level", "1"]
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
MAX_FILES = 100_000
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
            for f in sorted(ckpt.iterdir()):
                info = tarfile.TarInfo(f.name)
                st = f.stat()
                info.size, info.mode, info.mtime = st.st_size, 0o600, int(st.st_mtime)
                with open(f, "rb") as src:
                    tar.addfile(info, src)
    digest = h.hexdigest()
    size = layer_tmp.stat().st_size
    os.rename(layer_tmp, layout / "blobs" / "sha256" / digest)
    layer = {"mediaType": LAYER_TYPE, "digest": f"sha256:{digest}", "size": size}
    config = {"architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine()),
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


def import_layout(layout: Path, dest: Path) -> str:
    """Unpack the checkpoint image in `layout` into the empty dir `dest`; returns the checkpoint id."""
    try:
        index = json.loads((layout / "index.json").read_text())
        mdesc = index["manifests"][0]
        manifest = json.loads(_read_blob(layout, mdesc, 1 << 20).read_text())
        cid = validate_id(str((manifest.get("annotations") or {}).get(ANNOTATION, "")), f"manifest {ANNOTATION}")
        layers = manifest["layers"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise OciError(f"not a warmstart checkpoint image: {type(e).__name__}: {e}") from None
    if len(layers) != 1 or layers[0].get("mediaType") not in LAYER_TYPES:
        raise OciError(f"expected one tar or tar+gzip layer, got {[x.get('mediaType') for x in layers]}")
    blob = _read_blob(layout, layers[0], 1 << 40)
    try:
        _unpack(blob, LAYER_TYPES[layers[0]["mediaType"]], dest)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise OciError(f"layer unreadable: {type(e).__name__}: {e}") from None
    for f in dest.iterdir():
        if stat.S_IMODE(f.stat().st_mode) != 0o600:
            f.chmod(0o600)
    return cid


def _unpack(blob: Path, mode: str, dest: Path) -> None:
    with tarfile.open(blob, mode) as tar:
        count = 0
        for m in tar:
            count += 1
            if count > MAX_FILES:
                raise OciError(f"layer holds more than {MAX_FILES} entries")
            if not m.isreg() or "/" in m.name or m.name.startswith(".") or not m.name or "\x00" in m.name:
                raise OciError(f"layer entry {m.name[:80]!r}: only plain files with plain names are allowed")
            if (dest / m.name).exists():
                raise OciError(f"layer entry {m.name!r} appears twice")
            src = tar.extractfile(m)
            fd = os.open(dest / m.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 22)  # type: ignore[arg-type]
            os.utime(dest / m.name, (m.mtime, m.mtime))


def skopeo_copy(src: str, dst: str, extra: list[str]) -> None:
    p = subprocess.run([SKOPEO, "copy", "--quiet", *extra, src, dst], capture_output=True, text=True)
    if p.returncode != 0:
        raise OciError(f"skopeo copy {src} {dst} failed: {p.stderr.strip()[-500:]}")
