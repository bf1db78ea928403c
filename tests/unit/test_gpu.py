from __future__ import annotations

import pytest

from warmstart import gpu

H100 = "NVIDIA H100 80GB HBM3"
INV = {"driver_version": "580.159.04", "cuda_version": "13.0", "devices": [
    {"index": 0, "minor": 0, "name": H100, "uuid": "GPU-00000000-0000-0000-0000-000000000000"},
    {"index": 1, "minor": 1, "name": H100, "uuid": "GPU-11111111-1111-1111-1111-111111111111"}]}


def spec(*minors):
    return {"linux": {"devices": [{"path": f"/dev/nvidia{m}", "type": "c", "major": 195, "minor": m} for m in minors]
                      + [{"path": "/dev/nvidiactl", "type": "c", "major": 195, "minor": 255}]}}


def test_for_container_narrows_to_its_devices():
    g = gpu.for_container(INV, spec(1))
    assert g["count"] == 1 and g["devices"][0]["uuid"].startswith("GPU-1111") and g["models"] == [H100]
    assert gpu.for_container(INV, {})["count"] == 2, "no numbered device: all GPUs"
    assert gpu.for_container(None, spec(0)) is None


def test_incompatibility():
    old = gpu.for_container(INV, spec(0))
    assert gpu.incompatibility(None, None) is None
    assert gpu.incompatibility(old, gpu.for_container(INV, spec(0))) is None
    assert "no NVIDIA driver" in gpu.incompatibility(old, None)
    assert "sees 2" in gpu.incompatibility(old, gpu.for_container(INV, spec(0, 1)))
    other = dict(INV, driver_version="570.1")
    assert "driver 580.159.04" in gpu.incompatibility(old, gpu.for_container(other, spec(0)))
    h200 = {**INV, "devices": [dict(INV["devices"][0], name="NVIDIA H200")]}
    assert "models differ" in gpu.incompatibility(old, gpu.for_container(h200, spec(0)))


def test_same_model_other_device_is_remapped():
    old, new = gpu.for_container(INV, spec(0)), gpu.for_container(INV, spec(1))
    assert gpu.incompatibility(old, new) is None
    assert gpu.gpu_pairs(old, new) == [(INV["devices"][0]["uuid"], INV["devices"][1]["uuid"])]
    assert gpu.gpu_pairs(old, old) == []


def test_node_inventory_without_nvml(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu, "PROC_NVIDIA", tmp_path / "absent")
    monkeypatch.setenv("WARMSTART_LIBNVML", "/nonexistent/libnvidia-ml.so.1")
    assert gpu.node_inventory() is None


VERSION = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  "
           "(dvs-builder@U22-I3-AE18-23-3)  Thu Jun  5 14:04:37 UTC 2025\nGCC version:  gcc version 12.2.0\n")


def proc_tree(root, gpus):
    """A /proc/driver/nvidia as the 580 module writes it: version, gpus/<bus id>/information."""
    root.mkdir(parents=True)
    (root / "version").write_text(VERSION)
    for bus, minor, model, uuid, excluded in gpus:
        d = root / "gpus" / bus
        d.mkdir(parents=True)
        (d / "information").write_text(
            f"Model: \t\t {model}\nIRQ:   \t\t 0\nGPU UUID: \t {uuid}\nVideo BIOS: \t 96.00.af.00.01\n"
            f"Bus Type: \t PCIe\nDMA Size: \t 52 bits\nDMA Mask: \t 0xfffffffffffff\nBus Location: \t {bus}\n"
            f"Device Minor: \t {minor}\nGPU Excluded:\t {excluded}\n")
    return root


def test_proc_inventory_reads_the_module_s_files_in_bus_order(monkeypatch, tmp_path):
    root = proc_tree(tmp_path / "nvidia", [
        ("0000:9a:00.0", 1, "NVIDIA H200", "GPU-bbbbbbbb-0000-0000-0000-000000000000", "No"),
        ("0000:18:00.0", 0, "NVIDIA H200", "GPU-aaaaaaaa-0000-0000-0000-000000000000", "No"),
        ("0000:c0:00.0", 2, "NVIDIA H200", "GPU-cccccccc-0000-0000-0000-000000000000", "Yes")])
    inv = gpu.proc_inventory(root)
    assert inv == {"driver_version": "580.159.04", "devices": [
        {"index": 0, "minor": 0, "name": "NVIDIA H200", "uuid": "GPU-aaaaaaaa-0000-0000-0000-000000000000"},
        {"index": 1, "minor": 1, "name": "NVIDIA H200", "uuid": "GPU-bbbbbbbb-0000-0000-0000-000000000000"}]}
    g = gpu.for_container(inv, spec(1))
    assert g == {"driver_version": "580.159.04", "count": 1, "models": ["NVIDIA H200"],
                 "devices": [{"name": "NVIDIA H200", "uuid": "GPU-bbbbbbbb-0000-0000-0000-000000000000", "minor": 1}]}
    monkeypatch.setattr(gpu, "PROC_NVIDIA", root)
    monkeypatch.setattr(gpu, "nvml_inventory", lambda lib=None: pytest.fail("NVML read although /proc answered"))
    assert gpu.node_inventory() == inv


