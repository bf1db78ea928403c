"""End to end through `warmstart-runtime` exactly as containerd's runc-v2 shim calls it.

Real runc, real CRIU; the only stand-in is this test playing the shim (argv,
stdio pipes, child subreaper), which is what tests/e2e/shim.py does.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import shim  # noqa: E402
from shim import subreaper  # noqa: E402, F401 - autouse: this module plays the shim

CRIU = shim.CRIU
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc, CRIU)"),
    pytest.mark.skipif(not CRIU.exists() or not shutil.which("runc"), reason="needs runc and CRIU >= 4.1 (install.sh)"),
    pytest.mark.skipif(not Path(shim.RUNTIME).exists(), reason=f"{shim.RUNTIME} not installed (install.sh)"),
]
ON_STOP = "on-stop"


@pytest.fixture(params=["dir", "overlay"])
def node(request, tmp_path_factory):
    n = shim.Node(tmp_path_factory.mktemp(f"node-{request.param}"), overlay=request.param == "overlay")
    yield n
    n.cleanup()


@pytest.fixture
def dnode(tmp_path_factory):
    n = shim.Node(tmp_path_factory.mktemp("node"))
    yield n
    n.cleanup()


def ann(cid: str, mode: str = ON_STOP) -> dict[str, str]:
    return {"warmstart.dev/checkpoint": mode, "warmstart.dev/id": cid}


def run_first(node: shim.Node, name: str, cid: str, asks: int = 2) -> tuple[shim.Container, dict]:
    c = node.container(name, ann(cid))
    c.create()
    c.start()
    ready = c.readline()
    last = {}
    for _ in range(asks):
        last = c.ask()
    return c, {"random": ready["random"], "counter": last["counter"]}


def stop_and_delete(c: shim.Container) -> subprocess.CompletedProcess:
    p = c.stop()
    c.delete()
    return p


def freezer_states(image_dir: Path) -> list[str]:
    """The freezer.state values a checkpoint's cgroup image records (CRIU restores them where it makes the dir)."""
    from pycriu import images

    with open(image_dir / "cgroup.img", "rb") as f:
        img = images.load(f)
    stack = [d for e in img["entries"] for c in e.get("controllers") or [] for d in c.get("dirs") or []]
    out = []
    while stack:
        d = stack.pop()
        out += [p["value"] for p in d.get("properties") or [] if p["name"] == "freezer.state"]
        stack += d.get("children") or []
    return out


def cgroup_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


def test_state_survives_checkpoint_on_stop_and_restore_into_new_container(node):
    a, before = run_first(node, "gen1", "e2e-state")
    p = stop_and_delete(a)
    assert p.returncode == 0, p.stderr
    assert (node.store / "e2e-state" / "checkpoint.done").is_file()
    meta = json.loads((node.store / "e2e-state" / "metadata.json").read_text())
    assert meta["container"]["rootfs"]["kind"] == ("overlay" if node.overlay else "dir")
    assert meta["dump"]["criu_stats"]["pages_written"] > 2000  # the 8 MiB buffer went into the image
    # the dump paused the container itself: its image must not tell a restore to freeze the new one
    assert freezer_states(node.store / "e2e-state") == ["THAWED"]

    b = node.container("gen2", ann("e2e-state"))
    b.create()
    b.start()
    # one poststop hook (it releases the state if runc deletes the container without us), no hook that
    # runc would run inside a restore (createRuntime, prestart)
    for x in (a, b):
        hooks = json.loads((x.bundle / "config.json").read_text()).get("hooks")
        assert list(hooks) == ["poststop"] and "hooks/main.py" in json.dumps(hooks["poststop"]), hooks
    got = b.ask("check")
    assert got["random"] == before["random"], "the random value drawn at start came back"
    assert got["counter"] == before["counter"] + 1, "the counter continued"
    assert got["intact"] is True, "the large buffer's checksum is intact"
    assert got["hostname"] == "gen2", "the new container's hostname, not the dumped one"
    rootfs = b.bundle / "rootfs"
    assert (rootfs / "data" / "written.txt").read_text() == f"written-{before['random']}\n"
    assert not (rootfs / "etc" / "todelete").exists(), "a file deleted before the dump stays deleted"
    assert any("restored from e2e-state" in r.get("msg", "") for r in b.log_records())

    # a full citizen: its own cgroup, and state/ps/exec/pause/resume/kill/delete work
    pid = b.pid()
    assert "/warmstart-test/gen2" in cgroup_of(pid) and "/warmstart-test/gen1" not in cgroup_of(pid)
    assert b.state()["status"] == "running"
    assert str(pid) in b.runtime("ps", b.id).stdout
    proc = b.bundle / "exec.json"
    proc.write_text(json.dumps({"args": ["python3", "-c", "print('exec-ok')"], "cwd": "/",
                                "env": ["PATH=/usr/bin:/bin"], "user": {"uid": 0, "gid": 0}}))
    assert "exec-ok" in b.runtime("exec", "--process", str(proc), b.id).stdout
    b.runtime("pause", b.id)
    assert b.state()["status"] == "paused"
    b.runtime("resume", b.id)
    assert b.ask()["counter"] == before["counter"] + 2
    b.runtime("kill", "--all", b.id, "9")
    assert shim.wait_exit(pid)
    b.delete()
    assert b.state() is None
    assert not (node.base / "state" / "containers" / "gen2").exists(), "no warmstart state outlives delete"


