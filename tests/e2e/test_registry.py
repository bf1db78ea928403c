"""Checkpoints between nodes through a real OCI registry (Debian's docker-registry on loopback) and skopeo."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import shim  # noqa: E402

from warmstart.testing.registry import start_registry  # noqa: E402, F401 - test_fleet* import it from here

REGISTRY = shutil.which("docker-registry")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc, CRIU)"),
    pytest.mark.skipif(not REGISTRY or not shutil.which("skopeo"),
                       reason="needs docker-registry and skopeo (install.sh installs both)"),
    pytest.mark.skipif(not Path(shim.RUNTIME).exists(), reason=f"{shim.RUNTIME} not installed (install.sh)"),
]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    proc, addr = start_registry(tmp_path_factory.mktemp("registry"))
    yield addr
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def node(tmp_path_factory):
    shim.become_subreaper()
    n = shim.Node(tmp_path_factory.mktemp("node"))
    yield n
    n.cleanup()


def ws(node: shim.Node, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["warmstart", *args], capture_output=True, text=True, env={**os.environ, **node.env()})
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_push_pull_restore_on_another_node(node, registry, tmp_path_factory):
    ann = {"warmstart.dev/checkpoint": "on-stop", "warmstart.dev/id": "shipped"}
    a = node.container("src", ann)
    a.create()
    a.start()
    first = a.readline()
    before = a.ask()
    a.stop()
    a.delete()
    ws(node, "push", "shipped", f"{registry}/ckpt/shipped:v1", "--tls-verify", "false")

    other = shim.Node(tmp_path_factory.mktemp("other-node"))  # a second node: its own store, no seal
    try:
        out = ws(other, "pull", f"{registry}/ckpt/shipped:v1", "--tls-verify", "false").stdout
        assert "shipped: pulled" in out
        ck = other.store / "shipped"
        assert (ck / "checkpoint.done").is_file() and (other.seals / "shipped.json").is_file()
        assert {f.name for f in ck.iterdir()} == {f.name for f in (node.store / "shipped").iterdir()}
        assert all(oct(f.stat().st_mode & 0o777) == "0o600" for f in ck.iterdir())
        b = other.container("dst", ann)
        b.create()
        b.start()
        got = b.ask()
        assert (got["random"], got["counter"]) == (first["random"], before["counter"] + 1)
        assert ws(other, "pull", f"{registry}/ckpt/shipped:v1", "--tls-verify", "false", check=False).returncode == 1
    finally:
        other.cleanup()


def test_pull_refuses_a_hostile_image(node, registry, tmp_path):
    """A layer entry that escapes, pushed to the registry by someone else: nothing lands in the store."""
    from warmstart import oci
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "checkpoint.done").write_text(json.dumps({"success": True}))
    layout = tmp_path / "layout"
    oci.export_layout(src, "evil", layout, "checkpoint", oci.Packing(compress="none"))  # the layer is rewritten as plain tar
    # rewrite the layer with an entry named ../../escape, then fix the digests the way an attacker would
    import hashlib
    import tarfile
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    mdig = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((blobs / mdig).read_text())
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        info = tarfile.TarInfo("../../escape")
        data = b"pwned\n"
        info.size = len(data)
        import io
        tar.addfile(info, io.BytesIO(data))
    digest = hashlib.sha256(bad.read_bytes()).hexdigest()
    shutil.copyfile(bad, blobs / digest)
    manifest["layers"][0].update(digest=f"sha256:{digest}", size=bad.stat().st_size)
    mbytes = json.dumps(manifest).encode()
    mdig2 = hashlib.sha256(mbytes).hexdigest()
    (blobs / mdig2).write_bytes(mbytes)
    index["manifests"][0].update(digest=f"sha256:{mdig2}", size=len(mbytes))
    (layout / "index.json").write_text(json.dumps(index))
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:checkpoint",
                    f"docker://{registry}/ckpt/evil:v1"], check=True, capture_output=True)
    p = ws(node, "pull", f"{registry}/ckpt/evil:v1", "--tls-verify", "false", check=False)
    assert p.returncode == 1 and "../../escape" in p.stderr, p.stderr
    assert not (node.store / "evil").exists()
    assert not list((node.store / ".tmp").iterdir())
    assert not (node.base.parent / "escape").exists() and not (node.store.parent / "escape").exists()
