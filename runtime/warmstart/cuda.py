"""CUDA state of a container's processes, through the driver's checkpoint API (libcuda.so.1, ctypes).

Around `runc checkpoint`: lock every process of the container that holds CUDA
state, then checkpoint each (the driver moves its GPU memory into host memory and
releases every /dev/nvidia* fd and mapping, so CRIU sees a plain process).  After
`runc restore`: restore every one, then unlock every one, found again by host PID
in the restored container (host PIDs change on restore).  All-then-all both ways:
no process runs CUDA work while a peer's GPU state is away, so none can enter a
collective (an NCCL all-reduce, a CUDA IPC read) whose other side is not there.
Called from a separate process (the runtime); no cuInit is needed in the caller
(benchmarks/gpu_results.md, tests/gpu/).

Nothing here runs for a container without an /dev/nvidia* device in its spec,
and nothing is loaded when libcuda is absent: zero cost for CPU containers.
"""
from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import runc
from .spec import Spec

# CUprocessState
RUNNING, LOCKED, CHECKPOINTED, FAILED = 0, 1, 2, 3
STATE_NAMES = {RUNNING: "running", LOCKED: "locked", CHECKPOINTED: "checkpointed", FAILED: "failed"}
LIB_CANDIDATES = ("libcuda.so.1", "/usr/local/nvidia/lib64/libcuda.so.1", "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
                  "/usr/lib64/libcuda.so.1")
DEFAULT_LOCK_TIMEOUT_MS = 30_000


class CudaError(RuntimeError):
    """A driver call failed; the message names the call, the PID and CUDA's error name."""

    def __init__(self, call: str, pid: int, code: int, name: str):
        super().__init__(f"{call}(pid {pid}) failed: {name} ({code})")
        self.call, self.pid, self.code, self.name = call, pid, code, name


class CUcheckpointLockArgs(ctypes.Structure):
    _fields_ = [("timeoutMs", ctypes.c_uint), ("reserved0", ctypes.c_uint), ("reserved1", ctypes.c_uint64 * 7)]


class CUuuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_char * 16)]


class CUcheckpointGpuPair(ctypes.Structure):
    _fields_ = [("oldUuid", CUuuid), ("newUuid", CUuuid)]


class CUcheckpointRestoreArgs(ctypes.Structure):
    # 64 bytes in every cuda.h that has it: the pair array and its count first, the rest zeroed.
    _fields_ = [("gpuPairs", ctypes.POINTER(CUcheckpointGpuPair)), ("gpuPairsCount", ctypes.c_uint),
                ("reserved", ctypes.c_char * 52)]


assert ctypes.sizeof(CUcheckpointLockArgs) == 64 and ctypes.sizeof(CUcheckpointRestoreArgs) == 64


def uuid_bytes(uuid: str) -> bytes:
    """'GPU-xxxxxxxx-xxxx-...' (NVML/nvidia-smi form) → the 16 raw bytes of a CUuuid."""
    hexs = uuid.removeprefix("GPU-").replace("-", "")
    if len(hexs) != 32:
        raise ValueError(f"GPU UUID {uuid!r}: expected 32 hex digits")
    return bytes.fromhex(hexs)


