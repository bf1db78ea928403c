"""A docker-registry on loopback for the fleet demo and the e2e tests, and a raw blob round trip through it.

The raw round trip (one monolithic blob upload, one download, over plain HTTP) is the registry's own
rate on this machine: what a push or pull of the same bytes could at best reach, the fleet demo's floor.
"""
from __future__ import annotations

import hashlib
import http.client
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

BLOCK = 1 << 20
REGISTRY = "docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_registry(base: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """docker-registry on a loopback port, its storage (`data/`) and request log (registry.log) under `base`."""
    exe = shutil.which(REGISTRY)
    if not exe:
        raise FileNotFoundError(f"{REGISTRY} is not installed (install.sh installs it: apt-get install {REGISTRY})")
    port = port or free_port()
    (base / "config.yml").write_text(
        f"version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {base}/data\n"
        f"http:\n  addr: 127.0.0.1:{port}\n")
    with open(base / "registry.log", "ab") as log:
        proc = subprocess.Popen([exe, "serve", str(base / "config.yml")], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{REGISTRY} exited with {proc.returncode}; see {base}/registry.log") from None
            time.sleep(0.05)
    return proc, f"127.0.0.1:{port}"


@dataclass(frozen=True)
class RoundTrip:
    """One blob of `bytes` up and down: seconds each way and the rates in bytes per second."""

    bytes: int
    upload_s: float
    download_s: float

    @property
    def upload_bps(self) -> float:
        return self.bytes / self.upload_s

    @property
    def download_bps(self) -> float:
        return self.bytes / self.download_s


def blob_round_trip(addr: str, repo: str, src: Path) -> RoundTrip:
    """Upload `src` as one blob of `repo` (POST, then a streamed monolithic PUT), then download it to nowhere.

    The digest is computed first, outside the timing; both legs are one HTTP stream, like one of skopeo's.
    """
    h = hashlib.sha256()
    with open(src, "rb") as f:
        while data := f.read(BLOCK):
            h.update(data)
    digest, size = f"sha256:{h.hexdigest()}", src.stat().st_size
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=600, blocksize=BLOCK)
    try:
        t0 = time.monotonic()
        conn.request("POST", f"/v2/{repo}/blobs/uploads/")
        r = conn.getresponse()
        r.read()
        location = r.getheader("Location") or ""
        if r.status != 202 or not location:
            raise RuntimeError(f"blob upload to {addr}/{repo} not started: HTTP {r.status}")
        path = location.split(addr, 1)[-1] if "://" in location else location
        with open(src, "rb") as f:
            conn.request("PUT", f"{path}{'&' if '?' in path else '?'}digest={digest}", body=f,
                         headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"})
            r = conn.getresponse()
            r.read()
        upload_s = time.monotonic() - t0
        if r.status != 201:
            raise RuntimeError(f"blob upload to {addr}/{repo}: HTTP {r.status}")
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        got = 0
        t0 = time.monotonic()
        conn.request("GET", f"/v2/{repo}/blobs/{digest}")
        r = conn.getresponse()
        while n := r.readinto(view):
            got += n
        download_s = time.monotonic() - t0
        if r.status != 200 or got != size:
            raise RuntimeError(f"blob download from {addr}/{repo}: HTTP {r.status}, {got} of {size} bytes")
    finally:
        conn.close()
    return RoundTrip(size, upload_s, download_s)
