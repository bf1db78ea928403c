"""What a container writes can never redirect what root does (issue 11, item 6), end to end.

- DYN_RESTORE_MARKER_FILE naming a block device or a FIFO: the marker is refused, the device's bytes
  are unchanged, `create` returns in seconds and the container is still restored.
- on-ready: the rootfs diff is captured while the worker runs; a container that swaps a directory for
  a symlink to a host directory mid-capture gets that dump refused, never the host file in its diff.
- A restore that deletes a large file sets it aside by a rename and drops it once restored: the state
  dir (tmpfs on most nodes) does not grow by the file's size per replica.
"""
from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest
import shim
from reliability_lib import RNode, ann, count, make_checkpoint, start_ready

pytestmark = [pytest.mark.reliability]
CREATE_LIMIT_S = 20  # the marker write is bounded by 5 s; create must be well within the shim's patience


def with_env(c: shim.Container, **env: str) -> None:
    cfg = json.loads((c.bundle / "config.json").read_text())
    cfg["process"]["env"] += [f"{k}={v}" for k, v in env.items()]
    (c.bundle / "config.json").write_text(json.dumps(cfg))


def create_within(c: shim.Container, limit: float, unblock=None) -> float:
    """c.create(), failing if it takes longer than limit; unblock() releases a hung create for cleanup."""
    done: list[BaseException | None] = []

    def run() -> None:
        try:
            c.create()
            done.append(None)
        except BaseException as e:  # noqa: BLE001
            done.append(e)
    t0 = time.monotonic()
    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(limit)
    took = time.monotonic() - t0
    if th.is_alive():
        if unblock is not None:
            unblock()
        th.join(60)
        raise AssertionError(f"create did not return within {limit}s (hung on the marker write)")
    if done and done[0] is not None:
        raise done[0]
    return took


def restored(node: RNode, c: shim.Container, dumped: dict, since: int) -> None:
    c.start()
    got = c.ask()
    assert got["random"] == dumped["random"], f"not restored: {node.log_msgs(since)}"


@pytest.fixture
def loopdev(tmp_path):
    """A loop device over a 1 MiB file of random bytes in the test's tmp dir: (device, backing file, bytes)."""
    img = tmp_path / "disk.img"
    data = os.urandom(1 << 20)
    img.write_bytes(data)
    p = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"no loop device: {p.stderr.strip()}")
    dev = Path(p.stdout.strip())
    yield dev, img, data
    subprocess.run(["losetup", "-d", str(dev)], capture_output=True)


def test_restore_marker_naming_a_block_device_is_refused(node: RNode, loopdev):
    dev, img, data = loopdev

    def plant(c: shim.Container) -> None:
        # a block device node in the image, for a device the container's device cgroup does not let it open
        os.mknod(c.bundle / "rootfs" / "data" / "disk", stat.S_IFBLK | 0o600, os.stat(dev).st_rdev)
    dumped = make_checkpoint(node, "blk", prepare=plant)
    c = node.ctr("blk1", ann("blk"))
    plant(c)
    with_env(c, DYN_RESTORE_MARKER_FILE="/data/disk")
    since = len(node.runtime_log())
    create_within(c, CREATE_LIMIT_S)
    restored(node, c, dumped, since)
    count("security.container_writes")
    subprocess.run(["blockdev", "--flushbufs", str(dev)], capture_output=True)
    assert img.read_bytes() == data, "the restore marker was written onto the block device"


def test_restore_marker_naming_a_fifo_never_blocks_create(node: RNode):
    dumped = make_checkpoint(node, "fifo", prepare=lambda c: os.mkfifo(c.bundle / "rootfs" / "data" / "marker"))
    c = node.ctr("fifo1", ann("fifo"))
    fifo = c.bundle / "rootfs" / "data" / "marker"
    os.mkfifo(fifo)  # the same image
    with_env(c, DYN_RESTORE_MARKER_FILE="/data/marker")
    since = len(node.runtime_log())
    readers: list[int] = []
    took = create_within(c, CREATE_LIMIT_S,
                         unblock=lambda: readers.append(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)))
    for fd in readers:
        os.close(fd)
    count("security.container_writes")
    assert took < 10, f"create took {took:.1f}s"
    restored(node, c, dumped, since)


def test_restore_marker_regular_file_still_written(node: RNode):
    """The control: a plain path (parents created) gets the seed's marker JSON."""
    dumped = make_checkpoint(node, "plain")
    c = node.ctr("plain1", ann("plain"))
    with_env(c, DYN_RESTORE_MARKER_FILE="/data/seed/restored.json")
    since = len(node.runtime_log())
    create_within(c, CREATE_LIMIT_S)
    restored(node, c, dumped, since)
    body = json.loads((c.bundle / "rootfs" / "data" / "seed" / "restored.json").read_text())
    assert body["success"] is True and body["checkpoint_id"] == "plain"


