"""Faults during a restore: CRIU killed, a mount missing, a rootfs the diff cannot apply to, a read-only
rootfs; then quarantine after consecutive failures and its operator clear.

Expect: a cold start (`create` succeeds, the workload starts fresh), the rootfs exactly as before the
attempt, nothing of the attempt left (processes, mounts, cgroups, runc and warmstart state) and the reason
logged.  Right after `create` and before `start`, no workload process may exist at all: the cold
container's process is still `runc init`, so any process running the workload is a leftover.
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from warmstart import createlock
from reliability_lib import (RNode, ann, shim, assert_clean, count, make_checkpoint, rootfs_listing, start_ready,
                             tagged_pids, write_criu_wrapper)

pytestmark = [pytest.mark.reliability]
BIG = 256 << 20


def wait_no_tagged(node: RNode, timeout: float = 5) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := tagged_pids(node.tag)) and time.monotonic() < deadline:
        shim.reap()
        time.sleep(0.05)
    return left


def describe(pids: set[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            st = {k: v.strip() for k, v in (ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines())}
            cg = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
            out.append(f"{pid} state={st.get('State')} ppid={st.get('PPid')} nspid={st.get('NSpid')} "
                       f"cgroup={[c for c in cg if 'freezer' in c or 'pids' in c]}")
        except OSError as e:
            out.append(f"{pid}: {e}")
    return out


def cold_after_failed_restore(node: RNode, short: str, cid: str, dumped: dict, needle: str,
                              expect_workload: bool = True, prepare=None, check=None, size: int = BIG) -> list[str]:
    c = node.ctr(short, ann(cid), size=size)
    if prepare:
        prepare(c)
    rootfs = c.bundle / "rootfs"
    listing = rootfs_listing(rootfs)
    since = len(node.runtime_log())
    c.create()
    assert check is None or check(), f"fault not injected: {node.runtime_log()[since:]}"
    assert rootfs_listing(rootfs) == listing, f"the failed restore changed the rootfs: {node.runtime_log()[since:]}"
    assert not wait_no_tagged(node), f"processes of the failed restore are left: {describe(tagged_pids(node.tag))}"
    assert not (node.base / "state" / "containers" / c.id / "rootfs-backup").exists()
    msgs = node.log_msgs(since)
    assert any(m.startswith("cold start:") and needle in m for m in msgs), (needle, msgs)
    c.start()
    if expect_workload:
        ready = c.readline()
        assert ready["event"] == "ready" and ready["random"] != dumped["random"], "not a cold start"
        assert c.ask()["counter"] == 1
    c.stop()
    c.delete()
    return msgs


def test_criu_sigkilled_mid_restore_then_quarantine_then_clear(node: RNode):
    write_criu_wrapper(node)
    dumped = make_checkpoint(node, "kr", size=BIG)
    before = node.snapshot()
    # three kills at different depths of the restore: namespaces set up, files opened, memory mapped
    for i, text in enumerate(["Restoring IPC", "Collected pipe data", "Opening 0x"]):
        name = f"r{i}"
        (node.bin / "criu-kill-grep").write_text(
            f"{node.base}/state/containers/{node.name(name)}/work/restore/restore.log|{text}")
        (node.bin / "criu-killed").unlink(missing_ok=True)
        cold_after_failed_restore(node, name, "kr", dumped, "restore from kr failed",
                                  check=lambda: (node.bin / "criu-killed").exists())
        count("faults.restore")
        assert_clean(node, before, f"after CRIU was killed at {text!r}")
    q = json.loads((node.store / ".quarantine" / "kr.json").read_text())
    assert q["failures"] == 3 and q["quarantined"] is True, q
    (node.bin / "criu-kill-grep").unlink()
    calls = (node.bin / "criu-calls").read_text().count("\n")
    msgs = cold_after_failed_restore(node, "r3", "kr", dumped, "is quarantined after 3 failed restores")
    assert (node.bin / "criu-calls").read_text().count("\n") == calls, "CRIU ran for a quarantined checkpoint"
    assert any("warmstart verify --clear kr" in m for m in msgs), msgs
    listing = json.loads(node.warmstart("list", "--json", check=True).stdout)
    assert next(r for r in listing if r["id"] == "kr")["status"] == "quarantined"
    v = node.warmstart("verify", "--clear", "kr")
    assert v.returncode == 0 and "quarantine cleared" in v.stdout, v.stdout + v.stderr
    c = node.ctr("r4", ann("kr"), size=BIG)
    c.create()
    c.start()
    got = c.ask()
    assert got["random"] == dumped["random"] and got["counter"] == dumped["counter"] + 1, "restored after clear"
    assert not (node.store / ".quarantine" / "kr.json").exists(), "a successful restore resets the count"
    c.stop()
    c.delete()
    assert_clean(node, before, "after the cleared restore")


def test_criu_sigkilled_while_helpers_read_pages(node: RNode):
    """warmstart's parallel-reads patch: CRIU killed while its helper processes fill the root's memory."""
    write_criu_wrapper(node)
    node.set_config(restore_read_threads=2)  # the same on a 1-CPU machine
    dumped = make_checkpoint(node, "kp", size=4 * BIG)  # 1 GiB: the reads last long enough to be hit
    before = node.snapshot()
    (node.bin / "criu-kill-grep").write_text(
        f"{node.base}/state/containers/{node.name('p0')}/work/restore/restore.log|bytes of pages in 1")
    cold_after_failed_restore(node, "p0", "kp", dumped, "restore from kp failed", size=4 * BIG,
                              check=lambda: (node.bin / "criu-killed").exists())
    count("faults.restore")
    assert_clean(node, before, "after CRIU was killed while reading pages in parallel")


def _add_bind(c, src, dest="/extra"):
    cfg = json.loads((c.bundle / "config.json").read_text())
    cfg["mounts"].append({"destination": dest, "type": "bind", "source": str(src), "options": ["rbind", "rw"]})
    (c.rootfs_dir / dest.lstrip("/")).mkdir(exist_ok=True)
    (c.bundle / "config.json").write_text(json.dumps(cfg))


def test_missing_bind_mount(node: RNode):
    src = node.base / "extra-src"
    src.mkdir()
    c = node.ctr("m0", ann("mnt"), size=BIG)
    c.rootfs_dir = c.bundle / "rootfs"
    _add_bind(c, src)
    c.create()
    c.start()
    ready = c.readline()
    c.ask()
    assert c.stop().returncode == 0
    c.delete()
    assert (node.store / "mnt" / "checkpoint.done").is_file()
    before = node.snapshot()
    # the new bundle lacks /extra (the directory exists in its rootfs, the mount does not)
    cold_after_failed_restore(node, "m1", "mnt", {"random": ready["random"]}, "mnt",
                              prepare=lambda c: (c.bundle / "rootfs" / "extra").mkdir())
    count("faults.restore")
    assert_clean(node, before, "after a restore that lacked a bind mount")


def test_diff_needs_a_dir_where_the_new_rootfs_has_a_file(node: RNode):
    dumped = make_checkpoint(node, "nd", size=BIG)
    before = node.snapshot()

    def data_is_a_file(c):
        (c.bundle / "rootfs" / "data").rmdir()
        (c.bundle / "rootfs" / "data").write_text("I am a file\n")
    # the cold workload cannot write /data/written.txt either: it exits; create and the refusal matter here
    # /data is a file in this image: a different image, refused before the diff is even looked at
    cold_after_failed_restore(node, "n1", "nd", dumped, "container image differs",
                              expect_workload=False, prepare=data_is_a_file)
    count("faults.restore")
    assert_clean(node, before, "after a diff that could not apply")
    q = node.store / ".quarantine" / "nd.json"
    assert not q.exists(), "a refusal for this rootfs must not count against the checkpoint"


def test_read_only_rootfs(node: RNode):
    dumped = make_checkpoint(node, "ro", size=BIG)
    before = node.snapshot()

    def ro(c):
        r = c.bundle / "rootfs"
        subprocess.run(["mount", "--bind", str(r), str(r)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(r)], check=True)
        node.mounts.append(r)
    msgs = cold_after_failed_restore(node, "o1", "ro", dumped, "Read-only file system", expect_workload=False,
                                     prepare=ro)
    count("faults.restore")
    errors = [r for r in node.runtime_log() if r.get("level") == "error"]
    assert not errors, f"cleanup reported errors on a rootfs it never changed: {errors}"
    subprocess.run(["umount", str(node.mounts.pop())], check=True)
    assert_clean(node, before, "after a restore onto a read-only rootfs")
    assert msgs


def test_restore_from_a_read_only_store(node: RNode):
    """restore.py reads images in place "so the checkpoint may sit on a read-only store": check it does."""
    dumped = make_checkpoint(node, "rostore")
    subprocess.run(["mount", "--bind", str(node.store), str(node.store)], check=True)
    node.mounts.append(node.store)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(node.store)], check=True)
    c = node.ctr("q1", ann("rostore"))
    since = len(node.runtime_log())
    c.create()
    count("faults.restore")
    c.start()
    got = c.ask()
    msgs = node.log_msgs(since)
    rl = [l for f in (node.base / "logs").glob("restore-*") for l in f.read_text().splitlines() if "Error" in l]
    assert got["random"] == dumped["random"], f"cold start from a read-only store: {msgs} {rl}"
    c.stop()
    c.delete()


def test_restore_past_its_deadline_is_killed_and_starts_cold(node):
    """A restore that hangs (here: a CRIU that sleeps) is killed with its whole process group at
    restore_timeout_s, inside kubelet's deadline, and the container starts cold."""
    write_criu_wrapper(node)
    dumped = make_checkpoint(node, "slow", size=BIG)
    before = node.snapshot()
    node.set_config(restore_timeout_s=2)
    (node.bin / "criu-sleep-swrk").write_text("60")
    t = time.monotonic()
    cold_after_failed_restore(node, "late", "slow", dumped, "killed after 2s")
    assert time.monotonic() - t < 30, "create waited for the hung restore"
    sleeping = subprocess.run(["pgrep", "-f", f"{node.bin}/criu"], capture_output=True, text=True).stdout.split()
    assert not sleeping, f"the hung CRIU survived: {sleeping}"
    count("faults.restore")
    assert_clean(node, before, "after a restore timed out")


