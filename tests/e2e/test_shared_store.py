"""Checkpoints across nodes through one shared directory (as a PVC / NFS mount), with real runc and CRIU.

Two (or more) node configs on one machine — separate stores, seals, state and logs — over ONE share dir.
What is proved: node A's dump is published to the share in the background and node B's create fetches,
verifies and restores it; readers fetching while two writers keep replacing the id only ever get a whole
version (and a lock-free observer never sees a marker beside a partial dir); a tampered file on the share
and an entry filed under another namespace each give a cold start, one log line, and nothing left behind;
`warmstart gc` on another node leaves a stalled publisher's `.tmp` entry alone and removes it once the
publisher is SIGKILLed, and unlinks a symlink planted in `.tmp` without following it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import shim  # noqa: E402
from test_fleet import ANN, BUF, dump, wait_for  # noqa: E402 - the same worker, checkpointed the same way

from warmstart import config  # noqa: E402
from warmstart.store import MARKER, METADATA, Store  # noqa: E402

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc, CRIU)"),
    pytest.mark.skipif(not Path(shim.RUNTIME).exists(), reason=f"{shim.RUNTIME} not installed (install.sh)"),
]



def runtime_python() -> str:
    """The python of the installed runtime (its shebang): the copy of warmstart under test."""
    return Path(shim.RUNTIME).read_text().splitlines()[0].removeprefix("#!").split()[0]


def share_node(base: Path, share: Path, **extra: object) -> shim.Node:
    n = shim.Node(base)
    lines = [f'path = "{share}"', *(f"{k} = {json.dumps(v)}" for k, v in extra.items())]
    with open(n.config, "a") as f:
        f.write("[shared_store]\n" + "\n".join(lines) + "\n")
    return n


def lines(node: shim.Node) -> list[dict]:
    return [r for r in node.runtime_log() if r.get("component") == "shared_store"]


def published(node: shim.Node, cid: str, count: int = 1) -> None:
    wait_for(lambda: len([r for r in lines(node) if r["msg"].startswith("published") and cid in r["msg"]]) >= count)


def store_state(node: shim.Node, scope: str = "_local") -> list[str]:
    root = node.store_root / scope
    if not root.exists():
        return []
    tmp = root / ".tmp"
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) + \
        (sorted(f".tmp/{p.name}" for p in tmp.iterdir()) if tmp.exists() else [])


@pytest.fixture(scope="module")
def share(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("share")
    d.chmod(0o700)
    return d


@pytest.fixture
def nodes(tmp_path_factory, share):
    shim.become_subreaper()
    made: list[shim.Node] = []

    def make(share_dir: Path | None = None, **extra: object) -> shim.Node:
        made.append(share_node(tmp_path_factory.mktemp("node"), share_dir or share, **extra))
        return made[-1]
    yield make
    for n in made:
        n.cleanup()


@pytest.fixture(scope="module")
def carried(tmp_path_factory, share):
    """Node A's worker, checkpointed as "carried" and published to the share by the dump itself."""
    shim.become_subreaper()
    a = share_node(tmp_path_factory.mktemp("node-a"), share)
    got = dump(a, "src", "carried")
    published(a, "carried")
    # its create had missed: one fetch (the share had nothing yet), then the publish after the dump
    msgs = [r["msg"] for r in lines(a)]
    assert len(msgs) == 2 and msgs[0].startswith("no checkpoint") and msgs[1].startswith("published "), msgs
    print(f"\nbackground publish: {msgs[1]}")
    yield a, got
    a.cleanup()


def test_node_b_fetches_node_as_checkpoint_from_the_share_and_restores_it(nodes, share, carried):
    _, before = carried
    on_share = share / "_local" / "carried"
    assert (on_share / MARKER).is_file()
    b = nodes()
    c = b.container("dst", {**ANN, "warmstart.dev/id": "carried"}, ["python3", "/workload.py", str(BUF)])
    t0 = time.monotonic()
    c.create()
    create_s = time.monotonic() - t0
    c.start()
    got = c.ask()
    assert (got["random"], got["counter"]) == (before["random"], before["counter"] + 1)  # node A's process
    (line,) = lines(b)
    assert line["msg"].startswith(f"fetched {on_share}, verified and sealed"), line
    assert any(str(r.get("msg", "")).startswith("restored from carried") for r in b.runtime_log())
    assert (b.base / "seals" / "_local" / "carried.json").is_file()  # restored from B's own sealed copy
    assert sorted(p.name for p in (b.store / "carried").iterdir()) == sorted(p.name for p in on_share.iterdir())
    print(f"\ncreate with fetch on miss + restore: {create_s:.2f}s ({line['msg']})")


