"""Faults during a dump (checkpoint on stop).

Every case expects: no `checkpoint.done` (or, where the dump legitimately
finished, a checkpoint that passes `warmstart verify`), no temp dir left (now,
or after `warmstart gc`), the container stopped as asked, and a log line that
says why; then nothing of the container is left after delete.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from reliability_lib import (RNode, ann, assert_clean, count, shim, start_ready, write_criu_wrapper)

pytestmark = [pytest.mark.reliability]
BIG = 256 << 20  # a buffer large enough that the dump takes a while (CRIU writes ~256 MiB of pages)


def stop_plain(c: shim.Container, wait_s: float = 15) -> tuple[subprocess.CompletedProcess, bool]:
    """`kill ID 15` as the shim sends it; True when the container stopped without the SIGKILL escalation."""
    p = c.runtime("kill", c.id, "15", check=False, timeout=600)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        st = c.state()
        if st is None or st.get("status") == "stopped":
            shim.reap()
            return p, True
        time.sleep(0.05)
    c.runtime("kill", "--all", c.id, "9", check=False)
    shim.reap()
    return p, False


def no_checkpoint(node: RNode, cid: str) -> None:
    assert not (node.store / cid).exists(), f"a checkpoint dir {cid} appeared: {list((node.store / cid).iterdir())}"
    tmp = node.store / ".tmp"
    assert not tmp.exists() or not list(tmp.iterdir()), f"temp dirs left: {list(tmp.iterdir())}"


def test_criu_sigkilled_mid_dump(node: RNode):
    write_criu_wrapper(node)
    before = node.snapshot()
    c = node.ctr("a", ann("k-dump"), size=BIG)
    start_ready(c)
    (node.bin / "criu-kill-glob").write_text(f"{node.store}/.tmp/*/pages-*.img")
    p, stopped = stop_plain(c)
    assert (node.bin / "criu-killed").exists(), "the fault was not injected (CRIU finished before the watcher)"
    count("faults.dump")
    assert p.returncode == 0, p.stderr
    assert stopped, "the container did not stop on SIGTERM after the failed dump (frozen?)"
    no_checkpoint(node, "k-dump")
    msgs = node.log_msgs()
    assert any(m.startswith("not checkpointed: runc checkpoint failed") for m in msgs), msgs
    c.delete()
    assert_clean(node, before, "after a dump whose CRIU was SIGKILLed")
    # the id is not poisoned: the next container starts cold and its stop checkpoints
    (node.bin / "criu-kill-glob").unlink()
    c2 = node.ctr("a2", ann("k-dump"))
    start_ready(c2)
    assert stop_plain(c2)[1]
    assert (node.store / "k-dump" / "checkpoint.done").is_file()
    c2.delete()


def test_runtime_sigkilled_mid_dump(node: RNode):
    before = node.snapshot()
    c = node.ctr("a", ann("rt-dump"), size=BIG)
    start_ready(c)
    argv = [shim.RUNTIME, "--root", str(c.root), "--log", str(c.bundle / "log.json"), "--log-format", "json",
            "kill", c.id, "15"]
    p = subprocess.Popen(argv, env={**os.environ, **node.env()})
    deadline = time.monotonic() + 60
    while not list((node.store / ".tmp").glob("*/pages-*.img")):
        assert time.monotonic() < deadline and p.poll() is None, "the dump never started writing pages"
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)  # the shim gave up on the runtime; its children (runc, CRIU) go on
    p.wait()
    count("faults.dump")
    # runc checkpoint (orphaned) finishes or fails on its own; then the shim escalates as it would
    deadline = time.monotonic() + 120
    while any(b"checkpoint" in Path(f"/proc/{q}/cmdline").read_bytes() for q in _children_of_none(c.id)):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    c.runtime("kill", "--all", c.id, "9", check=False)
    assert shim.wait_exit(c.pid()), "container still running after SIGKILL"
    assert not (node.store / "rt-dump" / "checkpoint.done").exists(), "a dump the runtime never published is complete"
    gc = node.warmstart("gc", "--min-age", "0")
    assert gc.returncode == 0, gc.stderr
    no_checkpoint(node, "rt-dump")
    c.delete()
    assert_clean(node, before, "after the runtime was SIGKILLed mid-dump")
    # the next container of the id starts cold and logs why
    c2 = node.ctr("b", ann("rt-dump"))
    start_ready(c2)
    assert any("no checkpoint rt-dump in the store yet" in m for m in node.log_msgs())
    c2.stop()
    c2.delete()


def _children_of_none(cid: str) -> list[int]:
    """runc checkpoint processes for this container id still running (orphans of the killed runtime)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"checkpoint" in cmd and cid.encode() in cmd:
                out.append(int(p.name))
    return out


@pytest.fixture
def small_store(node: RNode):
    """The store on a 24 MiB tmpfs."""
    node.store.mkdir(mode=0o700, parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(node.store)], check=True)
    node.mounts.append(node.store)
    yield node


