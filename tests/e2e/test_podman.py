"""podman 4.3 as a client of warmstart-runtime: `podman --runtime warmstart-runtime run/stop/...`.

podman calls the runtime in its own ways (conmon runs create; `kill` comes with no PATH; its
cleanup runs `delete --force` as soon as the task exits; `container checkpoint/restore` runs runc's
own), and each of those once cost the checkpoint or the user's log stream.  Storage, runc state and
the warmstart node are private to the test; the image is the reference worker's, built locally.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import shim  # noqa: E402
from clients import (BLOB_SHA, COMMAND, ONE_SHOT, RUNC, NodeFiles, annotations, marks, ticks,  # noqa: E402
                     unique, wait_ticks)

from warmstart.testing.cri import images  # noqa: E402

pytestmark = marks("podman")
# No network set-up (CNI, iptables) on a shared node, but a network namespace of its own: CRIU's network
# lock runs in it.  This VM lacks CAP_SYS_RESOURCE for podman's default rlimits.
RUN = ["--network", "none", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]


class Podman:
    """podman with private storage, calling warmstart-runtime through a wrapper that only adds WARMSTART_CONFIG:
    podman's own environment (no PATH on `kill`) reaches the runtime as it is.  runc's state stays in its
    default root: podman 4.3 drops `--runtime-flag` from the cleanup it runs after `container restore`."""

    def __init__(self, base: Path, config: Path) -> None:
        self.base = base
        self.wrapper = base / "warmstart-runtime"
        self.wrapper.write_text(f'#!/bin/sh\nWARMSTART_CONFIG={config} exec {shim.RUNTIME} "$@"\n')
        self.wrapper.chmod(0o755)
        self.flags = ["--root", str(base / "root"), "--runroot", str(base / "runroot"), "--tmpdir", str(base / "tmp"),
                      "--cgroup-manager", "cgroupfs", "--events-backend", "file"]
        self.image = ""

    def __call__(self, *args: str, runtime: str | None = None, check: bool = True,
                 timeout: float = 120) -> subprocess.CompletedProcess:
        p = subprocess.run(["podman", *self.flags, "--runtime", runtime or str(self.wrapper), *args],
                           capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"podman {' '.join(args[:2])} failed ({p.returncode}): {p.stderr}")
        return p

    def run(self, name: str, *extra: str, ann: dict[str, str] | None = None, env: dict[str, str] | None = None,
            command: list[str] = COMMAND, runtime: str | None = None, detach: bool = True,
            check: bool = True) -> subprocess.CompletedProcess:
        opts = [x for k, v in (ann or {}).items() for x in ("--annotation", f"{k}={v}")]
        opts += [x for k, v in (env or {}).items() for x in ("--env", f"{k}={v}")]
        return self("run", *(["-d"] if detach else []), "--name", name, *RUN, *opts, *extra,
                    "--entrypoint", command[0], self.image, *command[1:], runtime=runtime, check=check)

    def logs(self, name: str) -> str:
        p = self("logs", name)
        return p.stdout + p.stderr

    def exit_code(self, name: str) -> int:
        return int(self("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip())

    def cleanup(self) -> None:
        self("rm", "--all", "--force", "--time", "0", check=False)
        self("image", "rm", "--all", "--force", check=False)  # not `system reset`: it drops the host's networks
        for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
            mp = line.split()[4]
            if mp.startswith(str(self.base)):
                subprocess.run(["umount", "-l", mp], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory, warmstart_config: Path) -> Iterator[Podman]:
    try:
        tar, ref = images.build_worker_image()
    except (images.ImageBuildError, OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot build the worker image here: {e}")
    pm = Podman(tmp_path_factory.mktemp("podman"), warmstart_config)
    try:
        pm("load", "--input", str(tar), timeout=300)
        pm.image = ref
        yield pm
    finally:
        pm.cleanup()


@pytest.fixture(autouse=True)
def _reap() -> Iterator[None]:
    yield
    shim.reap()  # once another module made this process a subreaper, conmon's orphans exit here


def test_stop_checkpoints_and_a_new_container_restores(podman: Podman, warmstart_config: Path) -> None:
    """`podman run --rm` + `podman stop` checkpoints (PATH-less kill; cleanup's delete and --rm racing the
    dump); a new `podman run` with the same id restores memory and rootfs; nothing of runc's in its logs."""
    node, cid, a, b = NodeFiles(warmstart_config), unique("pm"), unique("pm-a"), unique("pm-b")
    since = len(node.log_msgs())  # the node's log is the session's: earlier tests' lines are not this test's
    podman.run(a, "--rm", ann=annotations(cid), env={"BLOB_MB": "64"})
    before = wait_ticks(lambda: podman.logs(a))[-1]
    stop = podman("stop", a)
    assert stop.stderr == "", stop.stderr  # was: "container does not exist" (kill exited 1)
    assert (node.checkpoint(cid) / "checkpoint.done").is_file(), node.log_msgs()
    mine = node.log_msgs()[since:]
    assert not [m for m in mine if "internal error" in m or "not checkpointed" in m], mine
    podman.run(b, ann=annotations(cid))
    after = wait_ticks(lambda: podman.logs(b))
    assert after[0]["random"] == before["random"] and after[0]["counter"] > before["counter"], (before, after[0])
    assert podman("exec", b, *BLOB_SHA).stdout.strip() == before["blob"], "the rootfs diff did not come back"
    assert any(m.startswith(f"restored from {cid}") for m in node.log_msgs()), node.log_msgs()
    podman("stop", b)
    ticks(podman.logs(b))  # only the workload's lines, before and after its restore
    podman("rm", b)


