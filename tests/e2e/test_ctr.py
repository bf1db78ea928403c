"""containerd's `ctr` as a client of warmstart-runtime: `ctr run --runc-binary warmstart-runtime`.

ctr drives the runc-v2 shim directly (no CRI, no kubelet): `ctr run` in the foreground streams the
container's stdout and exits with its status, `ctr task kill` is the stop.  The containerd is the
session's private one (tests/e2e/conftest.py), which hands WARMSTART_CONFIG to its shims.
"""
from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import shim  # noqa: E402
from clients import (BLOB_SHA, COMMAND, ONE_SHOT, RUNC, NodeFiles, annotations, marks, ticks,  # noqa: E402
                     unique, wait_ticks)

from warmstart.testing.cri.containerd import K8S_NAMESPACE, Containerd  # noqa: E402

pytestmark = marks("ctr")  # the session's containerd fixture skips, saying why, without containerd


class Run:
    """One foreground `ctr run --rm`: its stdout as it comes, its exit status at the end."""

    def __init__(self, p: subprocess.Popen) -> None:
        self.p = p
        self.out = b""

    def text(self) -> str:
        """stdout so far, whole lines only."""
        assert self.p.stdout is not None
        fd = self.p.stdout.fileno()
        while select.select([fd], [], [], 0)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self.out += chunk
        return self.out[:self.out.rfind(b"\n") + 1].decode(errors="replace")

    def wait(self, timeout: float = 60) -> tuple[int, str, str]:
        """Exit status, all of stdout, all of stderr."""
        out, err = self.p.communicate(timeout=timeout)
        return self.p.returncode, (self.out + out).decode(errors="replace"), err.decode(errors="replace")


class Ctr:
    def __init__(self, containerd: Containerd, image: str) -> None:
        self.containerd, self.image = containerd, image
        self.names: list[str] = []

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.containerd.ctr(*args, check=check, timeout=300)

    def run(self, name: str, runtime: str, ann: dict[str, str] | None = None, env: dict[str, str] | None = None,
            command: list[str] = COMMAND) -> Run:
        opts = [x for k, v in (ann or {}).items() for x in ("--annotation", f"{k}={v}")]
        opts += [x for k, v in (env or {}).items() for x in ("--env", f"{k}={v}")]
        self.names.append(name)
        argv = ["ctr", "-a", str(self.containerd.address), "-n", K8S_NAMESPACE, "run", "--rm",
                "--runc-binary", runtime, "--runc-root", str(self.containerd.warmstart_root),
                "--cgroup", f"{self.containerd.cgroup_parent}/{name}", *opts, self.image, name, *command]
        return Run(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE))

    def stop(self, name: str) -> None:
        self("task", "kill", name)  # SIGTERM: the shim's `kill ID 15`


@pytest.fixture
def ctr(containerd: Containerd, worker_image: str):
    c = Ctr(containerd, worker_image)
    yield c
    for name in c.names:  # what a failed test left (`run --rm` removes the rest)
        c("task", "delete", "--force", name, check=False)
        c("container", "rm", name, check=False)


def test_stop_checkpoints_and_a_new_container_restores(ctr: Ctr, warmstart_config: Path) -> None:
    """`ctr task kill` of an on-stop container checkpoints it (memory and a 32 MiB rootfs diff); the next
    `ctr run` with the same id restores; both runs' stdout carry only the workload's lines."""
    node, cid, a, b = NodeFiles(warmstart_config), unique("ct"), unique("ct-a"), unique("ct-b")
    first = ctr.run(a, shim.RUNTIME, ann=annotations(cid), env={"BLOB_MB": "32"})
    before = wait_ticks(first.text)[-1]
    ctr.stop(a)
    code, out, err = first.wait()
    assert (code, err) == (0, ""), (code, err)  # its TERM handler's exit
    ticks(out)
    assert (node.checkpoint(cid) / "checkpoint.done").is_file(), node.log_msgs(a)
    second = ctr.run(b, shim.RUNTIME, ann=annotations(cid))
    after = wait_ticks(second.text)
    assert after[0]["random"] == before["random"] and after[0]["counter"] > before["counter"], (before, after[0])
    blob = ctr("task", "exec", "--exec-id", "blob", b, *BLOB_SHA).stdout.strip()
    assert blob == before["blob"], "the rootfs diff did not come back"
    assert any(m.startswith(f"restored from {cid}") for m in node.log_msgs(b)), node.log_msgs(b)
    ctr.stop(b)
    code, out, err = second.wait()
    assert (code, err) == (0, ""), (code, err)
    ticks(out)


def test_plain_containers_behave_as_under_runc(ctr: Ctr) -> None:
    """A run's status, stdout and stderr, and the status a stop leaves, are runc's; so is an on-stop
    container's after its checkpoint (its TERM handler's 3, not CRIU's 137)."""
    for rt in (RUNC, shim.RUNTIME):
        assert ctr.run(unique("one"), rt, command=ONE_SHOT).wait() == (7, "out\n", "err\n"), rt
    stopped = {}
    for label, rt, ann in (("runc", RUNC, None), ("warmstart", shim.RUNTIME, None),
                           ("warmstart on-stop", shim.RUNTIME, annotations(unique("ct-exit")))):
        name = unique("stop")
        r = ctr.run(name, rt, ann=ann, env={"TERM_EXIT": "3"})
        wait_ticks(r.text, 1)
        ctr.stop(name)
        code, out, err = r.wait()
        ticks(out)
        stopped[label] = (code, err)
    assert set(stopped.values()) == {(3, "")}, stopped
