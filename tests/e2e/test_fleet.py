"""Checkpoints across nodes through a real registry (docker-registry on loopback, skopeo), automatically.

Two node configs on one machine (separate stores, seals, logs), one registry.  What is proved:
a second dump of the same worker re-sends only the chunks that changed (counted from the registry's
own request log); push_in_background / pull_on_miss carry a checkpoint from node A to node B, where it
restores; concurrent pulls of one key share one pull; and a registry that is down, a missing tag, a
tampered blob, an image of another namespace or a disk that fills mid-pull each give False, one log line, and an unchanged store.
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
from warmstart.store import Store  # noqa: E402

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
    node = nodes(push="off")  # pushed by hand here, so that the registry's log counts these pushes alone
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


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, reg):
    """Checkpoint "carried" of node A's worker, pushed by push_in_background: (node A, its last answer)."""
    shim.become_subreaper()
    a = fleet_node(tmp_path_factory.mktemp("node-a"), f"{reg.addr}/fleet")
    got = dump(a, "src", "carried")  # push = auto: the dump itself starts the push, detached
    pushes = lambda: [r for r in fleet_lines(a) if r["msg"].startswith(("pushed", "push"))]  # noqa: E731
    wait_for(pushes)
    # its create had missed too: one pull attempt (nothing in the registry yet), then the push
    assert [r["msg"].split()[0] for r in fleet_lines(a)] == ["pull", "pushed"], fleet_lines(a)
    (line,) = pushes()
    assert line["msg"].startswith(f"pushed to {reg.addr}/fleet:_local.carried"), line
    print(f"\nbackground push: {line['msg']}")
    yield a, got
    a.cleanup()


def test_pull_on_miss_then_restore_on_another_node(nodes, pushed):
    _, before = pushed
    b = nodes()
    settings = config.load(b.config)
    t0 = time.monotonic()
    assert fleet.pull_on_miss(settings, "_local", "carried", 60)
    pull_s = time.monotonic() - t0
    (line,) = fleet_lines(b)
    assert line["msg"].startswith("pulled ") and "verified and sealed" in line["msg"], line
    c = b.container("dst", {**ANN, "warmstart.dev/id": "carried"}, ["python3", "/workload.py", str(BUF)])
    c.create()
    c.start()
    got = c.ask()
    assert (got["random"], got["counter"]) == (before["random"], before["counter"] + 1)
    print(f"\npull_on_miss: {pull_s:.2f}s ({line['msg']})")


def test_create_on_another_node_pulls_the_missing_checkpoint_and_restores(nodes, pushed):
    """No pull by hand: node B's create finds no checkpoint, pulls it (pull = on-miss) within its deadline,
    and restores node A's worker."""
    _, before = pushed
    b = nodes()
    c = b.container("auto", {**ANN, "warmstart.dev/id": "carried"}, ["python3", "/workload.py", str(BUF)])
    t0 = time.monotonic()
    c.create()
    create_s = time.monotonic() - t0
    c.start()
    got = c.ask()
    assert (got["random"], got["counter"]) == (before["random"], before["counter"] + 1)
    (line,) = fleet_lines(b)
    assert line["msg"].startswith("pulled "), line
    assert any(str(r.get("msg", "")).startswith("restored from carried") for r in b.runtime_log())
    print(f"\ncreate with pull on miss + restore: {create_s:.2f}s ({line['msg']})")


