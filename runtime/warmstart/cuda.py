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

Before any lock, CUDA state that the driver's checkpoint cannot carry (GPU memory
shared between processes: live NCCL communicators, IMEX channels) refuses the dump
(`shared_state`): the driver would checkpoint it, but no restore of it succeeds
(docs/gpu.md, driver 580), so the dump's time and image would only buy a cold start.

Nothing here runs for a container without an /dev/nvidia* device in its spec,
and nothing is loaded when libcuda is absent: zero cost for CPU containers.
"""
from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
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


class CudaRefused(RuntimeError):
    """The container's CUDA processes hold state the driver's checkpoint cannot carry; the message says what and the fix."""


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


def container_pids(rc: runc.Runc, container_id: str, timeout_s: float = 30) -> list[int]:
    """Host PIDs of every process of the container (`runc ps`; runc.RuncError when it fails)."""
    return rc.ps(container_id, timeout_s)


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


def checkpoint_pids(drv: Driver, pids: list[int], lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS,
                    refusal: Callable[[list[int]], str | None] | None = None) -> CudaSession:
    """Lock every CUDA process, then checkpoint each; on any failure undo what was done and raise.

    `refusal` (shared_state) is asked about the CUDA processes before any lock: a reason raises
    CudaRefused with nothing done, so nothing to undo."""
    s = CudaSession()
    s.pids = _timed(s.timings, "cuda_find", lambda: cuda_pids(drv, pids))
    why = _timed(s.timings, "cuda_shared_check", lambda: refusal(s.pids)) if refusal else None
    if why:
        raise CudaRefused(f"CUDA state the driver cannot checkpoint: {why}")
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
                 expected: int | None = None, before_each: Callable[[str], None] | None = None) -> CudaSession:
    """After `runc restore`: restore every process the driver reports as checkpointed, then unlock them all.

    A process unlocked while a peer is still checkpointed could start a collective whose other side
    has no GPU memory yet (a hang, or a read of garbage); once all are restored, the order of the
    unlocks does not matter (a locked process waits at the driver, not on a peer).  `expected` (the
    dump's count) is checked before anything is restored.  If a restore fails nothing is unlocked and
    CudaError is raised: the caller removes the restored container, none of its processes ran.
    `before_each(what)` runs before each driver restore and may raise to stop there (the create's budget:
    a driver call takes no deadline), with the same outcome.
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
            if before_each is not None:
                before_each(f"the CUDA restore of pid {pid}")
            _timed(s.timings, "cuda_restore", lambda: drv.restore(pid, gpu_pairs))
            s.restored.append(pid)
    for pid in s.pids:
        _timed(s.timings, "cuda_unlock", lambda: drv.unlock(pid))
    return s


# -- state the driver's checkpoint cannot carry --------------------------------
#
# Each signal is one cheap read of /proc per CUDA process (fd links, maps, the net namespace's unix
# socket table), present exactly while the shared state lives and gone once the worker tears it
# down (dist.destroy_process_group(): ncclCommDestroy/Abort unmaps, closes and unbinds all three).
# What the driver does with CUDA IPC itself (cudaIpcOpenMemHandle, cuMem handles passed over a
# socket, then closed) leaves no trace of its own in /proc; NCCL, which does it in every
# intra-node communicator, does.  Values a container controls (paths, socket names) are only compared.

IMEX_CHANNELS = "/dev/nvidia-caps-imex-channels/"  # fabric handles: multi-node NVLink, multicast (NVLS) via IMEX
NCCL_SHM = "/dev/shm/nccl-"         # ncclShmOpen: SHM transport buffers, the proxy's ops pool (cudaHostRegister'ed)
# NCCL >= 2.19: each communicator's proxy binds an abstract unix socket named by writing
# "/tmp/nccl-socket-<rank>-<hash>" and then a NUL over its first byte, so /proc/net/unix shows
# "@tmp/nccl-socket-…" (seen with NCCL 2.28.9 on the H200 x2); the "@/tmp/" form is accepted too.
NCCL_SOCKETS = ("@tmp/nccl-socket-", "@/tmp/nccl-socket-")
NCCL_SOCKET = NCCL_SOCKETS[0]
FIX_NCCL = ("destroy NCCL communicators in the warmstart.dev/pre-dump hook (torch: torch.cuda.synchronize(); "
            "dist.destroy_process_group()) and re-create them in warmstart.dev/post-restore; "
            "vLLM/SGLang: --disable-custom-all-reduce, NCCL_NVLS_ENABLE=0 (docs/gpu.md)")
FIX_IMEX = ("keep NVLink multicast and fabric memory off (NCCL_NVLS_ENABLE=0, NCCL_MNNVL_ENABLE=0) "
            "or destroy NCCL communicators in the warmstart.dev/pre-dump hook (docs/gpu.md)")


def _fd_targets(proc: Path, pid: int) -> list[str]:
    out = []
    try:
        names = os.listdir(proc / str(pid) / "fd")
    except OSError:
        return out
    for name in names:
        try:
            out.append(os.readlink(proc / str(pid) / "fd" / name))
        except OSError:
            continue  # closed meanwhile
    return out


def _mapped_paths(proc: Path, pid: int) -> set[str]:
    """The file of every mapping ("/dev/shm/nccl-Ab12Cd (deleted)" once unlinked: the suffix is cut)."""
    out = set()
    try:
        with open(proc / str(pid) / "maps", errors="replace") as f:
            for line in f:
                parts = line.rstrip("\n").split(maxsplit=5)
                if len(parts) == 6:
                    out.add(parts[5].removesuffix(" (deleted)"))
    except OSError:
        pass
    return out


def _unix_sockets(proc: Path, pid: int) -> dict[str, str]:
    """inode → bound path of the unix sockets in the process's net namespace (abstract ones start with @)."""
    out = {}
    try:
        with open(proc / str(pid) / "net" / "unix", errors="replace") as f:
            next(f, None)  # the header
            for line in f:
                parts = line.split()
                if len(parts) >= 8:  # Num RefCount Protocol Flags Type St Inode Path
                    out[parts[6]] = parts[7]
    except OSError:
        pass
    return out


def shared_state(pids: list[int], proc: Path = Path("/proc")) -> str | None:
    """Why these CUDA processes cannot be checkpointed by the driver, with the fix; None when nothing says so.

    - an IMEX channel open or mapped: fabric memory or multicast objects, which never restore;
    - NCCL shared memory mapped: a communicator with a peer (SHM transport, proxy ops pool);
    - NCCL's proxy socket bound in two or more of the processes: communicators between them, whose
      P2P buffers are CUDA IPC mappings of each other's GPU memory.  One process alone may hold a
      single-rank communicator (vLLM at TP=1), which carries nothing across processes.
    Measured on driver 580.159.04: with such state the dump succeeds but every restore fails
    (P2P on: CUDA_ERROR_NOT_SUPPORTED; off: CUDA_ERROR_UNKNOWN); after destroy_process_group none remains.
    """
    nccl_procs = []
    for pid in pids:
        fds = _fd_targets(proc, pid)
        maps = _mapped_paths(proc, pid)
        imex = sorted({p for p in (*fds, *maps) if p.startswith(IMEX_CHANNELS)})
        if imex:
            return f"pid {pid} has IMEX channel {imex[0]} open (fabric memory or multicast objects); fix: {FIX_IMEX}"
        shm = sorted({p for p in (*fds, *maps) if p.startswith(NCCL_SHM)})
        if shm:
            return (f"pid {pid} maps NCCL shared memory {shm[0]} (a live NCCL communicator with a peer); "
                    f"fix: {FIX_NCCL}")
        inodes = {t[len("socket:["):-1] for t in fds if t.startswith("socket:[") and t.endswith("]")}
        if inodes:
            socks = _unix_sockets(proc, pid)
            if any(socks.get(i, "").startswith(NCCL_SOCKETS) for i in inodes):
                nccl_procs.append(pid)
    if len(nccl_procs) >= 2:
        return (f"pids {', '.join(map(str, nccl_procs))} hold live NCCL communicators with each other "
                f"(NCCL's proxy socket {NCCL_SOCKET}…; their buffers are CUDA IPC mappings); fix: {FIX_NCCL}")
    return None


# -- the flows' entry points (dump.py, restore.py) ----------------------------

def checkpoint_container(rc: runc.Runc, container_id: str, spec: dict[str, Any],
                         refuse_shared: bool = True) -> tuple[Driver | None, CudaSession | None]:
    """Before `runc checkpoint`: move every CUDA process of the container out of the GPU.

    (None, None) when the container has no GPU device or the node no libcuda;
    raises CudaRefused (nothing done) when `refuse_shared` and the processes share GPU state
    across processes (`shared_state`), CudaError (after undoing) when a process cannot be
    locked or checkpointed.
    """
    if not Spec(spec).has_gpu:
        return None, None
    drv = Driver.load()
    if drv is None:
        return None, None
    t = time.perf_counter()
    pids = container_pids(rc, container_id)
    s = checkpoint_pids(drv, pids, refusal=shared_state if refuse_shared else None)
    s.timings["cuda_ps"] = round(time.perf_counter() - t - sum(s.timings.values()), 6)
    return drv, s


def restore_container(rc: runc.Runc, container_id: str, meta: dict[str, Any],
                      gpu_pairs: list[tuple[str, str]] | None = None, ps_timeout_s: float = 30,
                      before_each: Callable[[str], None] | None = None) -> CudaSession | None:
    """After `runc restore`: restore, then unlock, the CUDA processes (new host PIDs, from the restored container).
    `ps_timeout_s` bounds finding them, `before_each` is restore_pids'."""
    dumped = (meta.get("dump") or {}).get("cuda") or {}
    if not dumped.get("processes"):
        return None
    drv = Driver.load()
    if drv is None:
        raise CudaError("dlopen libcuda.so.1", 0, -1, "libcuda not found on this node")
    return restore_pids(drv, container_pids(rc, container_id, ps_timeout_s), gpu_pairs, expected=dumped["processes"],
                        before_each=before_each)
