"""mounts.py: the decision from CRIU mount entries (as pycriu decodes mountpoints-*.img) and the mkdirs."""
from __future__ import annotations

import pytest

from warmstart import mounts, rootfs

ROOT = {"mnt_id": 118, "parent_mnt_id": 62, "fstype": 0, "root": "/rootfs", "mountpoint": "/"}
PROC = {"mnt_id": 119, "parent_mnt_id": 118, "fstype": 1, "root": "/", "mountpoint": "/proc"}
VOL = {"mnt_id": 126, "parent_mnt_id": 118, "fstype": 0, "root": "/host/a", "mountpoint": "/vol", "ext_key": "/vol"}
MASK = {"mnt_id": 65, "parent_mnt_id": 119, "fstype": 5, "root": "/null", "mountpoint": "/proc/kcore",
        "ext_key": "/dev/null"}
SPEC = {"mounts": [{"destination": "/proc", "type": "proc"}, {"destination": "/vol", "type": "bind", "source": "/b"}]}


def hook(mp, mid=127):
    return {"mnt_id": mid, "parent_mnt_id": 118, "fstype": 5, "root": "/", "mountpoint": mp, "source": "tmpfs"}


@pytest.mark.parametrize("mp", ["/run/nvidia-ctk-hook", "/var/run/nvidia-ctk-hook",
                                "/run/nvidia-ctk-hook0b7c9a4e-54d1-4bb5-9d05-4d4c7c7c9f1e",
                                "/run/nvidia-ctk-hook/0b7c9a4e-54d1-4bb5-9d05-4d4c7c7c9f1e"])
def test_ctk_hook_formats(mp):
    assert mounts.is_ctk_hook(mp)
    p = mounts.plan_entries([ROOT, PROC, hook(mp)], SPEC)
    assert p.reason is None and p.mkdirs == [mp] and "NVIDIA toolkit hook tmpfs" in p.notes[0]


def test_not_ctk_hook():
    assert not mounts.is_ctk_hook("/run/other")
    assert not mounts.is_ctk_hook("/run/nvidia-ctk-hook/a/b")


def test_spec_binds_and_masks_pass_and_changed_sources_are_runcs_job():
    assert mounts.plan_entries([ROOT, PROC, VOL, MASK], SPEC).reason is None


def test_missing_volume_is_refused():
    p = mounts.plan_entries([ROOT, PROC, VOL], {"mounts": [{"destination": "/proc"}]})
    assert p.reason and "/vol" in p.reason and "missing" in p.reason


def test_params_bind_needs_the_driver(tmp_path):
    params = {"mnt_id": 128, "parent_mnt_id": 119, "fstype": 5, "root": "/params",
              "mountpoint": "/proc/driver/nvidia/params"}
    p = mounts.plan_entries([ROOT, PROC, hook("/run/nvidia-ctk-hookX"), params], SPEC, proc_root=tmp_path)
    assert p.reason and "params" in p.reason and "lacks" in p.reason
    (tmp_path / "driver" / "nvidia").mkdir(parents=True)
    (tmp_path / "driver" / "nvidia" / "params").write_text("x")
    p = mounts.plan_entries([ROOT, PROC, hook("/run/nvidia-ctk-hookX"), params], SPEC, proc_root=tmp_path)
    assert p.reason is None and any("bind over /proc/driver/nvidia/params" in n for n in p.notes)


def test_apply_creates_journaled_and_undo_removes(tmp_path):
    root = tmp_path / "rootfs"
    (root / "run").mkdir(parents=True)
    (root / "var").mkdir()
    (root / "var" / "run").symlink_to("../run")
    j = rootfs.Journal(tmp_path / "backup")
    made = mounts.apply(root, ["/run/nvidia-ctk-hook/u1", "/var/run/nvidia-ctk-hookU2", "/run"], j)
    assert made == ["/run/nvidia-ctk-hook/u1", "/run/nvidia-ctk-hookU2"]
    assert (root / "run" / "nvidia-ctk-hook" / "u1").is_dir() and (root / "run" / "nvidia-ctk-hookU2").is_dir()
    rootfs.undo(root, j)
    assert sorted(p.name for p in (root / "run").iterdir()) == []


def test_apply_refuses_escapes(tmp_path):
    root = tmp_path / "rootfs"
    root.mkdir()
    (root / "evil").symlink_to("/")
    j = rootfs.Journal(tmp_path / "b")
    with pytest.raises(rootfs.RootfsError):
        mounts.apply(root, ["/evil/x"], j)
    with pytest.raises(rootfs.RootfsError):
        mounts.apply(root, ["/a/../x"], j)
    assert not (tmp_path / "x").exists()


def test_unreadable_images_are_refused(tmp_path):
    (tmp_path / "mountpoints-13.img").write_bytes(b"garbage")
    assert "cannot read" in mounts.plan(tmp_path, SPEC).reason


def test_entries_are_decoded_once_per_checkpoint_key(tmp_path, monkeypatch):
    """Store.seal and plan share one cache: a key it holds is read (a re-seal decodes nothing), another
    key is decoded again and replaces it."""
    decoded = []
    monkeypatch.setattr(mounts.criu, "mount_entries",
                        lambda d: decoded.append(d) or [{"mnt_id": 1, "mountpoint": "/"}])
    cache = tmp_path / "ck.mounts.json"
    assert mounts.entries_cached(tmp_path, cache, "k1") == [{"mnt_id": 1, "mountpoint": "/"}]
    assert mounts.entries_cached(tmp_path, cache, "k1") == [{"mnt_id": 1, "mountpoint": "/"}]
    assert len(decoded) == 1
    assert mounts.plan(tmp_path, SPEC, cache=cache, key="k1").reason is None and len(decoded) == 1
    mounts.entries_cached(tmp_path, cache, "k2")
    assert len(decoded) == 2
