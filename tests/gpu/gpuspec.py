"""What the GPU tests share: a CUDA worker's runc container set up as the NVIDIA toolkit would, and
where their results and logs go.

The container gets the host's /usr, the torch venv and /usr/local/nvidia bound read-only (each host
mount its own bind), /dev/nvidia* in `linux.devices` and the device allow-list, the host network
namespace or a pod-like one joined by path (the lent machine has no `ip`), a createContainer hook that makes the toolkit's
nvidia-ctk-hook tmpfs, and NVLink multicast off (the lent machines require it).
"""
from __future__ import annotations

import atexit
import ctypes
import fcntl
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "e2e"))
import shim  # noqa: E402

from warmstart.testing.gpu_bundle import ENV, host_mounts  # noqa: E402 - the bench's recipe, one copy

HOOK = Path(__file__).parents[1] / "e2e" / "fixtures" / "fake_ctk_hook.sh"


def torch_python() -> str | None:
    """A Python that imports torch: $WARMSTART_TORCH_PYTHON, this one, the lent machine's, or python3."""
    for py in (os.environ.get("WARMSTART_TORCH_PYTHON"), sys.executable, "/opt/torch/.venv/bin/python3",
               shutil.which("python3")):
        if py and Path(py).exists() and subprocess.run([py, "-c", "import torch"], capture_output=True).returncode == 0:
            return str(Path(py).absolute())
    return None


HAS_GPU = Path("/dev/nvidia0").exists()
TORCH_PY = torch_python() if HAS_GPU else None
# A GPU test module's `pytestmark`.
REQUIRES = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_GPU, reason="no /dev/nvidia0: needs an NVIDIA GPU"),
    pytest.mark.skipif(TORCH_PY is None, reason="no python with torch on this node"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc, CRIU)"),
    pytest.mark.skipif(not Path(shim.RUNTIME).exists(), reason=f"{shim.RUNTIME} not installed"),
]


def gpu_spec(c: shim.Container, files: dict[str, str], args: list[str], env: list[str] | None = None,
             hook_uuid_fmt: str = "suffix", gpus: tuple[str, ...] = ("nvidia0",), own_netns: bool = False) -> None:
    """Turn the shim's container `c` into a GPU one that runs `args` (files written into its rootfs)."""
    assert TORCH_PY is not None
    cfg = json.loads((c.bundle / "config.json").read_text())
    torch_root = str(Path(TORCH_PY).parents[1]) if "/.venv/" in TORCH_PY or "/venv/" in TORCH_PY else None
    real_root = str(Path(os.path.realpath(TORCH_PY)).parents[1])  # the interpreter a venv links to
    prefixes = tuple(dict.fromkeys(("/usr", torch_root or "/usr", "/usr/local/nvidia",
                                    real_root if not real_root.startswith("/usr") else "/usr")))
    cfg["mounts"] = [m for m in cfg["mounts"] if m["destination"] != "/usr"]
    for mp in host_mounts(tuple(p for p in prefixes if Path(p).exists())):
        target = c.bundle / "rootfs" / mp.lstrip("/")
        if Path(mp).is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:  # a file bind (drivers are sometimes mounted file by file)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
        cfg["mounts"].append({"destination": mp, "type": "bind", "source": mp, "options": ["bind", "ro"]})
    devs, rules = [], [{"allow": False, "access": "rwm"}]
    for name in (*gpus, "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"):
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
    cfg["linux"]["namespaces"] = [n for n in cfg["linux"]["namespaces"] if n["type"] != "network"]
    if own_netns:  # a pod's: a network namespace the sandbox made, joined by path (else the host's)
        cfg["linux"]["namespaces"].append({"type": "network", "path": str(pod_netns(c.bundle / "netns"))})
    for f in ("ld.so.cache", "ld.so.conf"):
        if Path("/etc", f).exists():
            shutil.copy(Path("/etc", f), c.bundle / "rootfs" / "etc" / f)
    if Path("/etc/ld.so.conf.d").is_dir():
        shutil.copytree("/etc/ld.so.conf.d", c.bundle / "rootfs" / "etc" / "ld.so.conf.d", dirs_exist_ok=True)
    for name, text in files.items():
        (c.bundle / "rootfs" / name.lstrip("/")).write_text(text)
    shim.pin_mtimes(c.bundle / "rootfs")  # as an image's tar: else each container's rootfs is another image
    cfg["process"]["args"] = args
    cfg["process"]["env"] += [*(env or []), *ENV]  # the driver's libs; NVLink multicast off
    procfile = "/proc/driver/nvidia/params" if Path("/proc/driver/nvidia/params").exists() else "/proc/version"
    cfg["hooks"] = {"createContainer": [{"path": str(HOOK), "args": [HOOK.name, str(c.bundle / "rootfs"),
                                                                      hook_uuid_fmt, procfile], "timeout": 10}]}
    (c.bundle / "config.json").write_text(json.dumps(cfg))


_CLONE_NEWNET, _MS_BIND, _MNT_DETACH, _SIOCSIFFLAGS, _IFF_UP = 0x40000000, 0x1000, 2, 0x8914, 0x1


