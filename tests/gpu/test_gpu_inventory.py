"""The /proc GPU inventory agrees with NVML's on a real NVIDIA node, and is the cheaper of the two.

Restore reads the node's GPUs on create's path (`compatible`), dump records them; both go through
`gpu.node_inventory`, which reads the kernel module's /proc files and falls back to NVML.  A checkpoint
recorded through either must compare equal: same driver version, and per GPU the same model name, UUID
and minor number in the same order.  Times of both go to stdout (the device run's log).
"""
from __future__ import annotations

import time

import gpuspec
import pytest

from warmstart import gpu

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gpuspec.HAS_GPU, reason="no /dev/nvidia0: needs an NVIDIA GPU")]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def test_proc_inventory_equals_nvml_s():
    nvml, nvml_s = timed(gpu.nvml_inventory)
    proc, proc_s = timed(gpu.proc_inventory)
    print(f"gpu inventory: NVML {nvml_s * 1e3:.1f} ms, /proc {proc_s * 1e3:.2f} ms; {proc}")
    assert nvml is not None, "NVML answered nothing on a GPU node"
    assert proc is not None, "the /proc inventory answered nothing on a GPU node"
    assert proc["driver_version"] == nvml["driver_version"]
    key = ("name", "uuid", "minor")
    assert [{k: d[k] for k in key} for d in proc["devices"]] == [{k: d[k] for k in key} for d in nvml["devices"]]
    assert gpu.node_inventory() == proc
    spec = {"linux": {"devices": [{"path": f"/dev/nvidia{d['minor']}", "minor": d["minor"]} for d in proc["devices"]]}}
    assert gpu.incompatibility(gpu.for_container(nvml, spec), gpu.for_container(proc, spec)) is None, \
        "a checkpoint recorded through NVML restores under the /proc inventory"
