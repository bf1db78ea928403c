import os, sys, time, subprocess, json, re
from pathlib import Path
if len(sys.argv) > 2:
    rank = int(sys.argv[1]); store = sys.argv[2]
    import torch, torch.distributed as dist
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=2, device_id=torch.device("cuda", rank))
    x = torch.ones(1024, device="cuda"); dist.all_reduce(x); torch.cuda.synchronize()
    print("ready", rank, x[0].item(), flush=True)
    time.sleep(25)
    sys.exit(0)
sys.path.insert(0, "runtime")
from warmstart import cuda
for env in ({}, {"NCCL_P2P_DISABLE": "1"}):
    store = f"/tmp/probe-store-{time.time()}"
    e = dict(os.environ, NCCL_NVLS_ENABLE="0", **env)
    ps = [subprocess.Popen([sys.executable, __file__, str(r), store], env=e, stdout=subprocess.PIPE, text=True) for r in range(2)]
    for p in ps: print(p.stdout.readline().strip())
    pids = [p.pid for p in ps]
    print("ENV", env, "shared_state:", cuda.shared_state(pids))
    for pid in pids:
        fds = []
        for f in Path(f"/proc/{pid}/fd").iterdir():
            try: fds.append(os.readlink(f))
            except OSError: pass
        print(pid, "fds:", sorted(set(t for t in fds if not t.startswith("/dev/nvidia") and "pipe" not in t))[:30])
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
        print(pid, "maps shm/nccl:", sorted(set(l.split(None,5)[-1] for l in maps if "shm" in l or "nccl" in l.lower()))[:20])
        print(pid, "maps dev:", sorted(set(l.split(None,5)[-1] for l in maps if "/dev/" in l))[:20])
    un = Path(f"/proc/{pids[0]}/net/unix").read_text().splitlines()
    print("unix:", [l for l in un if "nccl" in l.lower()][:10], len(un))
    for p in ps: p.kill(); p.wait()
print("nccl version:", __import__("torch").cuda.nccl.version())