def pod_netns(path: Path) -> Path:
    """A network namespace with its loopback up, bind-mounted at `path`, as a pod sandbox's.

    Without `ip` (the GPU machine has none): a child unshares, sets lo up by ioctl and bind-mounts its
    own /proc/self/ns/net.  A restore then joins it by path as in a pod; a namespace of runc's own
    making would instead be re-created by CRIU, whose address restore runs `ip`."""
    libc = ctypes.CDLL(None, use_errno=True)
    path.touch()
    pid = os.fork()
    if pid == 0:
        try:
            if libc.unshare(_CLONE_NEWNET) != 0:  # os.unshare is 3.12+
                os._exit(1)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", _IFF_UP))
            if libc.mount(b"/proc/self/ns/net", str(path).encode(), None, _MS_BIND, None) != 0:
                os._exit(1)
            os._exit(0)
        except BaseException:  # noqa: BLE001 - the parent reports it
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert status == 0, f"could not make a network namespace at {path}"
    atexit.register(lambda: libc.umount2(str(path).encode(), _MNT_DETACH))
    return path


def node(tmp_path_factory: Any, name: str) -> shim.Node:
    """A private warmstart node under $WARMSTART_GPU_BASE (a disk of one's choice) or pytest's tmp.

    The GPU machine has no iptables, which CRIU's default network lock runs for every established TCP
    connection (NCCL's bootstrap has some): there the node says network_lock = "skip", safe here as both
    ends of each connection are processes of the dumped container, frozen together."""
    n = shim.Node(Path(os.environ.get("WARMSTART_GPU_BASE") or tmp_path_factory.mktemp(name)))
    if not shutil.which("iptables"):
        with open(n.config, "a") as f:
            f.write('network_lock = "skip"\n')
    return n


def cold_start(c: shim.Container, res: dict[str, Any]) -> dict[str, Any]:
    """create + start as the shim does; the worker's ready line; cold timings into `res`."""
    t = time.perf_counter()
    c.create()
    c.start()
    ready = c.readline(timeout=300)
    res["cold_start_to_ready_s"] = round(time.perf_counter() - t, 3)
    res["cold_worker_init_s"] = round(ready["init_s"], 3)
    return ready


def stop_with_dump(node: shim.Node, c: shim.Container, cid: str, res: dict[str, Any]) -> dict[str, Any]:
    """StopContainer (the dump), delete; the checkpoint must be complete. Its metadata, the dump's numbers into `res`."""
    t = time.perf_counter()
    p = c.stop()
    res["stop_with_dump_s"] = round(time.perf_counter() - t, 3)
    c.delete()
    assert p.returncode == 0, p.stderr
    ck = node.store / cid
    assert (ck / "checkpoint.done").is_file(), [r["msg"] for r in node.runtime_log()][-4:]
    meta = json.loads((ck / "metadata.json").read_text())
    res["dump_phases"] = meta["dump"]["phases"]
    res["dump_cuda"] = meta["dump"].get("cuda")
    res["gpu"] = meta.get("gpu")
    res["image_bytes"] = du(ck)
    return meta


def restore(node: shim.Node, c: shim.Container, res: dict[str, Any]) -> dict[str, Any]:
    """create (the restore) + start, then the first answer to `fwd`; timings and phases into `res`."""
    t = time.perf_counter()
    c.create()
    res["restore_create_s"] = round(time.perf_counter() - t, 3)
    c.start()
    t = time.perf_counter()
    after = c.ask("fwd")
    res["first_forward_after_restore_s"] = round(time.perf_counter() - t, 3)
    res["restore_to_first_forward_s"] = round(res["restore_create_s"] + res["first_forward_after_restore_s"], 3)
    res["restore_phases"] = restored_record(node, c).get("phases")
    return after


def restored_record(node: shim.Node, c: shim.Container) -> dict[str, Any]:
    """The runtime log's `restored from …` record of `c` (fails the test with the log's tail if none:
    a seeded worker that started cold would print the same forward)."""
    recs = [r for r in node.runtime_log()
            if str(r.get("msg", "")).startswith("restored from") and r.get("container") == c.id]
    assert recs, [r["msg"] for r in node.runtime_log()][-4:]
    return recs[-1]


def read_threads_line(node: shim.Node, c: shim.Container) -> str:
    """CRIU's own line on how it read the pages (warmstart's patch), or that it did not say."""
    log = node.base / "logs" / f"restore-{c.id}.log"
    lines = [x for x in log.read_text().splitlines() if "bytes of pages in" in x] if log.exists() else []
    return lines[-1].split(": ", 1)[-1] if lines else "single-threaded (no parallel-reads line)"


def du(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def write_results(res: dict[str, Any], suffix: str = "") -> None:
    """Print the results and write them to $WARMSTART_GPU_RESULTS (with `suffix` before .json) when set."""
    print(f"GPU_RESULTS{suffix} " + json.dumps(res))
    out = os.environ.get("WARMSTART_GPU_RESULTS")
    if out:
        p = Path(out)
        p.with_name(p.stem + suffix + p.suffix).write_text(json.dumps(res, indent=1))


def save_logs(node: shim.Node, name: str) -> None:
    """Keep a failed test's runtime and CRIU logs (one tarball in $WARMSTART_GPU_LOGS) before cleanup."""
    out = os.environ.get("WARMSTART_GPU_LOGS")
    if not out or not node.base.exists():
        return
    with tarfile.open(Path(out) / f"logs_{name}.tar.gz", "w:gz") as tar:
        if (node.base / "logs").is_dir():
            tar.add(node.base / "logs", arcname="logs")
        for log in sorted((node.base / "bundles").glob("*/log.json")):
            tar.add(log, arcname=f"bundles/{log.parent.name}/log.json")
        for log in sorted((node.base / "state").rglob("*.log")) if (node.base / "state").is_dir() else []:
            tar.add(log, arcname=str(log.relative_to(node.base)))
