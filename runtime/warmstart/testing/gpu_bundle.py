"""Turn a plain OCI spec into a GPU worker's, as the NVIDIA container toolkit would on a node.

Shared by `warmstart bench --gpu` and tests/gpu: the host's /usr, the torch
interpreter's prefixes and the driver's folder bound read-only (each host mount
its own bind, as the toolkit binds driver files one by one), the /dev/nvidia*
devices and their allow-list, the host's dynamic-linker cache, the environment
the lent machines require (NVLink multicast off), and a createContainer hook
that stands in for the toolkit's (a tmpfs at a fresh random path, bound over
/proc/driver/nvidia/params): what a restore must reproduce (docs/gpu.md).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

DEVICES = ("nvidia0", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools")
STD_DEVICES = ("null", "zero", "urandom", "random", "full", "tty")
IMAGE_MTIME = 1_700_000_000  # what this module writes into a rootfs gets one mtime, as a layer's tar gives
# LD_LIBRARY_PATH as NVIDIA's CUDA images set it.  Not the host's /usr/lib/x86_64-linux-gnu: the copied
# ld.so.cache finds the driver there, and ahead of torch's own libraries it loaded a system cuDNN older
# than torch's, which disabled cuDNN attention and made the 1.7B worker's generation 4x slower (0.93 s
# against 0.24 s on the host, H200).
ENV = ["LD_LIBRARY_PATH=/usr/local/nvidia/lib:/usr/local/nvidia/lib64",
       # multicast can take a shared host's GPUs out of service: off everywhere (the device notes)
       "NCCL_NVLS_ENABLE=0", "TORCH_SYMM_MEM_DISABLE_MULTICAST=1", "NVSHMEM_DISABLE_NVLS=1"]


def host_mounts(prefixes: tuple[str, ...], mountinfo: str | None = None) -> list[str]:
    """The host's mount points at or under `prefixes` (and each prefix that is a plain dir), parents first."""
    text = mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
    out: list[str] = []
    for line in text.splitlines():
        mp = line.split()[4].replace("\\040", " ")
        if any(mp == p or mp.startswith(p + "/") for p in prefixes) and mp not in out:
            out.append(mp)
    for p in prefixes:
        if p not in out and Path(p).is_dir():
            out.append(p)
    return sorted(out, key=lambda m: m.count("/"))


def python_prefixes(python: str) -> tuple[str, ...]:
    """Host dirs a container needs bound to run `python`: /usr, its venv, the interpreter it links to."""
    root = Path(python).parents[1]
    venv_root = str(root) if (root / "pyvenv.cfg").exists() or "/.venv/" in python or "/venv/" in python else None
    real_root = str(Path(os.path.realpath(python)).parents[1])
    return tuple(dict.fromkeys(("/usr", venv_root or "/usr", "/usr/local/nvidia",
                                real_root if not real_root.startswith("/usr") else "/usr")))


def _char_device(path: Path) -> tuple[int, int]:
    st = path.stat()
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def add_gpu(cfg: dict[str, Any], rootfs: Path, python: str, hook: Path, hook_fmt: str = "suffix") -> None:
    """Edit `cfg` (an OCI config) in place for a GPU worker run by `python`; mount targets go into `rootfs`."""
    cfg["mounts"] = [m for m in cfg["mounts"] if m["destination"] != "/usr"]
    for mp in host_mounts(tuple(p for p in python_prefixes(python) if Path(p).exists())):
        target = rootfs / mp.lstrip("/")
        if Path(mp).is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:  # a file bind (drivers are sometimes mounted file by file)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
        cfg["mounts"].append({"destination": mp, "type": "bind", "source": mp, "options": ["bind", "ro"]})
    devs, rules = [], [{"allow": False, "access": "rwm"}]
    for name in DEVICES:
        p = Path("/dev") / name
        if p.exists():
            major, minor = _char_device(p)
            devs.append({"path": str(p), "type": "c", "major": major, "minor": minor,
                         "fileMode": 0o666, "uid": 0, "gid": 0})
            rules.append({"allow": True, "type": "c", "major": major, "minor": minor, "access": "rwm"})
    for std in STD_DEVICES:
        major, minor = _char_device(Path("/dev", std))
        rules.append({"allow": True, "type": "c", "major": major, "minor": minor, "access": "rwm"})
    cfg["linux"]["devices"] = devs
    cfg["linux"]["resources"] = {"devices": rules}
    cfg["linux"]["namespaces"] = [n for n in cfg["linux"]["namespaces"] if n["type"] != "network"]  # no `ip` there
    (rootfs / "etc").mkdir(parents=True, exist_ok=True)
    for f in ("ld.so.cache", "ld.so.conf"):
        if Path("/etc", f).exists():
            shutil.copy(Path("/etc", f), rootfs / "etc" / f)
    if Path("/etc/ld.so.conf.d").is_dir():
        shutil.copytree("/etc/ld.so.conf.d", rootfs / "etc" / "ld.so.conf.d", dirs_exist_ok=True)
    cfg["process"]["env"] += ENV
    procfile = "/proc/driver/nvidia/params" if Path("/proc/driver/nvidia/params").exists() else "/proc/version"
    cfg["hooks"] = {"createContainer": [{"path": str(hook), "args": [hook.name, str(rootfs), hook_fmt, procfile],
                                         "timeout": 10}]}
    pin_mtimes(rootfs)


def pin_mtimes(rootfs: Path) -> None:
    """One mtime for every file of the rootfs: a restore is refused when the image's fingerprint (which
    holds file mtimes, runtime/warmstart/image_id.py) differs from the checkpoint's, and each container's copies
    and mount targets are written anew."""
    for dirpath, _dirs, files in os.walk(rootfs):
        for name in files:
            os.utime(Path(dirpath) / name, (IMAGE_MTIME, IMAGE_MTIME), follow_symlinks=False)


def bind_file(cfg: dict[str, Any], rootfs: Path, source: Path, destination: str) -> None:
    """Bind one host file read-only into the container (its mount target made in `rootfs`)."""
    target = rootfs / destination.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.touch()
    os.utime(target, (IMAGE_MTIME, IMAGE_MTIME))
    cfg["mounts"].append({"destination": destination, "type": "bind", "source": str(source),
                          "options": ["bind", "ro"]})