def test_plain_containers_behave_as_under_runc(podman: Podman) -> None:
    """Exit status, stdout and stderr of a run, and the status a stop leaves, are runc's; an on-stop
    container's stop reports the workload's own status too (its TERM handler's 3, not CRIU's 137)."""
    runs = {rt: podman.run(unique("one"), "--rm", command=ONE_SHOT, runtime=rt, detach=False, check=False)
            for rt in (RUNC, None)}
    assert [(p.returncode, p.stdout, p.stderr) for p in runs.values()] == [(7, "out\n", "err\n")] * 2
    stopped = {}
    for label, rt, ann in (("runc", RUNC, None), ("warmstart", None, None),
                           ("warmstart on-stop", None, annotations(unique("pm-exit")))):
        name = unique("stop")
        podman.run(name, ann=ann, env={"TERM_EXIT": "3"}, runtime=rt)
        wait_ticks(lambda: podman.logs(name), 1)
        stop = podman("stop", name, runtime=rt)
        stopped[label] = (stop.returncode, stop.stderr, podman.exit_code(name))
        podman("rm", name, runtime=rt)
    assert set(stopped.values()) == {(0, "", 3)}, stopped


def test_podman_checkpoint_restore_and_restart_keep_warmstart_in_the_loop(podman: Podman,
                                                                          warmstart_config: Path) -> None:
    """podman's own `container checkpoint`/`restore` passes through; warmstart's state for the container is made
    again (logged), so the next stop still checkpoints.  `podman restart` of an on-stop container then restores
    that checkpoint (README: a restart resumes from the id's checkpoint; it does not start fresh)."""
    node, cid, a = NodeFiles(warmstart_config), unique("pm-own"), unique("pm-own")
    since = len(node.log_msgs())  # this test's lines only: the node's log is the session's
    podman.run(a, ann=annotations(cid))
    wait_ticks(lambda: podman.logs(a))
    podman("container", "checkpoint", a)
    podman("container", "restore", a)
    assert any(m.startswith("restored by the client") for m in node.log_msgs()[since:]), node.log_msgs()[since:]
    dumped = wait_ticks(lambda: podman.logs(a))[-1]
    podman("stop", a)
    assert (node.checkpoint(cid) / "checkpoint.done").is_file(), node.log_msgs()
    n_lines = len(ticks(podman.logs(a)))
    podman("start", a)
    resumed = wait_ticks(lambda: podman.logs(a), n_lines + 1)[n_lines]
    assert resumed["random"] == dumped["random"] and resumed["counter"] > dumped["counter"], (dumped, resumed)
    assert any(m.startswith(f"restored from {cid}") for m in node.log_msgs()), node.log_msgs()
    # podman's own checkpoint of a container warmstart restored: runc must know its real stdio
    podman("container", "checkpoint", a)
    podman("container", "restore", a)
    n_lines = len(ticks(podman.logs(a)))
    later = wait_ticks(lambda: podman.logs(a), n_lines + 1)[n_lines]
    assert later["random"] == dumped["random"] and later["counter"] > resumed["counter"], (resumed, later)
    podman("rm", "--force", "--time", "0", a)
