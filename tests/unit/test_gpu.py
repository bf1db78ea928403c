from __future__ import annotations

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


def test_node_inventory_without_nvml(monkeypatch):
    monkeypatch.setenv("WARMSTART_LIBNVML", "/nonexistent/libnvidia-ml.so.1")
    assert gpu.node_inventory() is None


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


def test_multi_gpu_remap_pairs_in_device_order():
    old, new = gpu.for_container(INV4, spec(0, 1)), gpu.for_container(INV4, spec(3, 2))
    assert gpu.incompatibility(old, new) is None
    u = [d["uuid"] for d in INV4["devices"]]
    assert gpu.gpu_pairs(old, new) == [(u[0], u[2]), (u[1], u[3])]