READER = textwrap.dedent("""
    import json, os, sys, time
    from warmstart import config
    from warmstart.sharedfs import Share
    from warmstart.store import Store
    settings = config.load()
    store, share = Store(settings, "_local"), Share(settings, "_local")
    got, errors, end = [], [], time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        try:
            if not share.fetch(sys.argv[1]):
                errors.append("miss")
                continue
            got.append(store.open_verified(sys.argv[1]).metadata_sha256)
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
        store.remove(sys.argv[1])
    print(json.dumps({"got": got, "errors": errors}))
""")


def test_readers_get_only_whole_versions_while_two_writers_keep_replacing_it(nodes, share):
    """Writers A and W hold different versions of "versions" and publish them in turn (each publish
    swaps the id on the share); three reader nodes fetch, verify and drop it in a loop meanwhile."""
    a, w = nodes(), nodes(fetch="off")
    dump(a, "v1", "versions")
    published(a, "versions")
    from warmstart.sharedfs import Share
    assert Share(config.load(w.config), "_local").fetch("versions")  # W holds v1
    c = a.container("v2", {**ANN, "warmstart.dev/id": "versions"}, ["python3", "/workload.py", str(BUF)])
    c.create()  # restores v1 on A
    c.start()
    c.ask()
    Store(config.load(a.config), "_local").remove("versions")
    c.stop()  # dumps v2 on A; its publish replaces v1 on the share
    c.delete()
    published(a, "versions", 2)
    v2, v1 = (json.loads((n.store / "versions" / MARKER).read_text())["metadata_sha256"] for n in (a, w))
    assert v1 != v2

    on_share = share / "_local" / "versions"
    stop, partial, seen_complete = threading.Event(), [], [0]

    def observe() -> None:
        """A Dynamo-style reader that takes no lock: whenever the id's path holds a dir with a marker, that
        dir is complete.  A sample counts only when the same dir (inode) is at the path before and after
        it is read: a dir leaves the path once (moved aside, then deleted), so it was there throughout."""
        while not stop.is_set():
            try:
                ino = on_share.stat().st_ino
                fd = os.open(on_share, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                if os.fstat(fd).st_ino != ino or not os.path.exists(f"/proc/self/fd/{fd}/{MARKER}"):
                    continue
                names = set(os.listdir(fd))
                manifest = json.loads(Path(f"/proc/self/fd/{fd}/{METADATA}").read_text())["manifest"]
                if on_share.stat().st_ino != ino:
                    continue
                if names != set(manifest) | {MARKER, METADATA}:
                    partial.append(sorted(names))
                seen_complete[0] += 1
            except (OSError, ValueError):
                continue
            finally:
                os.close(fd)
    watcher = threading.Thread(target=observe, daemon=True)
    watcher.start()
    readers = [nodes(publish="off") for _ in range(3)]
    procs = [subprocess.Popen([runtime_python(), "-c", READER, "versions", "12"], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, **r.env()}) for r in readers]
    swaps = 0
    t_end = time.monotonic() + 10
    while time.monotonic() < t_end:
        for writer in (w, a):
            p = subprocess.run([runtime_python(), "-m", "warmstart.sharedfs", "publish", "versions"],
                               env={**os.environ, **writer.env()}, capture_output=True, text=True)
            assert p.returncode == 0, (p.stderr, lines(writer)[-1:])
            swaps += 1
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    stop.set()
    watcher.join()
    got = [d for r in results for d in r["got"]]
    print(f"\n{swaps} publishes (each a swap); fetches: {[len(r['got']) for r in results]}; "
          f"{got.count(v2)} of v2, {got.count(v1)} of v1; "
          f"lock-free observer saw {seen_complete[0]} complete dirs")
    assert [r["errors"] for r in results] == [[], [], []]  # no miss, no refusal: never a gap, never a mix
    assert set(got) == {v1, v2}  # both versions were read: the swaps happened under the readers
    assert len(got) >= 6 and partial == []
    assert sorted(os.listdir(share / "_local" / ".tmp")) == []
    replaced = [r for n in (a, w) for r in lines(n) if "replaced the version there" in r["msg"]]
    assert len(replaced) >= swaps - 1


def tampered_share(share: Path, dest: Path, scope: str = "_local") -> Path:
    """A second share holding a copy of "carried" under `scope`."""
    shutil.copytree(share / "_local" / "carried", dest / scope / "carried")
    dest.chmod(0o700)
    return dest / scope / "carried"