def test_store_full_during_criu(small_store: RNode):
    node = small_store
    before = node.snapshot()
    c = node.ctr("a", ann("full"), size=64 << 20)
    start_ready(c)
    p, stopped = stop_plain(c)
    count("faults.dump")
    assert p.returncode == 0 and stopped
    no_checkpoint(node, "full")
    msgs = node.log_msgs()
    # CRIU fails on ENOSPC; copying its dump.log into the full store then fails too: either line names it
    assert any(m.startswith("not checkpointed:") and "No space left" in m and m.endswith("stopping as plain runc")
               for m in msgs), msgs
    c.delete()
    assert_clean(node, before, "after a dump into a full store")


def test_store_full_during_rootfs_diff(small_store: RNode):
    """CRIU's images fit, the rootfs diff does not: the container, frozen since before CRIU, is resumed and
    stops on the signal as under plain runc."""
    node = small_store
    before = node.snapshot()
    c = node.ctr("a", ann("full2"), size=1 << 20)
    start_ready(c)
    (c.bundle / "rootfs" / "data" / "big.bin").write_bytes(os.urandom(40 << 20))
    p, stopped = stop_plain(c)
    count("faults.dump")
    assert p.returncode == 0 and stopped
    no_checkpoint(node, "full2")
    msgs = node.log_msgs()
    assert any("not checkpointed: dump failed after phase" in m and "No space left" in m
               and m.endswith("stopping as plain runc") for m in msgs), msgs
    c.delete()
    assert_clean(node, before, "after a rootfs diff into a full store")


def test_store_read_only(node: RNode):
    node.store.mkdir(mode=0o700, parents=True)
    for d in (".tmp", ".locks", ".quarantine"):
        (node.store / d).mkdir(mode=0o700)
    subprocess.run(["mount", "--bind", str(node.store), str(node.store)], check=True)
    node.mounts.append(node.store)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(node.store)], check=True)
    before = node.snapshot()
    c = node.ctr("a", ann("ro"))
    start_ready(c)
    p, stopped = stop_plain(c)
    count("faults.dump")
    assert p.returncode == 0 and stopped
    assert not (node.store / "ro").exists()
    msgs = node.log_msgs()
    assert any("Read-only file system" in m for m in msgs), msgs
    c.delete()
    assert_clean(node, before, "after a dump into a read-only store")


@pytest.mark.parametrize("fake", ["missing", "old"])
def test_criu_missing_or_too_old(node: RNode, fake: str):
    if fake == "missing":
        node.set_config(criu=str(node.bin / "no-such-criu"))
    else:
        f = node.bin / "criu"
        f.write_text("#!/bin/sh\necho 'Version: 3.17'\n[ \"$1\" = --version ] && exit 0\n"
                     "echo 'criu 3.17: unsupported' >&2\nexit 1\n")
        f.chmod(0o755)
        node.set_config(criu=str(f))
    before = node.snapshot()
    c = node.ctr("a", ann("nocriu"))
    start_ready(c)
    p, stopped = stop_plain(c)
    count("faults.dump")
    assert p.returncode == 0 and stopped
    no_checkpoint(node, "nocriu")
    msgs = node.log_msgs()
    assert any(m.startswith("not checkpointed:") and ("CRIU" in m or "criu" in m) for m in msgs), msgs
    c.delete()
    assert_clean(node, before, f"after a dump with CRIU {fake}")


def test_container_exits_during_dump(node: RNode):
    """The workload is SIGKILLed while CRIU dumps it: no half checkpoint; a complete one must verify."""
    before = node.snapshot()
    c = node.ctr("a", ann("exits"), size=BIG)
    start_ready(c)
    pid = c.pid()
    argv = [shim.RUNTIME, "--root", str(c.root), "--log", str(c.bundle / "log.json"), "--log-format", "json",
            "kill", c.id, "15"]
    p = subprocess.Popen(argv, env={**os.environ, **node.env()}, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list((node.store / ".tmp").glob("*/pages-*.img")):
        assert time.monotonic() < deadline and p.poll() is None, "the dump never started writing pages"
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    count("faults.dump")
    _, err = p.communicate(timeout=300)
    assert shim.wait_exit(pid, 30), "the workload is still there"
    st = c.state()
    assert st is None or st["status"] == "stopped", st
    tmp = node.store / ".tmp"
    assert not tmp.exists() or not list(tmp.iterdir())
    msgs = node.log_msgs()
    if (node.store / "exits" / "checkpoint.done").exists():  # CRIU had the state before the kill landed
        v = node.warmstart("verify", "exits")
        assert v.returncode == 0, v.stderr
        assert any("checkpointed on stop" in m for m in msgs), msgs
    else:
        assert not (node.store / "exits").exists()
        assert any(m.startswith("not checkpointed:") for m in msgs), msgs
    c.delete()
    assert_clean(node, before, "after the container died mid-dump")
