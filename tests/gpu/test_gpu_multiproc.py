"""Two CUDA processes in one container, sharing one GPU, through warmstart-runtime as the shim calls it.

The worker (the container's init) starts a child worker (a new Python, as vLLM's API server starts
its engine core); each holds its own GPU tensors and model and prints the SHA-256 of a forward and a
random token drawn at start.  Stop → dump (both locked, then both checkpointed) → restore into a new
container (another nvidia-ctk-hook path): both first forwards bit-identical, both tokens the same
(restored, not started again), and the dump's metadata counts 2 CUDA processes.  Runs on the
single-GPU machine (issue 15); timings go to $WARMSTART_GPU_RESULTS with `_multiproc` before `.json`.
"""
from __future__ import annotations

import os

import gpuspec
from gpuspec import shim
from shim import subreaper  # noqa: F401 - autouse: this module plays the shim

pytestmark = gpuspec.REQUIRES

WORKER = r'''
import hashlib, json, os, subprocess, sys, time
role = sys.argv[1] if len(sys.argv) > 1 else "parent"
t0 = time.time()
import torch
torch.manual_seed(1234 if role == "parent" else 4321)
dev = torch.device("cuda")
ballast = torch.randn(int(os.environ.get("GPU_MB", "1024")) * 1024 * 1024 // 4, device=dev)
model = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024)).to(dev)
x = torch.randn(64, 4096, device=dev)
token = os.urandom(8).hex()
def state():
    with torch.no_grad():
        y = model(x).float().cpu().numpy().tobytes()
    return {"fwd": hashlib.sha256(y).hexdigest(), "ballast": float(ballast.sum().item()), "token": token,
            "pid": os.getpid()}
if role == "child":
    print(json.dumps(state()), flush=True)
    for line in sys.stdin:
        print(json.dumps(state()), flush=True)
    sys.exit(0)
child = subprocess.Popen([sys.executable, __file__, "child"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, bufsize=1)
def ask_child():
    child.stdin.write("fwd\n")
    child.stdin.flush()
    return json.loads(child.stdout.readline())
first_child = json.loads(child.stdout.readline())
print(json.dumps({"event": "ready", "parent": state(), "child": first_child, "init_s": time.time() - t0}), flush=True)
for line in sys.stdin:
    t = time.time()
    out = {"parent": state(), "child": ask_child()}
    print(json.dumps({**out, "fwd_s": time.time() - t}), flush=True)
'''


def _gpu_spec(c: shim.Container) -> None:
    gpuspec.gpu_spec(c, {"/worker_mp.py": WORKER}, [gpuspec.TORCH_PY, "/worker_mp.py"],
                     [f"GPU_MB={os.environ.get('WARMSTART_GPU_MB', '1024')}"])


def test_two_cuda_processes_sharing_a_gpu_survive_checkpoint_and_restore(tmp_path_factory):
    node = gpuspec.node(tmp_path_factory, "gpunode-mp")
    res: dict = {"gpu_mb_each": int(os.environ.get("WARMSTART_GPU_MB", "1024")), "cuda_processes": 2}
    try:
        ann = {"warmstart.dev/checkpoint": "on-stop", "warmstart.dev/id": "gpu-multiproc"}
        a = node.container("mp1", ann)
        _gpu_spec(a)
        ready = gpuspec.cold_start(a, res)
        before = a.ask("fwd")
        for who in ("parent", "child"):
            assert before[who]["fwd"] == ready[who]["fwd"] and before[who]["token"] == ready[who]["token"]
        assert before["parent"]["fwd"] != before["child"]["fwd"], "two different models: the test tells them apart"
        assert before["parent"]["pid"] != before["child"]["pid"]
        meta = gpuspec.stop_with_dump(node, a, "gpu-multiproc", res)
        assert meta["dump"]["cuda"]["processes"] == 2, meta["dump"].get("cuda")

        b = node.container("mp2", ann)
        _gpu_spec(b)  # the hook makes another uuid path
        after = gpuspec.restore(node, b, res)
        for who in ("parent", "child"):
            res[f"{who}_forward_equal"] = after[who]["fwd"] == before[who]["fwd"]
            res[f"{who}_ballast_equal"] = after[who]["ballast"] == before[who]["ballast"]
        for who in ("parent", "child"):
            assert after[who]["token"] == before[who]["token"], f"the {who} started again instead of being restored"
            assert after[who]["pid"] == before[who]["pid"]
            assert after[who]["fwd"] == before[who]["fwd"], f"the {who}'s first forward after restore differs"
            assert after[who]["ballast"] == before[who]["ballast"]
        b.runtime("kill", "--all", b.id, "9", check=False)
        b.delete()
        res["passed"] = True
    finally:
        gpuspec.write_results(res, "_multiproc")
        if not res.get("passed"):
            gpuspec.save_logs(node, "multiproc")
        node.cleanup()