@pytest.mark.parametrize("damage", ["no version line", "no gpus dir", "uuid hidden", "no minor"])
def test_proc_inventory_not_as_expected_means_nvml(monkeypatch, tmp_path, damage):
    root = proc_tree(tmp_path / "nvidia", [("0000:18:00.0", 0, "NVIDIA H200",
                                            "GPU-aaaaaaaa-0000-0000-0000-000000000000", "No")])
    info = root / "gpus" / "0000:18:00.0" / "information"
    if damage == "no version line":
        (root / "version").write_text("something else\n")
    elif damage == "no gpus dir":
        info.unlink()
        info.parent.rmdir()
    elif damage == "uuid hidden":
        info.write_text(info.read_text().replace("GPU-aaaaaaaa-0000-0000-0000-000000000000", "?"))
    else:
        info.write_text(info.read_text().replace("Device Minor", "Minor"))
    assert gpu.proc_inventory(root) is None
    monkeypatch.setattr(gpu, "PROC_NVIDIA", root)
    monkeypatch.setattr(gpu, "nvml_inventory", lambda lib=None: INV)
    assert gpu.node_inventory() is INV


INV4 = {**INV, "devices": [{"index": i, "minor": i, "name": H100, "uuid": f"GPU-{i}{i}{i}{i}{i}{i}{i}{i}-0000-0000-0000-000000000000"}
                           for i in range(4)]}


def test_multi_gpu_refusals_name_what_differs():
    """A TP=2 checkpoint: refused (before CRIU) when the count, a model or the driver differs."""
    old = gpu.for_container(INV4, spec(0, 1))
    assert gpu.incompatibility(old, gpu.for_container(INV4, spec(2))) == \
        "checkpoint used 2 GPU(s), the restoring container sees 1"
    mixed = {**INV4, "devices": [*INV4["devices"][:3], dict(INV4["devices"][3], name="NVIDIA H200")]}
    assert gpu.incompatibility(old, gpu.for_container(mixed, spec(2, 3))) == \
        f"GPU models differ: checkpoint {[H100, H100]}, here {[H100, 'NVIDIA H200']}"
    newer = {**INV4, "driver_version": "590.1"}
    assert gpu.incompatibility(old, gpu.for_container(newer, spec(0))) == \
        "checkpoint made with NVIDIA driver 580.159.04, node has 590.1", "the driver is named first, before the count"


def test_multi_gpu_remap_pairs_in_the_containers_order():
    """The k-th GPU the spec lists (the device plugin's order) takes the k-th checkpointed GPU's state."""
    old, new = gpu.for_container(INV4, spec(0, 1)), gpu.for_container(INV4, spec(3, 2))
    assert gpu.incompatibility(old, new) is None
    u = [d["uuid"] for d in INV4["devices"]]
    assert gpu.gpu_pairs(old, new) == [(u[0], u[3]), (u[1], u[2])]
    assert gpu.gpu_pairs(old, gpu.for_container(INV4, spec(2, 3))) == [(u[0], u[2]), (u[1], u[3])]


def test_the_same_two_gpus_in_the_other_order_are_swapped():
    """What tests/gpu/test_gpu_tp2.py arranges on a two-GPU machine: rank 0's state goes to GPU 1 and back."""
    old, new = gpu.for_container(INV, spec(0, 1)), gpu.for_container(INV, spec(1, 0))
    assert [d["minor"] for d in new["devices"]] == [1, 0] and gpu.incompatibility(old, new) is None
    u = [d["uuid"] for d in INV["devices"]]
    assert gpu.gpu_pairs(old, new) == [(u[0], u[1]), (u[1], u[0])]
    assert gpu.gpu_pairs(old, gpu.for_container(INV, spec(0, 1))) == [], "same order: no remap"
    listed_twice = {"linux": {"devices": spec(1, 0)["linux"]["devices"]},
                    "mounts": [{"destination": "/dev/nvidia0", "type": "bind", "source": "/dev/nvidia0"}]}
    assert gpu.spec_minors(listed_twice) == [1, 0]
    assert gpu.spec_minors({"linux": {"devices": []}}) is None


def test_restore_refuses_other_gpus_before_criu_runs(monkeypatch, tmp_path):
    """restore._Attempt: the GPU check is part of `_check`, answered before `_prepare` (CRIU config, rootfs)."""
    from types import SimpleNamespace

    from warmstart import restore
    from warmstart.phases import Phases

    dumped = gpu.for_container(INV4, spec(0, 1))
    ckpt = SimpleNamespace(metadata={"gpu": dumped, "dump": {"cuda": {"processes": 2}}}, path=None,
                           metadata_sha256="x")
    store = SimpleNamespace(open_verified=lambda cid: ckpt, derived_cache=lambda c, k: None)
    monkeypatch.setattr(restore, "refusal", lambda *a: None)
    monkeypatch.setattr(restore.mounts, "plan", lambda *a, **k: SimpleNamespace(reason=None))
    a = object.__new__(restore._Attempt)
    a.ct = SimpleNamespace(settings=None, st=None, sd=SimpleNamespace(criu_conf=tmp_path / "criu.conf"))
    a.store, a.cid, a.ph, a.stdio, a.spec = store, "tp2", Phases(), None, SimpleNamespace(raw=spec(2))
    a._cleanup = lambda: pytest.fail("the refusal failed instead (a failure to clean up after)")
    a._prepare = lambda: pytest.fail("CRIU's restore was prepared for a checkpoint of other GPUs")
    for inv, why in ((INV4, "checkpoint used 2 GPU(s), the restoring container sees 1"),
                     ({**INV4, "driver_version": "590.1"}, "checkpoint made with NVIDIA driver 580.159.04"),
                     (None, "this node has no NVIDIA driver")):
        monkeypatch.setattr(restore.gpu, "node_inventory", lambda inv=inv: inv)
        res = a.run()
        assert not res.ok and res.reason.startswith("checkpoint tp2 refused: ") and why in res.reason
        assert "compatible" in res.phases and "restore" not in res.phases
