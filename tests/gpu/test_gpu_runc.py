"""A torch worker in a runc container with GPU devices, through warmstart-runtime as the shim calls it.

Cold start → first forward → stop (CUDA lock+checkpoint, runc checkpoint) →
restore into a new container whose nvidia-ctk-hook tmpfs has another uuid path
→ the first forward after restore must equal the one before, bit for bit.
Timings go to $WARMSTART_GPU_RESULTS (JSON) when set.  Run on a GPU node:
    python3 -m pytest -q -s tests/gpu -m gpu
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import gpuspec
from gpuspec import shim
from shim import subreaper  # noqa: F401 - autouse: this module plays the shim

pytestmark = gpuspec.REQUIRES

WORKER = r'''
import hashlib, json, os, sys, time
t0 = time.time()
import torch
torch.manual_seed(1234)
dev = torch.device("cuda")
mb = int(os.environ.get("GPU_MB", "2048"))
ballast = torch.randn(mb * 1024 * 1024 // 4, device=dev)          # GPU memory that must survive
model = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024)).to(dev)
x = torch.randn(64, 4096, device=dev)
def fwd():
    with torch.no_grad():
        y = model(x).float().cpu().numpy().tobytes()
    return hashlib.sha256(y).hexdigest()
ref = fwd()
bsum = float(ballast.sum().item())
print(json.dumps({"event": "ready", "fwd": ref, "ballast": bsum, "init_s": time.time() - t0}), flush=True)
for line in sys.stdin:
    t = time.time()
    h = fwd()
    print(json.dumps({"fwd": h, "ballast": float(ballast.sum().item()), "fwd_s": time.time() - t}), flush=True)
'''


def _gpu_spec(c: shim.Container) -> None:
    gpuspec.gpu_spec(c, {"/worker.py": WORKER}, [gpuspec.TORCH_PY, "/worker.py"],
                     [f"GPU_MB={os.environ.get('WARMSTART_GPU_MB', '2048')}"])


def test_torch_worker_survives_checkpoint_and_restore_into_new_container(tmp_path_factory):
    node = gpuspec.node(tmp_path_factory, "gpunode")
    res: dict = {"gpu_mb": int(os.environ.get("WARMSTART_GPU_MB", "2048"))}
    try:
        ann = {"warmstart.dev/checkpoint": "on-stop", "warmstart.dev/id": "gpu-torch"}
        a = node.container("gpu1", ann)
        _gpu_spec(a)
        ready = gpuspec.cold_start(a, res)
        before = a.ask("fwd")
        assert before["fwd"] == ready["fwd"]
        meta = gpuspec.stop_with_dump(node, a, "gpu-torch", res)
        assert meta["dump"]["cuda"]["processes"] == 1

        b = node.container("gpu2", ann)
        _gpu_spec(b)  # the hook makes another uuid path
        after = gpuspec.restore(node, b, res)
        res["mount_notes"] = [r["msg"] for r in node.runtime_log() if str(r.get("msg", "")).startswith("mounts:")]
        res["proc_file_bound"] = "/proc/driver/nvidia/params" if Path("/proc/driver/nvidia/params").exists() \
            else "/proc/version"
        res["forward_equal"] = after["fwd"] == before["fwd"]
        res["ballast_equal"] = after["ballast"] == before["ballast"]
        assert after["fwd"] == before["fwd"], "first forward after restore differs"
        assert after["ballast"] == before["ballast"]
        b.runtime("kill", "--all", b.id, "9", check=False)
        b.delete()
        res["read_threads"] = gpuspec.read_threads_line(node, b)
        # the same image restored again with CRIU's single-threaded page reads, then parallel again:
        # before and after of warmstart's parallel-reads patch, on the same machine and page cache
        conf = node.config.read_text()
        res["restore_again"] = []
        for i, threads in enumerate((1, 0)):
            node.config.write_text(conf + f"restore_read_threads = {threads}\n")
            c = node.container(f"gpu{3 + i}", ann)
            _gpu_spec(c)
            t = time.perf_counter()
            c.create()
            took = round(time.perf_counter() - t, 3)
            c.start()
            again = c.ask("fwd")
            rec = gpuspec.restored_record(node, c)
            res["restore_again"].append({"restore_read_threads": threads, "restore_create_s": took,
                                         "phases": rec.get("phases"), "read_threads": gpuspec.read_threads_line(node, c),
                                         "forward_equal": again["fwd"] == before["fwd"]})
            assert again["fwd"] == before["fwd"]
            c.runtime("kill", "--all", c.id, "9", check=False)
            c.delete()
        node.config.write_text(conf)
        res["passed"] = True
    finally:
        gpuspec.write_results(res)
        if not res.get("passed"):
            gpuspec.save_logs(node, "runc")
        node.cleanup()
