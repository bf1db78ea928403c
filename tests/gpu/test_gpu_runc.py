"""A torch worker in a runc container with GPU devices, through warmstart-runtime as the shim calls it.

Cold start → first forward → stop (CUDA lock+checkpoint, runc checkpoint) →
restore into a new container whose nvidia-ctk-hook tmpfs has another uuid path
→ the first forward after restore must equal the one before, bit for bit.
Timings go to $WARMSTART_GPU_RESULTS (JSON) when set.  Run on a GPU node:
    python3 -m pytest -q -s tests/gpu -m gpu
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "e2e"))
import shim  # noqa: E402
from shim import subreaper  # noqa: E402, F401 - autouse: this module plays the shim

HOOK = Path(__file__).parents[1] / "e2e" / "fixtures" / "fake_ctk_hook.sh"


def _torch_python() -> str | None:
    for py in (os.environ.get("WARMSTART_TORCH_PYTHON"), sys.executable, "/opt/torch/.venv/bin/python3",
               shutil.which("python3")):
        if py and Path(py).exists() and subprocess.run([py, "-c", "import torch"], capture_output=True).returncode == 0:
            return str(Path(py).absolute())
    return None


TORCH_PY = _torch_python() if Path("/dev/nvidia0").exists() else None
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not Path("/dev/nvidia0").exists(), reason="no /dev/nvidia0: needs an NVIDIA GPU"),
    pytest.mark.skipif(TORCH_PY is None, reason="no python with torch on this node"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc, CRIU)"),
    pytest.mark.skipif(not Path(shim.RUNTIME).exists(), reason=f"{shim.RUNTIME} not installed"),
]

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


def _host_mounts(prefixes: tuple[str, ...]) -> list[str]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4].replace("\\040", " ")
        if any(mp == p or mp.startswith(p + "/") for p in prefixes) and mp not in out:
            out.append(mp)
    for p in prefixes:
        if p not in out and Path(p).is_dir():
            out.append(p)
    return sorted(out, key=lambda m: m.count("/"))


def _gpu_spec(c: shim.Container, hook_uuid_fmt: str = "suffix") -> None:
    cfg = json.loads((c.bundle / "config.json").read_text())
    torch_root = str(Path(TORCH_PY).parents[1]) if "/.venv/" in TORCH_PY or "/venv/" in TORCH_PY else None
    real_root = str(Path(os.path.realpath(TORCH_PY)).parents[1])  # the interpreter a venv links to
    prefixes = tuple(dict.fromkeys(("/usr", torch_root or "/usr", "/usr/local/nvidia",
                                    real_root if not real_root.startswith("/usr") else "/usr")))
    cfg["mounts"] = [m for m in cfg["mounts"] if m["destination"] != "/usr"]
    for mp in _host_mounts(tuple(p for p in prefixes if Path(p).exists())):
        target = c.bundle / "rootfs" / mp.lstrip("/")
        if Path(mp).is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:  # a file bind (drivers are sometimes mounted file by file)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
        cfg["mounts"].append({"destination": mp, "type": "bind", "source": mp, "options": ["bind", "ro"]})
    devs, rules = [], [{"allow": False, "access": "rwm"}]
    for name in ("nvidia0", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"):
        p = Path("/dev") / name
        if p.exists():
            st = p.stat()
            devs.append({"path": str(p), "type": "c", "major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev),
                         "fileMode": 0o666, "uid": 0, "gid": 0})
            rules.append({"allow": True, "type": "c", "major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev),
                          "access": "rwm"})
    for std in ("null", "zero", "urandom", "random", "full", "tty"):
        st = Path("/dev", std).stat()
        rules.append({"allow": True, "type": "c", "major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev),
                      "access": "rwm"})
    cfg["linux"]["devices"] = devs
    cfg["linux"]["resources"] = {"devices": rules}
    cfg["linux"]["namespaces"] = [n for n in cfg["linux"]["namespaces"] if n["type"] != "network"]  # no `ip` there
    for f in ("ld.so.cache", "ld.so.conf"):
        if Path("/etc", f).exists():
            shutil.copy(Path("/etc", f), c.bundle / "rootfs" / "etc" / f)
    if Path("/etc/ld.so.conf.d").is_dir():
        shutil.copytree("/etc/ld.so.conf.d", c.bundle / "rootfs" / "etc" / "ld.so.conf.d", dirs_exist_ok=True)
    (c.bundle / "rootfs" / "worker.py").write_text(WORKER)
    cfg["process"]["args"] = [TORCH_PY, "/worker.py"]
    cfg["process"]["env"] += [f"GPU_MB={os.environ.get('WARMSTART_GPU_MB', '2048')}",
                              "LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/lib/x86_64-linux-gnu",
                              "NCCL_NVLS_ENABLE=0", "TORCH_SYMM_MEM_DISABLE_MULTICAST=1", "NVSHMEM_DISABLE_NVLS=1"]
    procfile = "/proc/driver/nvidia/params" if Path("/proc/driver/nvidia/params").exists() else "/proc/version"
    cfg["hooks"] = {"createContainer": [{"path": str(HOOK), "args": [HOOK.name, str(c.bundle / "rootfs"),
                                                                      hook_uuid_fmt, procfile], "timeout": 10}]}
    (c.bundle / "config.json").write_text(json.dumps(cfg))


def _read_threads_line(node: shim.Node, c: shim.Container) -> str:
    """CRIU's own line on how it read the pages (warmstart's patch), or that it did not say."""
    log = node.base / "logs" / f"restore-{c.id}.log"
    lines = [x for x in log.read_text().splitlines() if "bytes of pages in" in x] if log.exists() else []
    return lines[-1].split(": ", 1)[-1] if lines else "single-threaded (no parallel-reads line)"


def _du(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def test_torch_worker_survives_checkpoint_and_restore_into_new_container(tmp_path_factory):
    node = shim.Node(Path(os.environ.get("WARMSTART_GPU_BASE") or tmp_path_factory.mktemp("gpunode")))
    res: dict = {"gpu_mb": int(os.environ.get("WARMSTART_GPU_MB", "2048"))}
    try:
        ann = {"warmstart.dev/checkpoint": "on-stop", "warmstart.dev/id": "gpu-torch"}
        a = node.container("gpu1", ann)
        _gpu_spec(a)
        t = time.perf_counter()
        a.create()
        a.start()
        ready = a.readline(timeout=300)
        res["cold_start_to_ready_s"] = round(time.perf_counter() - t, 3)
        res["cold_worker_init_s"] = round(ready["init_s"], 3)
        before = a.ask("fwd")
        assert before["fwd"] == ready["fwd"]
        t = time.perf_counter()
        p = a.stop()
        res["stop_with_dump_s"] = round(time.perf_counter() - t, 3)
        a.delete()
        assert p.returncode == 0, p.stderr
        ck = node.store / "gpu-torch"
        assert (ck / "checkpoint.done").is_file(), [r["msg"] for r in node.runtime_log()][-4:]
        meta = json.loads((ck / "metadata.json").read_text())
        res["dump_phases"] = meta["dump"]["phases"]
        res["dump_cuda"] = meta["dump"].get("cuda")
        res["gpu"] = meta.get("gpu")
        res["image_bytes"] = _du(ck)
        assert meta["dump"]["cuda"]["processes"] == 1

        b = node.container("gpu2", ann)
        _gpu_spec(b)  # the hook makes another uuid path
        t = time.perf_counter()
        b.create()
        res["restore_create_s"] = round(time.perf_counter() - t, 3)
        b.start()
        t = time.perf_counter()
        after = b.ask("fwd")
        res["first_forward_after_restore_s"] = round(time.perf_counter() - t, 3)
        res["restore_to_first_forward_s"] = round(res["restore_create_s"] + res["first_forward_after_restore_s"], 3)
        restored = [r for r in node.runtime_log() if str(r.get("msg", "")).startswith("restored from")]
        assert restored, [r["msg"] for r in node.runtime_log()][-4:]
        res["restore_phases"] = restored[-1].get("phases")
        res["mount_notes"] = [r["msg"] for r in node.runtime_log() if str(r.get("msg", "")).startswith("mounts:")]
        res["proc_file_bound"] = "/proc/driver/nvidia/params" if Path("/proc/driver/nvidia/params").exists() \
            else "/proc/version"
        res["forward_equal"] = after["fwd"] == before["fwd"]
        res["ballast_equal"] = after["ballast"] == before["ballast"]
        assert after["fwd"] == before["fwd"], "first forward after restore differs"
        assert after["ballast"] == before["ballast"]
        b.runtime("kill", "--all", b.id, "9", check=False)
        b.delete()
        res["read_threads"] = _read_threads_line(node, b)
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
            rec = [r for r in node.runtime_log() if str(r.get("msg", "")).startswith("restored from")][-1]
            res["restore_again"].append({"restore_read_threads": threads, "restore_create_s": took,
                                         "phases": rec.get("phases"), "read_threads": _read_threads_line(node, c),
                                         "forward_equal": again["fwd"] == before["fwd"]})
            assert again["fwd"] == before["fwd"]
            c.runtime("kill", "--all", c.id, "9", check=False)
            c.delete()
        node.config.write_text(conf)
    finally:
        out = os.environ.get("WARMSTART_GPU_RESULTS")
        print("GPU_RESULTS " + json.dumps(res))
        if out:
            Path(out).write_text(json.dumps(res, indent=1))
        node.cleanup()
