"""GPU inventory and the GPU compatibility of a checkpoint.

The inventory comes from the kernel module's /proc/driver/nvidia files (about 1 ms), else from NVML
through ctypes (libnvidia-ml.so.1; nvmlInit alone takes about 100 ms on an H200, on create's path).
Dump and restore read it through the same `node_inventory`, so the two sides compare like with like.

Recorded at dump in metadata's `gpu` object: the GPUs the container sees
(those of its /dev/nvidia<N> devices, in the order its spec lists them; all,
by minor number, when it names none), with model name, UUID and minor number,
plus driver and CUDA versions.  At restore a node whose GPUs differ in model
or count, or whose driver differs, is refused before CRIU runs; the k-th GPU of
the checkpoint is remapped onto the k-th of the restoring container when their
UUIDs differ, by cuCheckpointProcessRestore's GPU pairs (cuda.py).
"""
from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path
from typing import Any

LIB_CANDIDATES = ("libnvidia-ml.so.1", "/usr/local/nvidia/lib64/libnvidia-ml.so.1",
                  "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1", "/usr/lib64/libnvidia-ml.so.1")
_DEV_RE = re.compile(r"^/dev/nvidia(\d+)$")


def spec_minors(spec: dict[str, Any]) -> list[int] | None:
    """Minor numbers of the GPUs in the container's spec (/dev/nvidia<N>), in the order the spec lists
    them (the device plugin's allocation order: the container's GPU order), None when it names none."""
    minors: dict[int, None] = {}
    for d in (spec.get("linux") or {}).get("devices") or []:
        m = _DEV_RE.match(str(d.get("path", "")))
        if m:
            minors.setdefault(int(d.get("minor", m.group(1))))
    for mnt in spec.get("mounts") or []:
        m = _DEV_RE.match(str(mnt.get("destination", "")))
        if m:
            minors.setdefault(int(m.group(1)))
    return list(minors) if minors else None


def _load_nvml() -> Any | None:
    cands = [os.environ["WARMSTART_LIBNVML"]] if os.environ.get("WARMSTART_LIBNVML") else list(LIB_CANDIDATES)
    for c in cands:
        try:
            return ctypes.CDLL(c)
        except OSError:
            continue
    return None


PROC_NVIDIA = Path("/proc/driver/nvidia")
_MODULE_VERSION_RE = re.compile(r"Kernel Module\b.*?\s(\d+\.\d+(?:\.\d+)?)\s")


def proc_inventory(root: Path | None = None) -> dict[str, Any] | None:
    """Every GPU of this node from the NVIDIA kernel module's /proc files, or None when they are absent
    or not as expected (then NVML answers).  GPUs in PCI bus order, as NVML numbers them; excluded
    GPUs (`GPU Excluded: Yes`) are left out, as NVML leaves them out."""
    root = PROC_NVIDIA if root is None else root
    try:
        m = _MODULE_VERSION_RE.search((root / "version").read_text())
        if not m:
            return None
        devices = []
        for d in sorted((root / "gpus").iterdir(), key=lambda p: p.name.lower()):
            info = {}
            for line in (d / "information").read_text().splitlines():
                key, sep, value = line.partition(":")
                if sep:
                    info[key.strip()] = value.strip()
            if info.get("GPU Excluded", "No").lower().startswith("y"):
                continue
            devices.append({"index": len(devices), "minor": int(info["Device Minor"]), "name": info["Model"],
                            "uuid": info["GPU UUID"]})
    except (OSError, KeyError, ValueError):
        return None
    if not devices or any(not d["uuid"].startswith("GPU-") for d in devices):
        return None  # e.g. a driver that hides UUIDs there: NVML knows
    return {"driver_version": m.group(1), "devices": devices}


def node_inventory(lib: Any | None = None) -> dict[str, Any] | None:
    """Every GPU of this node (/proc, else NVML), or None when there is no NVIDIA driver."""
    return (proc_inventory() if lib is None else None) or nvml_inventory(lib)


