"""What podman and containerd do around warmstart-runtime, played through the shim's argv.

Each case is one thing a real client did that broke a checkpoint or the user's container:
podman's `kill` without PATH, its cleanup's `delete --force` racing the dump, the exit
status a stopped container reports, and runc's own output in the container's stdio after a
failed restore.  tests/e2e/test_podman.py and test_ctr.py run the clients themselves.
"""
from __future__ import annotations

import os
import select
import shutil
import subprocess
import tarfile
import time

import pytest
from reliability_lib import TERM_WRAPPER, RNode, ann, make_checkpoint, shim, start_ready

pytestmark = [pytest.mark.reliability]


def test_kill_without_path_still_checkpoints(node: RNode):
    """podman runs `<runtime> kill` with only XDG_RUNTIME_DIR set: CRIU's network lock execs
    iptables-restore by name (Debian: /usr/sbin), so without a PATH every podman stop lost its dump."""
    c = node.ctr("nopath", ann("nopath"))
    ready = start_ready(c)
    c.ask()
    env = {"XDG_RUNTIME_DIR": "", **node.env()}  # exactly what podman 4.3 passes, plus our private config
    p = subprocess.run(c.argv("kill", c.id, "15"), env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert (node.store / "nopath" / "checkpoint.done").is_file(), node.log_msgs()
    c.stop()
    c.delete()
    b = node.ctr("nopath2", ann("nopath"))
    b.create()
    b.start()
    got = b.ask()
    assert (got["random"], got["counter"]) == (ready["random"], 2), "not restored from the PATH-less stop's checkpoint"


def test_delete_force_during_the_dump_waits_for_it(node: RNode):
    """podman's cleanup (conmon's exit command) runs `delete --force` while `kill` still captures and
    publishes, then unmounts the rootfs, and with --rm removes its upper dir: the delete must wait for the
    dump, and the checkpoint must hold the whole rootfs diff."""
    node.overlay = True
    c = node.ctr("held", ann("held"), size=64 << 20)
    start_ready(c)
    c.ask()
    big = os.urandom(96 << 20)  # a rootfs diff that takes a while to capture and hash
    (c.bundle / "rootfs" / "data" / "big.bin").write_bytes(big)
    kill = subprocess.Popen(c.argv("kill", c.id, "15"), env={**os.environ, **node.env()},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not list((node.store / ".tmp").glob("*/pages-*.img")):
        assert time.monotonic() < deadline and kill.poll() is None, "the dump never started writing pages"
        time.sleep(0.005)
    d = c.runtime("delete", "--force", c.id, check=False, timeout=300)
    deleted_at = time.time()
    # what podman's cleanup does once the runtime's delete returned (podman run --rm)
    subprocess.run(["umount", str(c.bundle / "rootfs")], check=True)
    shutil.rmtree(c.bundle / "upper")
    out, _ = kill.communicate(timeout=300)
    assert kill.returncode == 0, out
    assert d.returncode == 0, d.stderr
    msgs = node.log_msgs()
    assert not [m for m in msgs if "internal error" in m], msgs
    done = node.store / "held" / "checkpoint.done"
    assert done.is_file(), msgs
    assert done.stat().st_mtime <= deleted_at, "delete returned before the checkpoint was published"
    assert any(m.startswith("delete waited") for m in msgs), msgs
    assert node.warmstart("verify", "held").returncode == 0
    with tarfile.open(node.store / "held" / "rootfs-diff.tar") as tar:
        assert tar.extractfile("data/big.bin").read() == big


def _exit_status(pid: int, timeout: float = 30) -> int:
    """The container init's exit status as its parent sees it (this test is the subreaper, as the shim is)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    raise AssertionError(f"container init {pid} did not exit within {timeout}s")


def test_exit_status_after_a_dump_is_what_runc_reports(node: RNode):
    """A stop that checkpoints must look like a plain stop to the client: the workload's TERM handler
    exits 3 under plain runc, and must exit 3 after the dump too (CRIU's kill made it 137)."""
    args = ["python3", "-c", TERM_WRAPPER.replace("sys.exit(0)", "sys.exit(3)"), str(8 << 20), node.tag]
    plain, dumped = node.ctr("plain", {}, args=args), node.ctr("dumped", ann("status"), args=args)
    statuses = []
    for c in (plain, dumped):
        start_ready(c)
        c.ask()
        pid = c.pid()
        assert c.runtime("kill", c.id, "15", check=False, timeout=300).returncode == 0
        statuses.append(_exit_status(pid))
        c.delete()
    assert (node.store / "status" / "checkpoint.done").is_file(), node.log_msgs()
    assert statuses == [3, 3], f"plain runc: {statuses[0]}, after the dump: {statuses[1]}"


def _drain(fd: int, timeout: float = 30) -> bytes:
    """Everything left in a pipe until its writers are gone (EOF)."""
    out, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline and select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            return out
        out += chunk
    raise AssertionError(f"the pipe stayed open for {timeout}s; read so far: {out!r}")


def test_failed_restore_leaves_runc_out_of_the_container_stdio(node: RNode):
    """runc hands its own fds 0-2 to the restored process and prints its own errors on that stderr: a failed
    restore wrote `criu failed: type NOTIFY errno 0` into the new container's stderr.  The container's
    stdio must carry only what the container writes; runc's and CRIU's words go to warmstart's logs."""
    dumped = make_checkpoint(node, "noisy")
    pagemap = next((node.store / "noisy").glob("pagemap-*.img"))
    pagemap.write_bytes(pagemap.read_bytes()[:12])  # CRIU fails on it at once (a truncated pages image hangs)
    shim.reseal(node, "noisy")
    c = node.ctr("cold", ann("noisy"))
    ready = start_ready(c)
    assert ready["event"] == "ready" and ready["random"] != dumped["random"], "not a cold start"
    reason = next((m for m in node.log_msgs() if "restore from noisy failed" in m), None)
    assert reason and "pagemap" in reason, node.log_msgs()
    c.stop()  # plain stop: the checkpoint exists, nothing is dumped
    assert _drain(c.proc_stdout) == b"" and c.buf == b""
    err = _drain(c.stderr_r)
    assert err == b"", f"runc/CRIU wrote into the container's stderr: {err!r}"
    kept = node.base / "logs" / f"runc-restore-{c.id}.log"
    assert "criu failed" in kept.read_text(), "runc's own error is not in warmstart's logs"
    assert "criu failed" not in c.log_text(), "runc's restore log went to the caller's --log"