def test_a_restore_after_a_wait_is_cut_at_the_create_budget_and_starts_cold(node):
    """The waits of one create add up (here: 4 s on the create lock another create of the id holds, then a
    restore that hangs): the hung restore is killed at what is left of create_budget_s, not at its own
    restore_timeout_s, so the cold start still ends inside the budget (kubelet's 2 minutes on a node)."""
    write_criu_wrapper(node)
    dumped = make_checkpoint(node, "late", size=BIG)
    before = node.snapshot()
    node.set_config(restore_timeout_s=60, create_budget_s=20)  # 10 s of the 20 kept for the cold start
    (node.bin / "criu-sleep-swrk").write_text("60")
    c_id = node.name("cut")
    held = createlock.hold(node.base / "state", node.root, c_id)  # as another create of the id would
    assert held is not None
    threading.Timer(4, os.close, [held]).start()
    t = time.monotonic()
    msgs = cold_after_failed_restore(node, "cut", "late", dumped, "what was left of create_budget_s = 20")
    took = time.monotonic() - t
    rec = next(r for r in node.runtime_log()
               if r.get("container") == c_id and r.get("msg", "").startswith("cold start:"))
    print(f"create to cold workload {took:.1f}s, restore phase {rec['phases']['restore']:.1f}s: {rec['msg'][:240]}")
    assert rec["phases"]["restore"] < 8, f"the restore ran past what the lock wait left of the budget: {msgs}"
    assert 4 <= took < 30, f"create {took:.1f}s: not cut at the budget"
    assert not any("restore_timeout_s" in m for m in msgs), msgs
    sleeping = subprocess.run(["pgrep", "-f", f"{node.bin}/criu"], capture_output=True, text=True).stdout.split()
    assert not sleeping, f"the hung CRIU survived: {sleeping}"
    count("faults.restore")
    assert_clean(node, before, "after the create budget cut a restore")