@pytest.mark.parametrize("case", ["tampered", "other-namespace"])
def test_a_bad_entry_on_the_share_is_a_cold_start_with_one_line(nodes, carried, share, tmp_path, case):
    scope = "tenant-b" if case == "other-namespace" else "_local"
    entry = tampered_share(share, tmp_path / "share2", scope)
    if case == "tampered":
        pages = max(entry.glob("pages-*.img"), key=lambda p: p.stat().st_size)
        data = bytearray(pages.read_bytes())
        data[len(data) // 2] ^= 0xFF
        pages.write_bytes(data)
        needle = f"{pages.name}: SHA-256 mismatch"
        extra = {}
    else:  # someone who can write the share filed namespace _local's checkpoint under tenant-b
        needle = "made in namespace '_local', found in the store of 'tenant-b'"
        extra = {"io.kubernetes.cri.sandbox-namespace": "tenant-b"}
    b = nodes(tmp_path / "share2")
    before = store_state(b, scope)
    c = b.container("cold", {**ANN, "warmstart.dev/id": "carried", **extra}, ["python3", "/workload.py", str(BUF)])
    c.create()
    c.start()
    assert c.readline()["event"] == "ready"  # a fresh process: it started cold
    (line,) = lines(b)
    assert line["level"] == "warning" and "refused" in line["msg"] and needle in line["msg"], line
    assert "the store is unchanged" in line["msg"] and "\n" not in line["msg"]
    assert store_state(b, scope) == before and not (b.store_root / scope / "carried").exists()
    assert not list((b.base / "seals").glob(f"{scope}/carried*"))
    print(f"\n{case}: {line['msg'][:300]}")


STALLED_PUBLISH = textwrap.dedent("""
    import sys
    from warmstart import config, sharedfs
    where, cid = sys.argv[1], sys.argv[2]
    real_copy, real_remove = sharedfs._copy_in, sharedfs._remove

    def stall():
        print("stalled", flush=True)
        sys.stdin.readline()  # until the test kills us, as a node crash would

    def copy_in(*args):  # "copy": the new version is in .tmp, not yet swapped in
        size = real_copy(*args)
        if where == "copy":
            stall()
        return size

    def remove(dfd, name):  # "trash": swapped in; the old version, moved aside, is not yet deleted
        if where == "trash" and name.startswith("trash."):
            stall()
        real_remove(dfd, name)
    sharedfs._copy_in, sharedfs._remove = copy_in, remove
    print(sharedfs.Share(config.load(), "_local").publish(cid))
""")


def gc(node: shim.Node) -> str:
    p = subprocess.run(["warmstart", "gc"], capture_output=True, text=True, env={**os.environ, **node.env()})
    assert p.returncode == 0 and p.stderr == "", p
    return p.stdout


@pytest.mark.parametrize("case", ["copy", "trash"])
def test_gc_sweeps_a_killed_publishers_leftovers_and_leaves_a_live_ones_alone(nodes, carried, tmp_path, case):
    """Node P publishes "carried" to a share and stalls (its copy in .tmp, or the replaced version in
    .tmp/trash.*): node G's `warmstart gc` keeps that entry while P lives, and removes it once P is
    SIGKILLed; a symlink planted in .tmp is unlinked, its target untouched."""
    a, _ = carried
    share = tmp_path / "share3"
    share.mkdir(mode=0o700)
    p, g = nodes(share), nodes(share)
    shutil.copytree(a.store / "carried", p.store / "carried")
    ns = share / "_local"
    (ns / ".tmp").mkdir(parents=True)
    if case == "trash":  # an older version on the share, which the publish replaces
        (ns / "carried").mkdir()
        (ns / "carried" / "pages-1.img").write_bytes(b"old" * 1000)
        (ns / "carried" / MARKER).write_text(json.dumps({"success": True, "metadata_sha256": "0" * 64}))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("root's")
    (ns / ".tmp" / "evil").symlink_to(outside)
    pub = subprocess.Popen([runtime_python(), "-c", STALLED_PUBLISH, case, "carried"], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True, env={**os.environ, **p.env()})
    try:
        assert pub.stdout.readline().strip() == "stalled"
        (entry,) = [n for n in os.listdir(ns / ".tmp") if n != "evil"]
        assert entry.startswith("trash.carried." if case == "trash" else "carried."), entry
        out = gc(g)
        assert f"kept {ns}/.tmp/{entry}: a publish in progress" in out and f"removed {ns}/.tmp/evil\n" in out, out
        assert os.listdir(ns / ".tmp") == [entry] and os.listdir(outside) == ["keep"]
        assert (outside / "keep").read_text() == "root's"
    finally:
        pub.kill()
        pub.wait(timeout=10)
    out = gc(g)
    print(f"\ngc after the publisher was killed: {out.strip()}")
    assert f"removed {ns}/.tmp/{entry}\n" in out and f"gc: 1 removed from the shared store {share}\n" in out, out
    assert os.listdir(ns / ".tmp") == []
    first, second = lines(g)
    assert f"{ns}/.tmp/evil" in first["msg"] and "kept 1" in first["msg"] and first["removed"] == 1
    assert second["msg"] == f"gc removed 1 entries dead publishers left: {ns}/.tmp/{entry}", second
    # the share still works: P's next publish puts its version there whole
    done = subprocess.run([runtime_python(), "-m", "warmstart.sharedfs", "publish", "carried"],
                          env={**os.environ, **p.env()}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (ns / "carried" / MARKER).read_text() == (p.store / "carried" / MARKER).read_text()
    assert os.listdir(ns / ".tmp") == []