class Driver:
    """The checkpoint entry points of libcuda, each raising CudaError with CUDA's error name."""

    def __init__(self, lib: Any):
        self.lib = lib
        for fn in ("cuCheckpointProcessGetState", "cuCheckpointProcessLock", "cuCheckpointProcessCheckpoint",
                   "cuCheckpointProcessRestore", "cuCheckpointProcessUnlock"):
            getattr(lib, fn).restype = ctypes.c_int
        lib.cuGetErrorName.restype = ctypes.c_int

    @classmethod
    def load(cls, path: str | None = None) -> "Driver | None":
        """The driver, or None when libcuda (or its checkpoint API: driver < 550) is absent."""
        cands = [path] if path else ([os.environ["WARMSTART_LIBCUDA"]] if os.environ.get("WARMSTART_LIBCUDA")
                                     else list(LIB_CANDIDATES))
        for c in cands:
            try:
                lib = ctypes.CDLL(c)
                lib.cuCheckpointProcessGetState  # noqa: B018 - AttributeError on drivers without the API
                return cls(lib)
            except (OSError, AttributeError):
                continue
        return None

    def error_name(self, code: int) -> str:
        s = ctypes.c_char_p()
        if self.lib.cuGetErrorName(code, ctypes.byref(s)) == 0 and s.value:
            return s.value.decode(errors="replace")
        return f"CUDA error {code}"

    def _check(self, call: str, pid: int, code: int) -> None:
        if code != 0:
            raise CudaError(call, pid, code, self.error_name(code))

    def state(self, pid: int) -> int:
        st = ctypes.c_int(-1)
        self._check("cuCheckpointProcessGetState", pid, self.lib.cuCheckpointProcessGetState(pid, ctypes.byref(st)))
        return st.value

    def lock(self, pid: int, timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS) -> None:
        args = CUcheckpointLockArgs(timeoutMs=timeout_ms)
        self._check("cuCheckpointProcessLock", pid, self.lib.cuCheckpointProcessLock(pid, ctypes.byref(args)))

    def checkpoint(self, pid: int) -> None:
        self._check("cuCheckpointProcessCheckpoint", pid, self.lib.cuCheckpointProcessCheckpoint(pid, None))

    def restore(self, pid: int, gpu_pairs: list[tuple[str, str]] | None = None) -> None:
        args = CUcheckpointRestoreArgs()
        pairs = [(a, b) for a, b in gpu_pairs or [] if a != b]
        if pairs:  # remap only when a device differs; then the array must name every checkpointed GPU
            arr = (CUcheckpointGpuPair * len(gpu_pairs))()
            for i, (old, new) in enumerate(gpu_pairs or []):
                arr[i].oldUuid.bytes, arr[i].newUuid.bytes = uuid_bytes(old), uuid_bytes(new)
            args.gpuPairs, args.gpuPairsCount = ctypes.cast(arr, ctypes.POINTER(CUcheckpointGpuPair)), len(arr)
        self._check("cuCheckpointProcessRestore", pid, self.lib.cuCheckpointProcessRestore(pid, ctypes.byref(args)))

    def unlock(self, pid: int) -> None:
        self._check("cuCheckpointProcessUnlock", pid, self.lib.cuCheckpointProcessUnlock(pid, None))


def container_pids(rc: runc.Runc, container_id: str) -> list[int]:
    """Host PIDs of every process of the container (`runc ps`; runc.RuncError when it fails)."""
    return rc.ps(container_id)


@dataclass
class CudaSession:
    """What a checkpoint did, so it can be undone (or reported)."""
    pids: list[int] = field(default_factory=list)        # CUDA processes found (host PIDs)
    locked: list[int] = field(default_factory=list)
    checkpointed: list[int] = field(default_factory=list)
    restored: list[int] = field(default_factory=list)     # after `runc restore`: GPU state back, still locked
    timings: dict[str, float] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        return {"processes": len(self.pids), "phases": dict(self.timings)}


def _timed(timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    t = time.perf_counter()
    try:
        return fn()
    finally:
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t, 6)


def cuda_pids(drv: Driver, pids: list[int]) -> list[int]:
    """The PIDs that hold CUDA state: GetState answers for them (a wrapper shell gets an error)."""
    out = []
    for pid in pids:
        try:
            drv.state(pid)
            out.append(pid)
        except CudaError:
            continue
    return out


