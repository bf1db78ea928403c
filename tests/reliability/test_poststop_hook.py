"""The poststop hook end to end: it releases a container's state whenever runc destroys the container, also
when warmstart-runtime's `delete` never comes; it runs once; it never takes the state from a dump or a
restore still using it; and no state dir is left behind.

runc runs poststop hooks only when it destroys a container (`runc delete`, `runc checkpoint`, the cleanup of
a failed create or restore): "delete never comes" here means the container is deleted by plain runc, as a
shim's cleanup or a tool calling runc directly does, bypassing warmstart-runtime.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from reliability_lib import RUNC, RNode, ann, assert_clean, make_checkpoint, rootfs_listing, shim, start_ready

pytestmark = [pytest.mark.reliability]
ON_READY = {"warmstart.dev/checkpoint": "on-ready"}  # never ready: no ready file appears, the supervisor waits


def runc(c: shim.Container, *args: str) -> subprocess.CompletedProcess:
    """Plain runc on the container, as a caller that bypasses warmstart-runtime."""
    return subprocess.run([str(RUNC), "--root", str(c.root), *args], capture_output=True, text=True, timeout=60)


def state_dirs(node: RNode) -> list[str]:
    d = node.base / "state" / "containers"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def supervisors(node: RNode) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        try:
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if b"warmstart.supervisor" in cmd and str(node.base).encode() in cmd:
            out.append(int(p.name))
    return out


def supervisors_after(node: RNode, timeout: float) -> list[int]:
    """The supervisors still running once those told to stop had `timeout` seconds to exit."""
    deadline = time.monotonic() + timeout
    while (left := supervisors(node)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def kill_and_reap(c: shim.Container) -> None:
    runc(c, "kill", "--all", c.id, "9")
    deadline = time.monotonic() + 20
    while (st := c.state()) and st.get("status") != "stopped" and time.monotonic() < deadline:
        time.sleep(0.05)
    shim.reap()


def delete_by_plain_runc(c: shim.Container) -> None:
    """The runtime's `delete` never comes: plain `runc delete` destroys the container (and runs poststop)."""
    kill_and_reap(c)
    p = runc(c, "delete", c.id)
    assert p.returncode == 0, p.stderr
    c.delete()  # closes our pipes; the runtime's late delete finds nothing of ours and passes through


def hooksd_poststop(node: RNode, cid: str) -> None:
    """What podman does with a hooks.d poststop hook: run it itself, after the runtime's delete."""
    subprocess.run([shutil.which("warmstart-hook") or "warmstart-hook", "poststop"],
                   input=json.dumps({"ociVersion": "1.0.2", "id": cid, "status": "stopped"}), text=True,
                   env={"WARMSTART_CONFIG": str(node.config)}, capture_output=True, timeout=30)


def hook_warnings(node: RNode) -> list[str]:
    return [r["msg"] for r in node.runtime_log() if r.get("component") == "poststop-hook"]


def warmstart_poststops(c: shim.Container) -> list[dict]:
    hooks = json.loads((c.bundle / "config.json").read_text()).get("hooks") or {}
    return [h for h in hooks.get("poststop", []) if "warmstart" in json.dumps(h)]


def test_poststop_releases_the_state_when_the_runtimes_delete_never_comes(node: RNode):
    before = node.snapshot()
    c = node.ctr("orphan", ON_READY)
    c.create()
    c.start()
    sd = node.base / "state" / "containers" / c.id
    deadline = time.monotonic() + 10
    while not supervisors(node) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert supervisors(node) and (sd / "state.json").is_file(), node.log_msgs()
    kill_and_reap(c)
    assert (sd / "state.json").is_file(), "the state goes when runc destroys the container, not at its stop"
    p = runc(c, "delete", c.id)
    assert p.returncode == 0, p.stderr
    assert not sd.exists(), f"the poststop hook left {sorted(x.name for x in sd.iterdir())}"
    assert not supervisors_after(node, 5)
    assert c.runtime("delete", c.id, check=False).returncode != 0  # the late delete: runc knows it no more
    c.delete()
    assert hook_warnings(node) == []
    assert_clean(node, before, "after a delete by plain runc")


