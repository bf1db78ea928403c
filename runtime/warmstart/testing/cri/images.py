"""Build the harness's container images locally and import them into containerd.

No registry and no Docker on these machines, so images are assembled with
umoci (OCI layout), converted with `skopeo copy ... docker-archive:` and
imported with `ctr images import` into the CRI namespace (`k8s.io`).

Images:
* pause: busybox-static running a shell that sleeps and exits on TERM/INT
  (the CRI plugin's `sandbox_image`; no pull is ever needed);
* worker: Debian bookworm minbase + python3 + `refworker.py`, entrypoint
  `python3 -u /opt/warmstart/refworker.py` so CRI `args` are worker flags.

The debootstrap takes ~30 s, so built images are cached as docker-archive
tarballs under /var/cache/warmstart/images/, named by a hash of their inputs
(the worker's base rootfs separately from refworker.py, so editing the worker
costs an `umoci insert`, not a debootstrap). A lock file serialises builders.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Protocol

CACHE_DIR = Path("/var/cache/warmstart/images")
PAUSE_REF = "localhost/warmstart-pause:3.9"
WORKER_REPO = "localhost/warmstart-worker"
WORKER_PATH_IN_IMAGE = "/opt/warmstart/refworker.py"
REFWORKER_SRC = Path(__file__).resolve().parent.parent / "worker" / "refworker.py"
PAUSE_SCRIPT = 'trap "exit 0" TERM INT; while :; do sleep 3600 & wait $!; done'
SUITE = "bookworm"
BASE_PACKAGES = ("python3",)  # python3-minimal lacks http.server/json; python3 is +~20 MB
KEEP_WORKER_IMAGES = 3
BUILD_VERSION = "1"  # bump when the build recipe changes, to invalidate caches

Progress = Callable[[str], None]


class HasCtr(Protocol):
    """What we need from a containerd instance (see containerd.Containerd)."""

    def ctr(self, *args: str, check: bool = True, timeout: float = 600.0) -> subprocess.CompletedProcess[str]: ...


class ImageBuildError(RuntimeError):
    pass


def _noop(_m: str) -> None:
    pass


# -- public API -----------------------------------------------------------------

def ensure_pause_image(containerd: HasCtr, *, cache_dir: Path = CACHE_DIR,
                       progress: Progress | None = None) -> str:
    """Make the pause (sandbox) image available in `containerd`; returns its ref."""
    tar = build_pause_image(cache_dir=cache_dir, progress=progress)
    import_image(containerd, tar, PAUSE_REF, progress=progress)
    return PAUSE_REF


def ensure_worker_image(containerd: HasCtr, *, cache_dir: Path = CACHE_DIR,
                        refworker: Path = REFWORKER_SRC, mirror: str | None = None,
                        progress: Progress | None = None) -> str:
    """Make the Python worker image available in `containerd`; returns its ref.

    The tag is the hash of the image's inputs, so a changed refworker.py gives
    a new ref (a checkpoint taken with the old worker cannot match by image).
    """
    tar, ref = build_worker_image(cache_dir=cache_dir, refworker=refworker, mirror=mirror,
                                  progress=progress)
    import_image(containerd, tar, ref, progress=progress)
    return ref


def import_image(containerd: HasCtr, tar: Path, ref: str, *, progress: Progress | None = None) -> None:
    """`ctr images import` into the CRI namespace (skipped if the ref is already there)."""
    progress = progress or _noop
    listed = containerd.ctr("images", "ls", "-q", check=False).stdout.split()
    if ref in listed:
        return
    t = time.monotonic()
    res = containerd.ctr("images", "import", "--snapshotter", "overlayfs", str(tar), check=False)
    if res.returncode != 0:
        raise ImageBuildError(f"ctr images import {tar} failed: {res.stderr.strip()}")
    listed = containerd.ctr("images", "ls", "-q", check=False).stdout.split()
    if ref not in listed:
        raise ImageBuildError(f"imported {tar} but {ref} is not listed (got {listed})")
    progress(f"imported {ref} in {time.monotonic() - t:.1f}s")


def build_pause_image(*, cache_dir: Path = CACHE_DIR, progress: Progress | None = None) -> Path:
    """The pause image as a docker-archive tarball (cached)."""
    progress = progress or _noop
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    key = _hash(BUILD_VERSION, "pause", PAUSE_REF, PAUSE_SCRIPT, busybox.read_bytes())
    out = cache_dir / f"pause-{key}.tar"
    with _cache_lock(cache_dir):
        if out.exists():
            return out
        t = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="ws-pause-", dir=cache_dir) as tmp:
            layout, bundle, img = _new_image(Path(tmp), "pause")
            rootfs = bundle / "rootfs"
            for d in ("bin", "proc", "sys", "dev", "etc", "tmp"):
                (rootfs / d).mkdir(exist_ok=True)
            shutil.copy2(busybox, rootfs / "bin" / "busybox")
            for applet in ("sh", "sleep"):
                (rootfs / "bin" / applet).symlink_to("busybox")
            _run("umoci", "repack", "--image", img, str(bundle))
            _run("umoci", "config", "--image", img, "--config.entrypoint", "/bin/sh",
                 "--config.entrypoint", "-c", "--config.entrypoint", PAUSE_SCRIPT,
                 "--config.env", "PATH=/bin", "--architecture", "amd64", "--os", "linux")
            _publish(_to_docker_archive(layout, "pause", PAUSE_REF, Path(tmp)), out)
        progress(f"built pause image in {time.monotonic() - t:.1f}s -> {out}")
    return out


def build_worker_image(*, cache_dir: Path = CACHE_DIR, refworker: Path = REFWORKER_SRC,
                       mirror: str | None = None, progress: Progress | None = None) -> tuple[Path, str]:
    """The worker image as a docker-archive tarball (cached); returns (tarball, ref)."""
    progress = progress or _noop
    mirror = mirror or debian_mirror()
    base_key = _hash(BUILD_VERSION, "pybase", SUITE, mirror, *BASE_PACKAGES)
    key = _hash(base_key, "worker", refworker.read_bytes(), WORKER_PATH_IN_IMAGE)
    ref = f"{WORKER_REPO}:{key}"
    out = cache_dir / f"worker-{key}.tar"
    with _cache_lock(cache_dir):
        if out.exists():
            return out, ref
        base = _build_python_base(cache_dir, base_key, mirror, progress)
        t = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="ws-worker-", dir=cache_dir) as tmp:
            layout = Path(tmp) / "oci"
            _copy_layout(base, layout)
            img = f"{layout}:base"
            staged = Path(tmp) / "refworker.py"
            shutil.copy2(refworker, staged)
            staged.chmod(0o644)
            _run("umoci", "insert", "--image", img, str(staged), WORKER_PATH_IN_IMAGE)
            _run("umoci", "config", "--image", img,
                 "--config.entrypoint", "/usr/bin/python3", "--config.entrypoint", "-u",
                 "--config.entrypoint", WORKER_PATH_IN_IMAGE,
                 "--config.env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                 "--config.env", "PYTHONDONTWRITEBYTECODE=1",
                 "--config.workingdir", "/", "--config.exposedports", "8080/tcp",
                 "--config.stopsignal", "SIGTERM", "--architecture", "amd64", "--os", "linux")
            _publish(_to_docker_archive(layout, "base", ref, Path(tmp)), out)
        progress(f"built worker image in {time.monotonic() - t:.1f}s -> {out}")
        _prune(cache_dir, "worker-*.tar", keep=KEEP_WORKER_IMAGES)
    return out, ref


def debian_mirror() -> str:
    """The Debian mirror apt uses here (deb822 or one-line format); the VM reaches only it."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for stanza in sources.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            suites = fields.get("Suites", "").split()
            if SUITE in suites and fields.get("URIs"):
                return fields["URIs"].split()[0]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and SUITE in parts and not parts[1].startswith("["):
                return parts[1]
    return "http://deb.debian.org/debian"


