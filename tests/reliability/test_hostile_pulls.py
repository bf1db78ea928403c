"""Hostile checkpoint images through a real registry (docker-registry on loopback, skopeo) and `warmstart pull`.

The sparse and gzip-bomb images are a few KiB in the registry and unpack to gigabytes; two more hold
honest sizes over the cap. Expect for each: exit 1 with one `warmstart pull: REF: refused: ...` line
naming the problem, no traceback, at most `max_pull_bytes` written by the pull and all it ran (write(2)
bytes, counted by the kernel), nothing left under <store>/.tmp and no checkpoint in the store.
And `pull --id` refuses an image that holds another checkpoint id than the one asked for.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from reliability_lib import RNode, count
from warmstart import signing
from warmstart.config import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_oci import CID, control, entry, layout, sparse_entry  # noqa: E402 - the unit tests' hostile layouts
from test_registry import REGISTRY, registry  # noqa: E402, F401 - the loopback registry fixture

pytestmark = [pytest.mark.reliability, pytest.mark.skipif(not REGISTRY or not shutil.which("skopeo"),
                                                         reason="needs docker-registry and skopeo (install.sh)")]
CAP = 32 << 20
HUGE = 3 << 30  # what the layer would unpack to: the size the original attacks wrote
# Runs argv, then writes its own /proc/self/io, which by then counts the reaped pull and skopeo too.
COUNTING = ("import subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
            "open(sys.argv[1], 'w').write(open('/proc/self/io').read()); sys.exit(rc)")

CASES = {
    "sparse": (lambda: [*control({"pages-1.img": 4096}), sparse_entry("pages-1.img", HUGE, pax=False)], False,
               "'pages-1.img': only plain, non-sparse files are allowed"),
    "sparse-pax": (lambda: [*control({"pages-1.img": 4096}), sparse_entry("pages-1.img", HUGE, pax=True)], False,
                   "'pages-1.img': only plain, non-sparse files are allowed"),
    "gzip-bomb": (lambda: [*control({"pages-1.img": 4096}), entry("pages-1.img", 1 << 30)], True,
                  f"'pages-1.img': {1 << 30} bytes in the tar header, 4096 allowed"),
    # honest sizes, only too many of them: the layer is checked before the download, the files before unpacking
    "layer-over-the-cap": (lambda: [*control({"pages-1.img": 40 << 20}), entry("pages-1.img", os.urandom(40 << 20))],
                           True, "the image's blobs take"),
    "files-over-the-cap": (lambda: [*control({"pages-1.img": 64 << 20}), entry("pages-1.img", 64 << 20)], True,
                           "the checkpoint's files take"),
    # a consistent checkpoint anyone could build: without a trusted signature it never lands
    "unsigned": (lambda: [*control({"dump.log": 3}), entry("dump.log", b"log")], True, "not signed"),
    "signed-by-a-stranger": (lambda: [*control({"dump.log": 3}, signing_key=stranger_key()), entry("dump.log", b"log")],
                             True, "not in this node's trusted_keys"),
}


def stranger_key() -> Path:
    """An ed25519 key no node trusts."""
    d = Path(tempfile.mkdtemp(prefix="stranger-"))
    signing.keygen(d / "k", d / "k.pub")
    return d / "k"


def push(lay: Path, ref: str) -> None:
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{lay}:checkpoint", f"docker://{ref}"],
                   check=True, capture_output=True)


@pytest.mark.parametrize("case", CASES)
def test_pull_refuses_a_hostile_image(node: RNode, registry, tmp_path, case):  # noqa: F811 - fixture
    entries, gz, needle = CASES[case]
    node.set_config(max_pull_bytes=CAP)
    ref = f"{registry}/hostile/{case}:v1"
    push(layout(tmp_path, entries(), gz=gz), ref)
    io_stats = tmp_path / "io"
    pull = ["warmstart", "pull", ref, "--tls-verify", "false"]
    p = subprocess.run([sys.executable, "-c", COUNTING, str(io_stats), *pull], capture_output=True, text=True,
                       env={**os.environ, **node.env()}, timeout=300)
    count("hostile pulls")
    wchar = int(dict(line.split(": ") for line in io_stats.read_text().splitlines())["wchar"])
    assert p.returncode == 1, p.stderr
    assert wchar <= CAP, f"the pull wrote {wchar} bytes, over max_pull_bytes {CAP}: {p.stderr}"
    assert "Traceback" not in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
    assert p.stderr.startswith(f"warmstart pull: {ref}: refused: ") and needle in p.stderr, p.stderr
    assert not list((node.store / ".tmp").iterdir())
    assert node.store.exists() and not [c for c in node.store.iterdir() if not c.name.startswith(".")]


def test_pull_id_must_match_the_image(node: RNode, registry, tmp_path):  # noqa: F811 - fixture
    """An image tagged :official that holds another checkpoint id: `--id official` refuses it, `--id` of the
    id it holds pulls it."""
    ref = f"{registry}/hostile/official:official"
    signed = control({}, signing_key=Settings().signing_key)  # by this node's key: trusted once it lands
    push(layout(tmp_path, signed, cid=CID), ref)  # a complete (empty) checkpoint named CID
    p = node.warmstart("pull", ref, "--id", "official", "--tls-verify", "false")
    assert p.returncode == 1 and f"holds checkpoint '{CID}', not 'official'" in p.stderr, p.stderr
    assert not (node.store / CID).exists() and not list((node.store / ".tmp").iterdir())
    p = node.warmstart("pull", ref, "--id", CID, "--tls-verify", "false")
    assert p.returncode == 0 and (node.store / CID / "checkpoint.done").is_file(), p.stderr