def test_three_generations_keep_their_state(dnode):
    a, before = run_first(dnode, "g1", "chain")
    stop_and_delete(a)
    counter = before["counter"]
    for gen in ("g2", "g3"):
        c = dnode.container(gen, ann("chain"))
        c.create()
        c.start()
        got = c.ask("check")
        counter += 1
        assert (got["random"], got["counter"], got["intact"]) == (before["random"], counter, True), gen
        # replace the checkpoint with this generation's state: the next one continues from here
        subprocess.run(["warmstart", "remove", "chain"], check=True, env={**os.environ, **dnode.env()},
                       capture_output=True)
        assert stop_and_delete(c).returncode == 0
        assert (dnode.store / "chain" / "checkpoint.done").is_file(), f"{gen} was checkpointed again"
    c = dnode.container("g4", ann("chain"))
    c.create()
    c.start()
    assert c.ask()["counter"] == counter + 1


def test_plain_container_is_untouched(dnode):
    c = dnode.container("plain", {})
    c.create()
    c.start()
    first = c.readline()
    assert c.ask()["counter"] == 1
    assert not (dnode.base / "state" / "containers" / "plain").exists()
    assert stop_and_delete(c).returncode == 0
    assert not dnode.store.exists() or not any(dnode.store.iterdir())
    spec = json.loads((c.bundle / "config.json").read_text())
    assert "org.criu.config" not in spec.get("annotations", {}), "config.json of a plain container is not rewritten"
    assert first["event"] == "ready"


def test_mode_off_and_bad_annotation_run_as_plain_runc(dnode):
    off = dnode.container("off", ann("x-off", "off"))
    off.create()
    off.start()
    off.readline()
    assert stop_and_delete(off).returncode == 0
    bad = dnode.container("bad", {"warmstart.dev/checkpoint": "sometimes", "warmstart.dev/id": "x-bad"})
    bad.create()
    bad.start()
    bad.readline()
    assert stop_and_delete(bad).returncode == 0
    assert not (dnode.store / "x-off").exists() and not (dnode.store / "x-bad").exists()
    msgs = [r["msg"] for r in bad.log_records() if r.get("level") == "error"]
    assert any("warmstart.dev/checkpoint" in m and "sometimes" in m for m in msgs), msgs


def _cold_after(node: shim.Node, cid: str, name: str, before: dict) -> tuple[shim.Container, list[str]]:
    c = node.container(name, ann(cid))
    c.create()
    c.start()
    ready = c.readline()
    assert ready["event"] == "ready" and ready["random"] != before["random"], "started cold"
    assert c.ask()["counter"] == 1
    msgs = [r["msg"] for r in c.log_records() if "cold start" in r.get("msg", "")]
    return c, msgs


