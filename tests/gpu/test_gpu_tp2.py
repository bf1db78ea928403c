"""A tensor-parallel (TP=2) worker across two GPUs, through warmstart-runtime as the shim calls it (issue 15).

The container's init starts one rank per GPU (torch.distributed, NCCL, a file store: no TCP store
connection to lose at restore); each forward is a column-split linear layer whose partial outputs are
summed with an all-reduce. Stop → dump (both ranks locked, then both checkpointed) → restore into a
new container: both ranks' first forward after the restore is bit-identical and equal across ranks.
Run with NCCL's P2P transport on and off (`NCCL_P2P_DISABLE`); NVLink multicast always off. Needs
two GPUs (the nvidia-h200-x2 kind); timings go to $WARMSTART_GPU_RESULTS with `_tp2_<variant>`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import gpuspec
from gpuspec import shim
from shim import subreaper  # noqa: F401 - autouse: this module plays the shim

pytestmark = [*gpuspec.REQUIRES,
              pytest.mark.skipif(not Path("/dev/nvidia1").exists(), reason="needs two GPUs (/dev/nvidia1)")]

WORKER = r'''
import hashlib, json, os, subprocess, sys, time
t0 = time.time()
if len(sys.argv) > 1:  # a rank
    rank = int(sys.argv[1])
    import torch, torch.distributed as dist
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method="file:///tmp/tp2-store", rank=rank, world_size=2,
                            device_id=torch.device("cuda", rank))
    g = torch.Generator().manual_seed(1000 + rank)
    w = torch.randn(4096, 2048, generator=g).cuda()          # this rank's half of a 4096x4096 layer's input dim
    ballast = torch.randn(256 * 1024 * 1024 // 4, generator=g).cuda()
    x = torch.randn(64, 2048, generator=torch.Generator().manual_seed(7 + rank)).cuda()
    token = os.urandom(8).hex()
    def fwd():
        with torch.no_grad():
            y = x @ w.t()                                    # partial sums
            dist.all_reduce(y)                               # the collective in every forward
            torch.cuda.synchronize()
            return {"rank": rank, "fwd": hashlib.sha256(y.cpu().numpy().tobytes()).hexdigest(),
                    "ballast": float(ballast.sum().item()), "token": token, "pid": os.getpid()}
    print(json.dumps(fwd()), flush=True)
    for line in sys.stdin:
        print(json.dumps(fwd()), flush=True)
    sys.exit(0)
ranks = [subprocess.Popen([sys.executable, __file__, str(r)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True, bufsize=1) for r in range(2)]
first = [json.loads(p.stdout.readline()) for p in ranks]
print(json.dumps({"event": "ready", "ranks": first, "init_s": time.time() - t0}), flush=True)
for line in sys.stdin:
    t = time.time()
    for p in ranks:                                           # both must enter the all-reduce
        p.stdin.write("fwd\n")
        p.stdin.flush()
    out = [json.loads(p.stdout.readline()) for p in ranks]
    print(json.dumps({"ranks": out, "fwd_s": time.time() - t}), flush=True)
'''

VARIANTS = {"p2p-on": [], "p2p-off": ["NCCL_P2P_DISABLE=1"]}


def _gpu_spec(c: shim.Container, variant: str) -> None:
    gpuspec.gpu_spec(c, {"/worker_tp2.py": WORKER}, [gpuspec.TORCH_PY, "/worker_tp2.py"],
                     ["NCCL_SOCKET_IFNAME=lo", "TORCH_NCCL_ENABLE_MONITORING=0", *VARIANTS[variant]],
                     gpus=("nvidia0", "nvidia1"), own_netns=True)  # as a pod: NCCL's listener restores unclashed


@pytest.mark.xfail(reason="measured on the H200 x2 (driver 580.159.04): both ranks dump, but "
                          "cuCheckpointProcessRestore fails for NCCL ranks (P2P on: CUDA_ERROR_NOT_SUPPORTED, also "
                          "in place; P2P off: CUDA_ERROR_UNKNOWN); the restore falls back to a cold start "
                          "(docs/gpu.md). XPASS when a driver restores them.", strict=False)
@pytest.mark.parametrize("variant", VARIANTS)
def test_tp2_worker_survives_checkpoint_and_restore(tmp_path_factory, variant):
    node = gpuspec.node(tmp_path_factory, f"gpunode-tp2-{variant}")
    res: dict = {"variant": variant, "nccl_env": VARIANTS[variant]}
    cid = f"gpu-tp2-{variant}"
    try:
        ann = {"warmstart.dev/checkpoint": "on-stop", "warmstart.dev/id": cid}
        a = node.container(f"tp{variant}1", ann)
        _gpu_spec(a, variant)
        ready = gpuspec.cold_start(a, res)
        before = a.ask("fwd")
        fwd = [r["fwd"] for r in before["ranks"]]
        assert fwd[0] == fwd[1], "the all-reduce gives both ranks the same output"
        assert [r["fwd"] for r in ready["ranks"]] == fwd
        meta = gpuspec.stop_with_dump(node, a, cid, res)
        res["gpu"] = meta.get("gpu")
        assert meta["dump"]["cuda"]["processes"] == 2, meta["dump"].get("cuda")
        assert (meta.get("gpu") or {}).get("count") == 2, meta.get("gpu")

        b = node.container(f"tp{variant}2", ann)
        _gpu_spec(b, variant)
        after = gpuspec.restore(node, b, res)
        for r_before, r_after in zip(before["ranks"], after["ranks"]):
            assert r_after["token"] == r_before["token"], "a rank started again instead of being restored"
            assert r_after["fwd"] == r_before["fwd"], f"rank {r_before['rank']}: first forward after restore differs"
            assert r_after["ballast"] == r_before["ballast"]
        res["second_forward_equal"] = [r["fwd"] for r in b.ask("fwd")["ranks"]] == fwd
        assert res["second_forward_equal"]
        b.runtime("kill", "--all", b.id, "9", check=False)
        b.delete()
        res["passed"] = True
    finally:
        gpuspec.write_results(res, f"_tp2_{variant}")
        if not res.get("passed"):
            gpuspec.save_logs(node, f"tp2_{variant}")
        node.cleanup()
