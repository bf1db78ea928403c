"""Mounts that differ between the dumped and the restoring container (issue 4, item 3).

An OCI createContainer hook of our own (fixtures/fake_ctk_hook.sh) does to the
container's mount namespace exactly what the NVIDIA container toolkit's hooks
do: a tmpfs at a fresh random `/run/nvidia-ctk-hook<uuid>` path (or the other
two path formats) with files in it, and a bind of one of them over a /proc
file.  The container is checkpointed on stop through `warmstart-runtime` as the
runc-v2 shim calls it, then restored into a new container whose hook made a
*different* path; a volume's host source changes too.  No GPU needed.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import shim  # noqa: E402
from shim import subreaper  # noqa: E402, F401 - autouse: this module plays the shim

CRIU = shim.CRIU
HOOK = Path(__file__).parent / "fixtures" / "fake_ctk_hook.sh"
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc, CRIU)"),
    pytest.mark.skipif(not CRIU.exists() or not shutil.which("runc"), reason="needs runc and CRIU >= 4.1 (install.sh)"),
    pytest.mark.skipif(not Path(shim.RUNTIME).exists(), reason=f"{shim.RUNTIME} not installed (install.sh)"),
]

# Reports what the process sees: the hook's tmpfs files, the /proc file the hook
# bound over, a volume, and /dev/shm (written at start: CRIU carries tmpfs content).
WORKLOAD = r'''
import glob, json, os, random, sys
rnd = random.SystemRandom().getrandbits(64)
with open("/dev/shm/state", "w") as f:
    f.write(f"shm-{rnd}")
print(json.dumps({"event": "ready", "random": rnd}), flush=True)
for line in sys.stdin:
    hook = {}
    for d in sorted(glob.glob("/run/nvidia-ctk-hook*")) + sorted(glob.glob("/run/nvidia-ctk-hook/*")):
        if os.path.isfile(os.path.join(d, "uuid")):
            hook[d] = open(os.path.join(d, "uuid")).read().strip()
    out = {"random": rnd, "hook": hook, "proc": open("/proc/version").read(),
           "vol": open("/vol/who").read() if os.path.exists("/vol/who") else None,
           "shm": open("/dev/shm/state").read()}
    print(json.dumps(out), flush=True)
'''


@pytest.fixture
def dnode(tmp_path_factory):
    n = shim.Node(tmp_path_factory.mktemp("mnode"))
    yield n
    n.cleanup()


def make(node: shim.Node, name: str, cid: str, fmt: str = "suffix", vol: str | None = "A",
         hook: bool = True) -> shim.Container:
    c = node.container(name, {"warmstart.dev/checkpoint": "on-stop", "warmstart.dev/id": cid},
                       args=["python3", "/mworkload.py"])
    (c.bundle / "rootfs" / "mworkload.py").write_text(WORKLOAD)
    shim.pin_mtimes(c.bundle / "rootfs")  # the same image for each container of this test
    cfg = json.loads((c.bundle / "config.json").read_text())
    if hook:
        cfg["hooks"] = {"createContainer": [{"path": str(HOOK), "args": [
            HOOK.name, str(c.bundle / "rootfs"), fmt, "/proc/version"], "timeout": 10}]}
    if vol:
        src = node.base / f"vol-{name}"
        src.mkdir()
        (src / "who").write_text(f"volume-{vol}")
        (c.bundle / "rootfs" / "vol").mkdir()
        cfg["mounts"].append({"destination": "/vol", "type": "bind", "source": str(src), "options": ["rbind", "rw"]})
    (c.bundle / "config.json").write_text(json.dumps(cfg))
    return c


def first(node: shim.Node, cid: str, fmt: str) -> tuple[shim.Container, dict]:
    a = make(node, "m1", cid, fmt)
    a.create()
    a.start()
    ready = a.readline()
    got = a.ask()
    assert len(got["hook"]) == 1 and got["proc"] == "ModifyDeviceFiles: 0\n", got
    assert got["vol"] == "volume-A"
    p = a.stop()
    assert p.returncode == 0, p.stderr
    a.delete()
    assert (node.store / cid / "checkpoint.done").is_file(), node.runtime_log()[-3:]
    return a, {**got, "random": ready["random"]}


@pytest.mark.parametrize("fmt", ["suffix", "subdir", "fixed"])
def test_ctk_hook_tmpfs_and_changed_volume_are_restored(dnode, fmt):
    _, before = first(dnode, f"mr-{fmt}", fmt)
    b = make(dnode, "m2", f"mr-{fmt}", fmt, vol="B")
    b.create()
    b.start()
    got = b.ask()
    assert got["random"] == before["random"], f"not restored: {b.log_text()}"
    assert got["hook"] == before["hook"], "the hook's tmpfs came back at its old path with its files"
    assert got["proc"] == "ModifyDeviceFiles: 0\n", "the bind over the /proc file came back"
    assert got["vol"] == "volume-B", "runc maps a bind mount by destination: the new host source is seen"
    assert got["shm"] == f"shm-{before['random']}", "/dev/shm content came back"
    msgs = [r.get("msg", "") for r in dnode.runtime_log()]
    assert any("restored from" in m for m in msgs), msgs[-3:]
    if fmt != "fixed":
        assert any("nvidia-ctk-hook" in m and "mountpoint" in m for m in msgs), msgs[-5:]


def test_missing_volume_means_cold_start_with_reason(dnode):
    _, before = first(dnode, "mr-missing", "suffix")
    b = make(dnode, "m3", "mr-missing", "suffix", vol=None)
    (b.bundle / "rootfs" / "vol").mkdir()  # the same image: only the spec lacks the volume
    b.create()
    b.start()
    ready = b.readline()
    assert ready["event"] == "ready" and ready["random"] != before["random"], "started cold"
    msgs = [r["msg"] for r in b.log_records() if "cold start" in r.get("msg", "")]
    assert any("/vol" in m and "missing" in m for m in msgs), msgs


def _strip_hook_dirs_from_diff(node: shim.Node, cid: str) -> None:
    """The checkpoint's rootfs diff without the hook's (empty) mountpoint dir, resealed.

    That is the situation this test reproduces (a rootfs that does not carry
    the old path: a diff from elsewhere, a restore-only image): CRIU failed with
    `Can't stat mountpoint …/run/nvidia-ctk-hook<old-uuid>` until it existed.
    """
    import tarfile

    path = node.store / cid
    src, dst = path / "rootfs-diff.tar", path / "rootfs-diff.tar.new"
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tout:
        for m in tin.getmembers():
            if not m.name.startswith("run/nvidia-ctk-hook"):
                tout.addfile(m, tin.extractfile(m) if m.isfile() else None)
    dst.replace(src)
    shim.reseal(node, cid)


def test_hook_mountpoint_recreated_when_the_rootfs_lacks_it(dnode):
    _, before = first(dnode, "mr-nodiff", "suffix")
    _strip_hook_dirs_from_diff(dnode, "mr-nodiff")
    b = make(dnode, "m4", "mr-nodiff", "suffix", vol="B")
    b.create()
    b.start()
    got = b.ask()
    assert got["random"] == before["random"], f"not restored: {[r['msg'] for r in dnode.runtime_log()][-4:]}"
    assert got["hook"] == before["hook"] and got["proc"] == "ModifyDeviceFiles: 0\n"
    old = next(iter(before["hook"]))
    created = [r for r in dnode.runtime_log() if r.get("msg", "").startswith("mounts:") and old in r.get("created", "")]
    assert created, "the old mountpoint was recreated by warmstart, not by the diff"