def test_corrupt_pages_image_means_cold_start(dnode):
    a, before = run_first(dnode, "c1", "corrupt")
    stop_and_delete(a)
    pages = next((dnode.store / "corrupt").glob("pages-*.img"))
    st = pages.stat()
    with open(pages, "r+b") as f:
        f.seek(st.st_size // 2)
        b = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(pages, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as before: only ctime and hash tell
    c, msgs = _cold_after(dnode, "corrupt", "c2", before)
    assert any(pages.name in m and "refused" in m for m in msgs), msgs
    assert not (c.bundle / "rootfs" / "data" / "written.txt").read_text().endswith(f"{before['random']}\n")


def test_tampered_metadata_means_cold_start(dnode):
    a, before = run_first(dnode, "t1", "tampered")
    stop_and_delete(a)
    meta_p = dnode.store / "tampered" / "metadata.json"
    meta = json.loads(meta_p.read_text())
    meta["container"]["args"] = ["python3", "/evil.py"]
    meta_p.write_text(json.dumps(meta))
    _, msgs = _cold_after(dnode, "tampered", "t2", before)
    assert any("refused" in m and "metadata.json" in m for m in msgs), msgs


def _reseal_broken(node: shim.Node, cid: str) -> None:
    """A checkpoint whose files are consistent with its manifest but that CRIU cannot restore."""
    core = next((node.store / cid).glob("core-*.img"))
    core.write_bytes(core.read_bytes()[:64])  # truncated process core: CRIU fails on it
    shim.reseal(node, cid)


def test_failed_restore_falls_back_cold_leaves_nothing_and_quarantines(dnode):
    a, before = run_first(dnode, "f1", "fails")
    stop_and_delete(a)
    _reseal_broken(dnode, "fails")
    for i in range(3):
        c, msgs = _cold_after(dnode, "fails", f"f{i + 2}", before)
        assert any("failed" in m for m in msgs), msgs
        # nothing of the failed attempt: the pid file is the cold container's, one process in its cgroup
        assert c.state()["status"] == "running"
        assert not (dnode.base / "state" / "containers" / c.id / "rootfs-backup").exists()
        stop_and_delete(c)  # restore-less container with a checkpoint present: no second dump
    q = json.loads((dnode.store / ".quarantine" / "fails.json").read_text())
    assert q["quarantined"] is True and q["failures"] == 3
    _, msgs = _cold_after(dnode, "fails", "f9", before)
    assert any("quarantined" in m for m in msgs), msgs
    listing = subprocess.run(["warmstart", "list", "--json"], capture_output=True, text=True,
                             env={**os.environ, **dnode.env()}, check=True).stdout
    assert {"id": "fails", "status": "quarantined"}.items() <= next(
        r for r in json.loads(listing) if r["id"] == "fails").items()


@pytest.mark.skipif(os.environ.get("WARMSTART_CGROUP2_INNER") != "1", reason="runs inside the cgroup v2 namespace test")
def test_inner_cgroup_v2_restored_into_new_cgroup(dnode):
    assert Path("/sys/fs/cgroup/cgroup.controllers").exists(), "expected a cgroup2 hierarchy"
    a, before = run_first(dnode, "v2a", "v2")
    stop_and_delete(a)
    b = dnode.container("v2b", ann("v2"))
    b.create()
    b.start()
    assert b.ask()["counter"] == before["counter"] + 1
    v2_line = next(ln for ln in cgroup_of(b.pid()).splitlines() if ln.startswith("0::"))
    assert v2_line == "0::/warmstart-test/v2b", v2_line  # not v2a's: runc 1.1.5's bug, fixed by cgroup-root
    assert str(b.pid()) in b.runtime("ps", b.id).stdout
    # a second checkpoint of the restored container works (it fails when tasks sit in the old cgroup)
    subprocess.run(["warmstart", "remove", "v2"], check=True, env={**os.environ, **dnode.env()})
    assert stop_and_delete(b).returncode == 0
    assert (dnode.store / "v2" / "checkpoint.done").is_file()


def test_cgroup_v2(tmp_path):
    """runc 1.1.5 restores into the *old* cgroup on v2; run the flow on a pure v2 view and assert the fix."""
    script = (f"mount -t cgroup2 none /sys/fs/cgroup && exec {sys.executable} -m pytest -q -x -p no:cacheprovider "
              f"{__file__}::test_inner_cgroup_v2_restored_into_new_cgroup")
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       env={**os.environ, "WARMSTART_CGROUP2_INNER": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and "1 passed" in p.stdout, p.stdout[-3000:] + p.stderr[-2000:]