# -- internals ------------------------------------------------------------------

def _build_python_base(cache_dir: Path, key: str, mirror: str, progress: Progress) -> Path:
    """bookworm minbase + python3 as an OCI layout (cached; the slow part, ~30 s)."""
    out = cache_dir / f"pybase-{key}.oci"
    if (out / "index.json").exists():
        return out
    if not shutil.which("debootstrap"):
        raise ImageBuildError("debootstrap is not installed (apt-get install debootstrap)")
    t = time.monotonic()
    progress(f"debootstrap {SUITE} minbase + {' '.join(BASE_PACKAGES)} from {mirror} (~30 s, once)")
    with tempfile.TemporaryDirectory(prefix="ws-pybase-", dir=cache_dir) as tmp:
        layout, bundle, img = _new_image(Path(tmp), "base")
        rootfs = bundle / "rootfs"
        try:
            _run("debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                 SUITE, str(rootfs), mirror, timeout=1200)
        finally:
            _unmount_under(rootfs)  # debootstrap mounts proc/sys in the target; never leave them
        _prune_rootfs(rootfs)
        res = subprocess.run(["chroot", str(rootfs), "/usr/bin/python3", "-c",
                              "import hashlib, http.server, json, argparse; hashlib.shake_256(b'')"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise ImageBuildError(f"python3 in the base image cannot run the worker: {res.stderr}")
        _run("umoci", "repack", "--image", img, str(bundle))
        tmp_out = out.with_suffix(".oci.tmp")
        shutil.rmtree(tmp_out, ignore_errors=True)
        shutil.move(str(layout), tmp_out)
        os.rename(tmp_out, out)
    progress(f"built python base in {time.monotonic() - t:.1f}s -> {out}")
    return out


def _new_image(tmp: Path, tag: str) -> tuple[Path, Path, str]:
    """An empty OCI image `tag` in a fresh layout under tmp, unpacked to a bundle to fill."""
    layout, bundle = tmp / "oci", tmp / "bundle"
    img = f"{layout}:{tag}"
    _run("umoci", "init", "--layout", str(layout))
    _run("umoci", "new", "--image", img)
    _run("umoci", "unpack", "--image", img, str(bundle))
    return layout, bundle, img


def _prune_rootfs(rootfs: Path) -> None:
    """Drop what a container never uses (docs, apt caches, device nodes: CRI mounts its own /dev)."""
    for rel in ("usr/share/doc", "usr/share/man", "usr/share/info", "var/cache/apt",
                "var/lib/apt/lists", "var/log"):
        p = rootfs / rel
        if p.is_dir():
            for child in p.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    dev = rootfs / "dev"
    if dev.is_dir():
        for child in dev.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


def _prune(cache_dir: Path, pattern: str, keep: int) -> None:
    """Each edit of refworker.py makes a new ~150 MB tarball: keep only the newest few."""
    old = sorted(cache_dir.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)[keep:]
    for p in old:
        p.unlink(missing_ok=True)


def _copy_layout(src: Path, dst: Path) -> None:
    """Copy an OCI layout, hard-linking blobs (content-addressed and never rewritten by umoci)."""
    def link_or_copy(s: str, d: str) -> None:
        if "/blobs/" in s:
            try:
                os.link(s, d)
                return
            except OSError:
                pass
        shutil.copy2(s, d)
    shutil.copytree(src, dst, copy_function=link_or_copy)


def _to_docker_archive(layout: Path, tag: str, ref: str, tmp: Path) -> Path:
    tar = tmp / "image.tar"
    _run("skopeo", "--insecure-policy", "copy", f"oci:{layout}:{tag}", f"docker-archive:{tar}:{ref}")
    return tar


def _publish(tar: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tar.tmp")
    shutil.move(str(tar), tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.rename(tmp, out)


@contextmanager
def _cache_lock(cache_dir: Path) -> Iterator[None]:
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(cache_dir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _hash(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p if isinstance(p, bytes) else p.encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]


def _run(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise ImageBuildError(f"{' '.join(argv[:3])}... failed ({res.returncode}): "
                              f"{(res.stderr or res.stdout).strip()[-2000:]}")
    return res


def _unmount_under(base: Path) -> None:
    base = base.resolve()
    mps = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = Path(line.split(" ")[4].encode().decode("unicode_escape"))
        if mp == base or base in mp.parents:
            mps.append(mp)
    for mp in reversed(mps):
        subprocess.run(["umount", "-l", str(mp)], capture_output=True)