def nvml_inventory(lib: Any | None = None) -> dict[str, Any] | None:
    """Every GPU of this node via NVML, or None when there is no NVML (no driver)."""
    lib = lib or _load_nvml()
    if lib is None or lib.nvmlInit_v2() != 0:
        return None
    try:
        buf = ctypes.create_string_buffer(96)
        driver = buf.value.decode() if lib.nvmlSystemGetDriverVersion(buf, 96) == 0 else ""
        cv = ctypes.c_int(0)
        cuda = f"{cv.value // 1000}.{cv.value % 1000 // 10}" if lib.nvmlSystemGetCudaDriverVersion_v2(
            ctypes.byref(cv)) == 0 else ""
        n = ctypes.c_uint(0)
        if lib.nvmlDeviceGetCount_v2(ctypes.byref(n)) != 0:
            return None
        devices = []
        for i in range(n.value):
            h = ctypes.c_void_p()
            if lib.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(h)) != 0:
                continue
            name, uuid, minor = ctypes.create_string_buffer(96), ctypes.create_string_buffer(96), ctypes.c_uint(0)
            lib.nvmlDeviceGetName(h, name, 96)
            lib.nvmlDeviceGetUUID(h, uuid, 96)
            has_minor = lib.nvmlDeviceGetMinorNumber(h, ctypes.byref(minor)) == 0
            devices.append({"index": i, "minor": minor.value if has_minor else i,
                            "name": name.value.decode(errors="replace"), "uuid": uuid.value.decode(errors="replace")})
        return {"driver_version": driver, "cuda_version": cuda, "devices": devices}
    finally:
        lib.nvmlShutdown()


def for_container(inventory: dict[str, Any] | None, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The metadata `gpu` object: the node inventory narrowed to the GPUs the container sees."""
    if inventory is None:
        return None
    minors = spec_minors(spec)
    devs = [d for d in inventory["devices"] if minors is None or d["minor"] in minors]
    devs.sort(key=lambda d: d["minor"] if minors is None else minors.index(d["minor"]))  # the container's order
    cuda = {"cuda_version": inventory["cuda_version"]} if inventory.get("cuda_version") else {}
    return {"driver_version": inventory["driver_version"], **cuda,
            "count": len(devs), "models": sorted({d["name"] for d in devs}),
            "devices": [{"name": d["name"], "uuid": d["uuid"], "minor": d["minor"]} for d in devs]}


def incompatibility(dumped: dict[str, Any] | None, here: dict[str, Any] | None) -> str | None:
    """Why a checkpoint taken with GPUs `dumped` cannot be restored onto `here` (for_container of this node)."""
    if not dumped:
        return None
    if here is None:
        return (f"checkpoint holds CUDA state of {dumped.get('count')} x {', '.join(dumped.get('models') or [])}; "
                f"this node has no NVIDIA driver (NVML) or the container sees no GPU")
    if dumped.get("driver_version") != here.get("driver_version"):
        return f"checkpoint made with NVIDIA driver {dumped.get('driver_version')}, node has {here.get('driver_version')}"
    if dumped.get("count") != here.get("count"):
        return f"checkpoint used {dumped.get('count')} GPU(s), the restoring container sees {here.get('count')}"
    old = [d["name"] for d in dumped.get("devices") or []]
    new = [d["name"] for d in here.get("devices") or []]
    if old != new:
        return f"GPU models differ: checkpoint {old}, here {new}"
    return None


def gpu_pairs(dumped: dict[str, Any] | None, here: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(old UUID, new UUID) in device order, for cuCheckpointProcessRestore; empty when nothing moved."""
    if not dumped or not here:
        return []
    pairs = [(a["uuid"], b["uuid"]) for a, b in zip(dumped.get("devices") or [], here.get("devices") or [])]
    return pairs if any(a != b for a, b in pairs) else []