def test_criu_killed_while_the_restored_root_holds_the_swrk_socket(node):
    """CRIU killed as soon as runc has a second child (with `RstSibling`, the restored root task, cloned as
    runc's child while it still holds the swrk socket): runc 1.1 waits for CRIU only by reading that socket
    to EOF, so the restore hung until restore_timeout_s.  It must fail within seconds and touch nothing."""
    write_criu_wrapper(node)
    dumped = make_checkpoint(node, "ks", size=BIG)
    node.set_config(restore_timeout_s=60)
    before = node.snapshot()
    (node.bin / "criu-kill-second-child").touch()
    for i in range(3):
        (node.bin / "criu-killed").unlink(missing_ok=True)
        t = time.monotonic()
        msgs = cold_after_failed_restore(node, f"s{i}", "ks", dumped, "restore from ks failed",
                                         check=lambda: (node.bin / "criu-killed").exists())
        took = time.monotonic() - t
        rec = next(r for r in node.runtime_log() if r.get("container") == node.name(f"s{i}")
                   and r.get("msg", "").startswith("cold start:"))
        print(f"restore phase {rec['phases']['restore']:.2f}s, create to cold workload {took:.1f}s: {rec['msg'][:200]}")
        assert rec["phases"]["restore"] < 10, f"the restore waited for a dead CRIU (deadline 60s): {msgs}"
        assert not any("killed after" in m for m in msgs), msgs
        count("faults.restore")
        assert_clean(node, before, "after CRIU died while the restored root held the swrk socket")
        (node.store / ".quarantine" / "ks.json").unlink(missing_ok=True)