# The on-ready workload: a big file read first by the capture (its atime moves: relatime updates an
# atime older than the mtime), then, as soon as that read starts, /data/d becomes a symlink to a host
# directory, so that the capture, by then past its listing of /data/d, would read through it.
RACER = r'''
import json, os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
host_dir, size_mb = sys.argv[1], int(sys.argv[2])
os.makedirs("/data/d")
with open("/data/d/secret", "w") as f:
    f.write("the container's own file\n")
with open("/data/a.bin", "wb") as f:
    for _ in range(size_mb):
        f.write(b"\0" * (1 << 20))
os.utime("/data/a.bin", (0, time.time()))
seen = os.stat("/data/a.bin").st_atime_ns
open("/tmp/checkpoint-ready", "w").close()
print(json.dumps({"event": "ready"}), flush=True)
while os.stat("/data/a.bin").st_atime_ns == seen:
    time.sleep(0.0005)
os.rename("/data/d", "/data/d.real")
os.symlink(host_dir, "/data/d")
print(json.dumps({"event": "swapped"}), flush=True)
while True:
    time.sleep(1)
'''


def _wait_log(node: RNode, since: int, prefixes: tuple[str, ...], timeout: float) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for m in node.log_msgs(since):
            if m.startswith(prefixes):
                return m
        time.sleep(0.2)
    raise AssertionError(f"no {prefixes} in the runtime log within {timeout}s: {node.log_msgs(since)}")


@pytest.mark.parametrize("overlay", [False, True], ids=["plain", "overlay"])
def test_on_ready_capture_racing_a_symlink_swap_never_reads_the_host(node: RNode, tmp_path, overlay):
    node.overlay = overlay
    host = tmp_path / "host-secrets"
    host.mkdir()
    token = f"host-secret-{secrets.token_hex(8)}"
    (host / "secret").write_text(token + "\n")
    cid = f"race-{'ov' if overlay else 'pl'}"
    c = node.ctr("race", ann(cid, "on-ready"), args=["python3", "-c", RACER, str(host), "128"])
    since = len(node.runtime_log())
    c.create()
    c.start()
    assert c.readline(timeout=60)["event"] == "ready"
    assert c.readline(timeout=120)["event"] == "swapped", "the capture never read /data/a.bin"
    outcome = _wait_log(node, since, ("on-ready: checkpointed", "on-ready: not checkpointed"), 120)
    count("security.container_writes")
    leaked = [str(p) for p in node.store.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    assert not leaked, f"the host file was captured into {leaked}"
    tar = node.store / cid / "rootfs-diff.tar"
    if tar.exists():
        with tarfile.open(tar) as t:
            assert all(token.encode() not in t.extractfile(m).read() for m in t.getmembers() if m.isreg())
    # the swap happened after /data/d was listed and before it was read: a race, so no checkpoint
    assert not (node.store / cid / "checkpoint.done").exists(), outcome
    assert "not checkpointed" in outcome and "data/d" in outcome, outcome
    c.stop()
    c.delete()


def _state_bytes(node: RNode) -> int:
    total = 0
    for dirpath, _, files in os.walk(node.base / "state"):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def test_restores_deleting_a_large_file_keep_no_copy(node: RNode):
    big = 64 << 20
    with open(node.template / "data" / "big.bin", "wb") as f:
        for _ in range(big >> 20):
            f.write(os.urandom(1 << 20))
    c = node.ctr("bigdump", ann("big"))
    ready = start_ready(c)
    (c.bundle / "rootfs" / "data" / "big.bin").unlink()  # what the worker would do: delete an image file
    c.ask()
    assert c.stop().returncode == 0
    c.delete()
    assert "data/big.bin" in (node.store / "big" / "deleted.files").read_text().splitlines()
    base = _state_bytes(node)
    replicas = []
    for i in range(3):
        r = node.ctr(f"big{i}", ann("big"))
        since = len(node.runtime_log())
        r.create()
        restored(node, r, {"random": ready["random"]}, since)
        replicas.append(r)
        count("security.container_writes")
        grown = _state_bytes(node) - base
        assert grown < big // 4, f"state dir grew by {grown >> 20} MiB after {i + 1} restore(s)"
        assert not (r.bundle / "rootfs" / "data" / "big.bin").exists()
        left = [p.name for d in (r.bundle, r.bundle / "rootfs") for p in d.iterdir() if "journal" in p.name]
        assert not left, f"the restore's journal outlived the restore: {left}"
    assert not list((node.base / "state").rglob("rootfs-backup")), "a backup copy in the state dir"
    for r in replicas:
        r.stop()
        r.delete()