def test_one_poststop_when_the_spec_carries_warmstarts_hook_already(node: RNode):
    """An engine's hooks.d (CRI-O) put warmstart's hook into the spec: the runtime adds no second one, and the
    hooks.d file's createRuntime of earlier versions does nothing."""
    script = shutil.which("warmstart-hook")
    assert script, "warmstart-hook not on PATH"
    theirs = {"path": script, "args": ["warmstart-hook", "poststop"], "env": [f"WARMSTART_CONFIG={node.config}"]}
    old = {"path": script, "args": ["warmstart-hook", "createRuntime"], "env": [f"WARMSTART_CONFIG={node.config}"]}
    before = node.snapshot()
    for mode in ("on-stop", "on-ready", "restore-only"):
        c = node.ctr(f"hd-{mode}", ann(f"hd-{mode}", mode))
        cfg = json.loads((c.bundle / "config.json").read_text())
        cfg["hooks"] = {"createRuntime": [old], "poststop": [theirs]}
        (c.bundle / "config.json").write_text(json.dumps(cfg))
        start_ready(c)
        assert warmstart_poststops(c) == [theirs], warmstart_poststops(c)
        sd = node.base / "state" / "containers" / c.id
        assert not (sd / "mountinfo").exists(), "createRuntime of earlier versions does nothing"
        delete_by_plain_runc(c)
        assert not sd.exists(), "the hooks.d hook released the state"
    assert hook_warnings(node) == []
    assert_clean(node, before, "after hooks.d-style hooks")


def test_twenty_containers_leave_no_state_dir(node: RNode):
    """Every mode, dumps and restores (one failing after runc restored it), deleted through warmstart-runtime
    or by plain runc, and podman's extra run of a hooks.d poststop after the delete: nothing is left."""
    make_checkpoint(node, "leak")  # an on-stop dump; runc checkpoint runs poststop mid-dump
    before = node.snapshot()
    plan = ([("dump", ann("leak2"))] + [("restore", ann("leak"))] * 5 + [("restore-only", ann("leak", "restore-only"))] * 3
            + [("failed-restore", {**ann("leak"), "warmstart.dev/post-restore": "exit 3"})] * 2
            + [("cold", ann(f"cold{i}")) for i in range(3)] + [("on-ready", ON_READY)] * 4
            + [("cold-restore-only", ann("nothing-here", "restore-only"))] * 2)
    assert len(plan) == 20
    for i, (kind, a) in enumerate(plan):
        c = node.ctr(f"n{i}", a)
        listing = rootfs_listing(c.bundle / "rootfs")
        since = len(node.runtime_log())
        c.create()
        sd = node.base / "state" / "containers" / c.id
        assert len(warmstart_poststops(c)) == 1, (kind, warmstart_poststops(c))
        assert (sd / "state.json").is_file(), (kind, node.log_msgs(since))
        if kind == "failed-restore":  # its cleanup ran `runc delete --force` while create still needed the dir
            assert any("post-restore hook failed" in m for m in node.log_msgs(since)), node.log_msgs(since)
            assert rootfs_listing(c.bundle / "rootfs") == listing, "the restore's rootfs diff was not undone"
        c.start()
        restored = kind in ("restore", "restore-only")
        if not restored:
            assert c.readline()["event"] == "ready"
        assert (c.ask()["counter"] > 1) == restored, (kind, node.log_msgs(since))
        if kind == "dump":
            p = c.stop()  # kill 15: runc checkpoint runs the poststop hook, mid-dump
            assert p.returncode == 0 and (node.store / "leak2" / "checkpoint.done").is_file(), node.log_msgs(since)
            assert (sd / "state.json").is_file(), "the hook took the state from the dump"
        if i % 2:
            delete_by_plain_runc(c)
        else:
            c.stop()
            c.delete()
        hooksd_poststop(node, c.id)
        assert not sd.exists(), (kind, node.log_msgs(since))
    assert state_dirs(node) == [] and supervisors_after(node, 5) == []
    assert hook_warnings(node) == []
    assert_clean(node, before, "after twenty containers")