def test_restore_deadline_after_the_rootfs_bind_leaves_the_rootfs_intact(node):
    """The deadline hits while CRIU restores, after runc bind-mounted the rootfs at <root>/<id>/criu-root
    (runc's deferred unmount never runs in a SIGKILLed runc).  `runc delete --force` on that state dir
    would RemoveAll *through the bind* and empty the rootfs: the rootfs must come out byte for byte."""
    write_criu_wrapper(node)
    dumped = make_checkpoint(node, "kb", size=BIG)
    before = node.snapshot()
    node.set_config(restore_timeout_s=3)
    (node.bin / "criu-swrk-calls").write_text("")  # count this restore's calls: 1 version check, 2 restore
    (node.bin / "criu-sleep-swrk-nth").write_text("2 60")
    cold_after_failed_restore(node, "b0", "kb", dumped, "killed after 3s")
    count("faults.restore")
    assert_clean(node, before, "after the deadline killed a restore past runc's rootfs bind")


def test_create_of_an_id_that_runc_already_has_leaves_that_container_alone(node: RNode):
    """A second `create` for an id runc already runs (a client retry, a confused caller) must fail as runc's
    own create fails, and never clean up the running container's state or cgroup as if it were a failed
    restore of its own."""
    dumped = make_checkpoint(node, "twin")
    a = node.ctr("twin-a", {})  # a plain container holding the id
    first = start_ready(a)
    b = node.ctr("twin-b", ann("twin", "restore-only"))
    b.id = a.id  # same id, another bundle
    since = len(node.runtime_log())
    with pytest.raises(AssertionError, match="create failed"):
        b.create()
    assert a.ask()["random"] == first["random"], "the running container was disturbed"
    assert json.loads(a.runtime("state", a.id).stdout)["status"] == "running"
    msgs = node.log_msgs(since)
    assert any("already" in m and a.id in m for m in msgs), msgs
    assert dumped["random"] != first["random"]
    node.containers.remove(b)  # b never existed: cleanup must not delete a's state twice