def checkpoint_pids(drv: Driver, pids: list[int], lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS) -> CudaSession:
    """Lock every CUDA process, then checkpoint each; on any failure undo what was done and raise."""
    s = CudaSession()
    s.pids = _timed(s.timings, "cuda_find", lambda: cuda_pids(drv, pids))
    try:
        for pid in s.pids:  # lock all first: no process may run CUDA work while another is being moved out
            _timed(s.timings, "cuda_lock", lambda: drv.lock(pid, lock_timeout_ms))
            s.locked.append(pid)
        for pid in s.pids:
            _timed(s.timings, "cuda_checkpoint", lambda: drv.checkpoint(pid))
            s.checkpointed.append(pid)
    except CudaError:
        undo(drv, s)
        raise
    return s


def undo(drv: Driver, s: CudaSession) -> list[str]:
    """Put the processes back as they were (restore what was checkpointed, unlock what was locked)."""
    errors = []
    for pid in reversed(s.checkpointed):
        try:
            _timed(s.timings, "cuda_undo_restore", lambda: drv.restore(pid))
        except CudaError as e:
            errors.append(str(e))
    for pid in reversed(s.locked):
        try:
            _timed(s.timings, "cuda_undo_unlock", lambda: drv.unlock(pid))
        except CudaError as e:
            errors.append(str(e))
    s.checkpointed, s.locked = [], []
    return errors


def restore_pids(drv: Driver, pids: list[int], gpu_pairs: list[tuple[str, str]] | None = None,
                 expected: int | None = None) -> CudaSession:
    """After `runc restore`: restore every process the driver reports as checkpointed, then unlock them all.

    A process unlocked while a peer is still checkpointed could start a collective whose other side
    has no GPU memory yet (a hang, or a read of garbage); once all are restored, the order of the
    unlocks does not matter (a locked process waits at the driver, not on a peer).  `expected` (the
    dump's count) is checked before anything is restored.  If a restore fails nothing is unlocked and
    CudaError is raised: the caller removes the restored container, none of its processes ran.
    """
    s = CudaSession()
    states: dict[int, int] = {}
    for pid in pids:
        try:
            st = drv.state(pid)
        except CudaError:
            continue  # not a CUDA process
        if st in (CHECKPOINTED, LOCKED):
            states[pid] = st
    s.pids = list(states)
    if expected is not None and len(s.pids) != expected:
        raise RuntimeError(f"checkpoint holds {expected} CUDA process(es); {len(s.pids)} found in the restored container")
    for pid in s.pids:
        if states[pid] == CHECKPOINTED:
            _timed(s.timings, "cuda_restore", lambda: drv.restore(pid, gpu_pairs))
            s.restored.append(pid)
    for pid in s.pids:
        _timed(s.timings, "cuda_unlock", lambda: drv.unlock(pid))
    return s


# -- the flows' entry points (dump.py, restore.py) ----------------------------

def checkpoint_container(rc: runc.Runc, container_id: str,
                         spec: dict[str, Any]) -> tuple[Driver | None, CudaSession | None]:
    """Before `runc checkpoint`: move every CUDA process of the container out of the GPU.

    (None, None) when the container has no GPU device or the node no libcuda;
    raises CudaError (after undoing) when a process cannot be locked or checkpointed.
    """
    if not Spec(spec).has_gpu:
        return None, None
    drv = Driver.load()
    if drv is None:
        return None, None
    t = time.perf_counter()
    pids = container_pids(rc, container_id)
    s = checkpoint_pids(drv, pids)
    s.timings["cuda_ps"] = round(time.perf_counter() - t - sum(s.timings.values()), 6)
    return drv, s


def restore_container(rc: runc.Runc, container_id: str, meta: dict[str, Any],
                      gpu_pairs: list[tuple[str, str]] | None = None) -> CudaSession | None:
    """After `runc restore`: restore, then unlock, the CUDA processes (new host PIDs, from the restored container)."""
    dumped = (meta.get("dump") or {}).get("cuda") or {}
    if not dumped.get("processes"):
        return None
    drv = Driver.load()
    if drv is None:
        raise CudaError("dlopen libcuda.so.1", 0, -1, "libcuda not found on this node")
    return restore_pids(drv, container_pids(rc, container_id), gpu_pairs, expected=dumped["processes"])