def test_concurrent_misses_on_a_node_share_one_pull(nodes, pushed):
    b = nodes()
    settings = config.load(b.config)
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(fleet.pull_on_miss(settings, "_local", "carried", 60)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 3
    assert [r["msg"].split()[0] for r in fleet_lines(b)] == ["pulled"]  # one pull, one line


def test_past_the_deadline_cold_and_the_next_container_finds_it(nodes, pushed):
    b = nodes()
    settings = config.load(b.config)
    assert not fleet.pull_on_miss(settings, "_local", "carried", 0.05)
    assert "not finished after 0.05s" in fleet_lines(b)[0]["msg"]
    wait_for(lambda: len(fleet_lines(b)) == 2)
    assert fleet_lines(b)[1]["msg"].startswith("pulled ")
    assert fleet.pull_on_miss(settings, "_local", "carried", 1)


def tamper(reg: Registry, ref: str) -> str:
    """Flip a byte of the image's first page chunk in the registry's storage: it now serves a blob
    that does not match its digest."""
    digest = reg.manifest(ref)["layers"][1]["digest"]
    p = reg.blob(digest)
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(data)
    return digest


BAD = {
    "registry-down": (lambda reg, a: ("127.0.0.1:9/fleet", "_local", "carried"), "connection refused"),
    "404": (lambda reg, a: (None, "_local", "never-pushed"), "manifest unknown"),  # the registry's 404
    "other-namespace": (lambda reg, a: (None, "tenant-a", "carried"),
                        "holds a checkpoint of namespace '_local', not 'tenant-a'"),
    "tampered-blob": (lambda reg, a: (None, "_local", "tampered"), "Digest did not match"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_registry_answer_is_a_cold_start_with_one_line(nodes, reg, pushed, case):
    a, _ = pushed
    make, needle = BAD[case]
    repository, scope, cid = make(reg, a)
    src = f"{reg.addr}/fleet:_local.carried"
    if case == "other-namespace":  # someone re-tags namespace _local's image as tenant-a's
        subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false",
                        f"docker://{src}", f"docker://{reg.addr}/fleet:tenant-a.carried"], check=True)
    if case == "tampered-blob":
        dump(a, "tampered", "tampered")  # pushed by the dump (push = auto)
        wait_for(lambda: any(r["msg"].startswith("pushed") and "_local.tampered" in r["msg"] for r in fleet_lines(a)))
        tamper(reg, f"{reg.addr}/fleet:_local.tampered")
    b = nodes(repository)
    settings = config.load(b.config)
    state = store_state(b)
    assert not fleet.pull_on_miss(settings, scope, cid, 60)
    lines = fleet_lines(b)
    assert len(lines) == 1 and lines[0]["level"] == "warning", lines
    assert "failed" in lines[0]["msg"] and needle in lines[0]["msg"] and "\n" not in lines[0]["msg"], lines
    assert "store is unchanged" in lines[0]["msg"]
    assert store_state(b) == state and not (b.store_root / scope / cid).exists()
    print(f"\n{case}: {lines[0]['msg'][:300]}")


def files_under(root: Path) -> dict[str, int]:
    """Every file (with its size) and dir under root, but the empty lock files (all a failed pull keeps)."""
    return {str(p.relative_to(root)): 0 if p.is_dir() else p.lstat().st_size for p in root.rglob("*")
            if not (p.suffix == ".lock" and p.parent.name in (".pulls", ".locks") and p.lstat().st_size == 0)}


def test_a_disk_that_fills_during_the_pull_is_a_cold_start_with_one_line(nodes, pushed, tmp_path):
    """The store on a real 128 MiB tmpfs that another writer fills while the pull's blobs arrive: ENOSPC
    midway.  pull_on_miss is False, one warning names the cause, the store path and the fix, and the store,
    its .tmp and the filesystem's used bytes are back to what they were."""
    b = nodes()
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m,mode=0700", "tmpfs", str(disk)], check=True)
    try:
        (disk / "store").mkdir(mode=0o700)
        b.store_root.mkdir(mode=0o700, exist_ok=True)
        subprocess.run(["mount", "--bind", str(disk / "store"), str(b.store_root)], check=True)
        try:
            settings = config.load(b.config)
            Store(settings, "_local").ensure()  # the store's own dirs (.tmp, .locks, ...), as any use makes them
            (b.store / ".pulls").mkdir(mode=0o700)
            before, used = files_under(b.store_root), shutil.disk_usage(disk).used
            filled = threading.Event()

            def fill_when_blobs_arrive() -> None:  # another writer on the node's disk, mid-pull
                end = time.monotonic() + 60
                while time.monotonic() < end and not any((b.store / ".tmp").glob("*/layout")):
                    time.sleep(0.001)  # skopeo has made the layout: the download has begun
                with open(disk / "filler", "wb") as f:  # a tmpfs gives back all of a failed fallocate: steps
                    off = 0
                    for step in (16 << 20, 1 << 20, 64 << 10, 4 << 10):
                        try:
                            while True:
                                os.posix_fallocate(f.fileno(), off, step)
                                off += step
                        except OSError:
                            pass
                filled.set()

            filler = threading.Thread(target=fill_when_blobs_arrive)
            filler.start()
            assert not fleet.pull_on_miss(settings, "_local", "carried", 60)
            filler.join()
            assert filled.is_set() and (disk / "filler").stat().st_size > 64 << 20
            lines = fleet_lines(b)
            assert len(lines) == 1 and lines[0]["level"] == "warning", lines
            msg = lines[0]["msg"]
            assert "disk is full" in msg and str(b.store) in msg and "\n" not in msg, msg
            assert "free space there" in msg and "warmstart gc --budget" in msg and "store is unchanged" in msg, msg
            assert files_under(b.store_root) == before
            (disk / "filler").unlink()
            assert shutil.disk_usage(disk).used == used  # nothing left anywhere on the disk
            assert not (b.store / "carried").exists()
            print(f"\ndisk full: {msg}")
        finally:
            subprocess.run(["umount", "-l", str(b.store_root)], check=False)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_the_node_agent_prefetches_what_this_nodes_pods_asked_for(nodes, pushed):
    """A pod on node C asked for "carried" and started cold (pulls off then); with pull = "prefetch" the
    node agent finds that in the runtime log and pulls the checkpoint ahead of the next pod."""
    from warmstart.agent import Agent

    c_node = nodes(pull="off")
    (c_node.base / "logs").mkdir(exist_ok=True)
    (c_node.base / "logs" / "runtime.log").touch()
    agent = Agent(config.load(c_node.config))
    c = c_node.container("first", {**ANN, "warmstart.dev/id": "carried"}, ["python3", "/workload.py", str(BUF)])
    c.create()
    c.start()
    c.readline()  # a cold start: "ready"
    agent.read_log()
    assert agent.prefetch() == []  # pull = off: nothing
    c_node.config.write_text(c_node.config.read_text().replace('pull = "off"', 'pull = "prefetch"'))
    agent = Agent(config.load(c_node.config), from_start=True)
    agent.read_log()
    assert agent.prefetch() == ["_local/carried"]
    assert (c_node.store / "carried" / "checkpoint.done").is_file()
    agent.read_log()  # the pull's own line counts as a pull
    assert agent.metrics.registry.get_sample_value("warmstart_pulls_total",
                                                   {"namespace": "_local", "outcome": "ok"}) == 1
    assert agent.metrics.registry.get_sample_value("warmstart_cold_starts_total",
                                                   {"namespace": "_local", "reason": "no_checkpoint"}) == 1
