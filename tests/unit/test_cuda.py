"""cuda.py against a fake libcuda (tests/unit/fixtures/fake_libcuda.c) through real ctypes calls."""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from warmstart import cuda, runc
from warmstart.budget import BudgetSpent
from warmstart.spec import Spec

SRC = Path(__file__).parent / "fixtures" / "fake_libcuda.c"


@pytest.fixture(scope="module")
def libpath(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler to build the fake libcuda")
    out = tmp_path_factory.mktemp("fakecuda") / "libcuda.so.1"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(out), str(SRC)], check=True)
    return out


@pytest.fixture
def drv(libpath, monkeypatch):
    def make(pids="100,102", fail=None):
        monkeypatch.setenv("FAKE_CUDA_PIDS", pids)
        if fail:
            monkeypatch.setenv("FAKE_CUDA_FAIL", fail)
        else:
            monkeypatch.delenv("FAKE_CUDA_FAIL", raising=False)
        d = cuda.Driver.load(str(libpath))
        d.lib.fake_reset()
        return d
    return make


def test_structs_match_cuda_h():
    assert ctypes.sizeof(cuda.CUcheckpointLockArgs) == 64
    assert ctypes.sizeof(cuda.CUcheckpointRestoreArgs) == 64
    assert ctypes.sizeof(cuda.CUcheckpointGpuPair) == 32
    assert cuda.uuid_bytes("GPU-01234567-89ab-cdef-0123-456789abcdef") == bytes.fromhex("0123456789abcdef0123456789abcdef")
    with pytest.raises(ValueError):
        cuda.uuid_bytes("GPU-123")


def test_load_absent_is_none(tmp_path):
    assert cuda.Driver.load(str(tmp_path / "nope.so")) is None


def test_gpu_only_with_nvidia_devices():
    assert not Spec({"linux": {"devices": [{"path": "/dev/fuse"}]}}).has_gpu
    assert Spec({"linux": {"devices": [{"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0}]}}).has_gpu
    assert Spec({"mounts": [{"destination": "/dev/nvidiactl", "type": "bind", "source": "/dev/nvidiactl"}]}).has_gpu
    assert not Spec({}).has_gpu


def test_checkpoint_a_process_tree_and_restore(drv):
    d = drv()
    s = cuda.checkpoint_pids(d, [1, 100, 101, 102], lock_timeout_ms=1234)
    assert s.pids == [100, 102], "the wrapper (1) and a non-CUDA child (101) are skipped"
    assert d.state(100) == cuda.CHECKPOINTED and d.state(102) == cuda.CHECKPOINTED
    assert ctypes.c_uint.in_dll(d.lib, "last_lock_timeout").value == 1234
    assert {"cuda_find", "cuda_lock", "cuda_checkpoint"} <= set(s.timings)
    assert s.metadata()["processes"] == 2
    r = cuda.restore_pids(d, [1, 100, 101, 102])
    assert r.pids == [100, 102] and {"cuda_restore", "cuda_unlock"} <= set(r.timings)
    assert d.state(100) == cuda.RUNNING and d.state(102) == cuda.RUNNING


def calls(d) -> str:
    return ctypes.c_char_p(ctypes.addressof(ctypes.c_char.in_dll(d.lib, "call_log"))).value.decode()


def test_all_are_locked_then_checkpointed_and_all_restored_then_unlocked(drv):
    """No process may run CUDA work while a peer's GPU state is away (a collective in flight would hang)."""
    d = drv("100,102,104")
    cuda.checkpoint_pids(d, [100, 101, 102, 104])
    assert calls(d) == "lock:100 lock:102 lock:104 checkpoint:100 checkpoint:102 checkpoint:104"
    d.lib.fake_clear_log()
    r = cuda.restore_pids(d, [100, 101, 102, 104], expected=3)
    assert calls(d) == "restore:100 restore:102 restore:104 unlock:100 unlock:102 unlock:104"
    assert r.pids == r.restored == [100, 102, 104]
    assert all(d.state(p) == cuda.RUNNING for p in (100, 102, 104))


def test_a_failed_restore_unlocks_nothing(drv):
    d = drv("100,102,104", fail="restore:102")
    cuda.checkpoint_pids(d, [100, 102, 104])
    d.lib.fake_clear_log()
    with pytest.raises(cuda.CudaError, match=r"cuCheckpointProcessRestore\(pid 102\)"):
        cuda.restore_pids(d, [100, 102, 104])
    assert "unlock" not in calls(d) and "restore:104" not in calls(d)
    assert d.state(100) == cuda.LOCKED, "restored but held: the caller removes the container, nothing ran"
    assert d.state(102) == d.state(104) == cuda.CHECKPOINTED


def test_a_spent_create_budget_stops_between_processes_and_unlocks_nothing(drv):
    """A driver restore takes no deadline: the create's budget is checked before each, and stops as a failure does."""
    d = drv("100,102,104")
    cuda.checkpoint_pids(d, [100, 102, 104])
    d.lib.fake_clear_log()
    asked: list[str] = []

    def before_each(what: str) -> None:
        asked.append(what)
        if len(asked) == 2:
            raise BudgetSpent(f"create_budget_s = 100 in the config spent before {what}")
    with pytest.raises(BudgetSpent, match="before the CUDA restore of pid 102"):
        cuda.restore_pids(d, [100, 102, 104], before_each=before_each)
    assert calls(d) == "restore:100", "no driver restore past the budget, and nothing unlocked"
    assert d.state(100) == cuda.LOCKED and d.state(102) == d.state(104) == cuda.CHECKPOINTED


def test_a_missing_process_is_found_before_anything_is_restored(drv):
    d = drv("100,102")
    cuda.checkpoint_pids(d, [100, 102])
    d.lib.fake_clear_log()
    with pytest.raises(RuntimeError, match=r"holds 3 CUDA process\(es\); 2 found"):
        cuda.restore_pids(d, [100, 102], expected=3)
    assert calls(d) == "" and d.state(100) == d.state(102) == cuda.CHECKPOINTED


def test_error_names_come_from_the_driver(drv):
    d = drv()
    with pytest.raises(cuda.CudaError) as e:
        d.unlock(100)  # not locked
    assert "CUDA_ERROR_INVALID_CONTEXT" in str(e.value) and "cuCheckpointProcessUnlock(pid 100)" in str(e.value)
    with pytest.raises(cuda.CudaError, match="CUDA_ERROR_NOT_INITIALIZED"):
        d.state(5)


def test_failed_checkpoint_undoes_everything(drv):
    d = drv(fail="checkpoint:102")
    with pytest.raises(cuda.CudaError, match="CUDA_ERROR_INVALID_VALUE"):
        cuda.checkpoint_pids(d, [100, 102])
    assert d.state(100) == cuda.RUNNING and d.state(102) == cuda.RUNNING, "the container keeps running on the GPU"


def test_failed_lock_unlocks_the_others(drv):
    d = drv(fail="lock:102")
    with pytest.raises(cuda.CudaError):
        cuda.checkpoint_pids(d, [100, 102])
    assert d.state(100) == cuda.RUNNING


def test_undo_after_a_failed_runc_checkpoint(drv):
    d = drv()
    s = cuda.checkpoint_pids(d, [100, 102])
    assert cuda.undo(d, s) == []
    assert d.state(100) == cuda.RUNNING and d.state(102) == cuda.RUNNING


def test_restore_with_gpu_remap(drv):
    d = drv("100")
    cuda.checkpoint_pids(d, [100])
    old, new = "GPU-11111111-2222-3333-4444-555555555555", "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    cuda.restore_pids(d, [100], [(old, new)])
    assert ctypes.c_uint.in_dll(d.lib, "last_pairs").value == 1
    assert bytes((ctypes.c_char * 16).in_dll(d.lib, "last_pair_new")) == cuda.uuid_bytes(new)
    assert bytes((ctypes.c_char * 16).in_dll(d.lib, "last_pair_old")) == cuda.uuid_bytes(old)
    cuda.checkpoint_pids(d, [100])
    cuda.restore_pids(d, [100], [(old, old)])  # same device: no remap array
    assert ctypes.c_uint.in_dll(d.lib, "last_pairs").value == 0


def test_restore_container_counts_processes(drv, monkeypatch):
    d = drv("100")
    cuda.checkpoint_pids(d, [100])
    monkeypatch.setattr(cuda.Driver, "load", classmethod(lambda cls, path=None: d))
    monkeypatch.setattr(cuda, "container_pids", lambda *a: [7, 100])
    meta = {"dump": {"cuda": {"processes": 1}}}
    s = cuda.restore_container(runc.Runc(Path("/x")), "c", meta)
    assert s.pids == [100] and d.state(100) == cuda.RUNNING
    assert cuda.restore_container(runc.Runc(Path("/x")), "c", {"dump": {}}) is None
    with pytest.raises(RuntimeError, match="holds 2 CUDA process"):
        cuda.restore_container(runc.Runc(Path("/x")), "c", {"dump": {"cuda": {"processes": 2}}})


def test_checkpoint_container_skips_cpu_containers(monkeypatch):
    monkeypatch.setattr(cuda.Driver, "load", classmethod(lambda cls, path=None: pytest.fail("libcuda loaded")))
    assert cuda.checkpoint_container(runc.Runc(Path("/x")), "c", {"linux": {"devices": []}}) == (None, None)


# -- shared_state: what the driver's checkpoint cannot carry, read from a fake /proc -----------------

UNIX_HEADER = "Num       RefCount Protocol Flags    Type St Inode Path\n"
CUDA_MAPS = ("7f0000000000-7f0000200000 rw-s 00000000 00:05 1023  /dev/nvidiactl\n"
             "7f0000200000-7f0000400000 rw-s 00000000 00:05 1030  /dev/nvidia-uvm\n"
             "7f1000000000-7f1000021000 rw-p 00000000 00:00 0 \n"
             "7f2000000000-7f2000010000 r-xp 00000000 08:01 55   /usr/lib/x86_64-linux-gnu/libcuda.so.1\n")


def fake_proc(root: Path, pid: int, fds: dict[str, str] | None = None, maps: str = CUDA_MAPS,
              unix: dict[str, str] | None = None) -> None:
    """/proc/<pid> as the checks read it: fd links, maps, the net namespace's unix socket table."""
    d = root / str(pid)
    (d / "fd").mkdir(parents=True)
    (d / "net").mkdir()
    base = {"0": "/dev/null", "1": "pipe:[77]", "2": "pipe:[77]", "3": "/dev/nvidiactl", "4": "/dev/nvidia0",
            "5": "/dev/nvidia-uvm", "6": "socket:[500]", "7": "anon_inode:[eventfd]"}
    for fd, target in {**base, **(fds or {})}.items():
        (d / "fd" / fd).symlink_to(target)
    (d / "maps").write_text(maps)
    rows = {"500": "@/tmp/.X11-unix/X0", "501": "/run/app.sock", **(unix or {})}
    (d / "net" / "unix").write_text(UNIX_HEADER + "".join(
        f"0000000000000000: 00000002 00000000 00010000 0001 01 {ino} {path}\n" for ino, path in rows.items())
        + "0000000000000000: 00000003 00000000 00000000 0001 03 999\n")  # an unbound socket: no path


def test_a_plain_cuda_process_and_a_single_rank_communicator_are_not_refused(tmp_path):
    fake_proc(tmp_path, 100)
    fake_proc(tmp_path, 102, fds={"9": "socket:[600]"}, unix={"600": "@/tmp/nccl-socket-0-8a7f3c"})
    fake_proc(tmp_path, 104, maps=CUDA_MAPS + "7f3000000000-7f3000100000 rw-s 00000000 00:1a 88 /dev/shm/psm_1a2b\n")
    assert cuda.shared_state([100, 102, 104], tmp_path) is None, \
        "one process with NCCL's socket (TP=1), another with non-NCCL shared memory: nothing crosses processes"
    assert cuda.shared_state([100, 4242], tmp_path) is None, "a process gone meanwhile is not an error"


@pytest.mark.parametrize("prefix", ["@tmp/nccl-socket-", "@/tmp/nccl-socket-"])
def test_nccl_communicators_between_two_processes_are_refused_with_the_fix(tmp_path, prefix):
    """Each rank's proxy binds its abstract socket (no NCCL file in /dev/shm with NCCL 2.28, P2P on or
    off).  NCCL 2.28.9 on the H200 x2 shows as "@tmp/nccl-socket-0-cd77…@@@…" (NUL padding as @)."""
    pad = "@" * 40
    fake_proc(tmp_path, 100, fds={"9": "socket:[600]"}, unix={"600": f"{prefix}0-8a7f3c{pad}", "601": "@/x"})
    fake_proc(tmp_path, 102, fds={"11": "socket:[601]"}, unix={"600": f"{prefix}0-8a7f3c{pad}",
                                                               "601": f"{prefix}1-8a7f3c{pad}"})
    why = cuda.shared_state([100, 102], tmp_path)
    assert why is not None and why.startswith("pids 100, 102 hold live NCCL communicators with each other")
    assert "destroy NCCL communicators in the warmstart.dev/pre-dump hook" in why
    assert "--disable-custom-all-reduce" in why and "\n" not in why, "one log line"


def test_nccl_shared_memory_is_refused_mapped_or_open(tmp_path):
    """P2P off: the SHM transport's buffers, mapped (unlinked once every rank attached) or held open."""
    fake_proc(tmp_path, 100, maps=CUDA_MAPS + "7f4000000000-7f4000401000 rw-s 00000000 00:1a 91 "
                                              "/dev/shm/nccl-Ab12Cd (deleted)\n")
    why = cuda.shared_state([100], tmp_path)
    assert why and why.startswith("pid 100 maps NCCL shared memory /dev/shm/nccl-Ab12Cd (a live NCCL communicator")
    fake_proc(tmp_path, 102, fds={"12": "/dev/shm/nccl-Zz99Yy"})
    assert "pid 102 maps NCCL shared memory /dev/shm/nccl-Zz99Yy" in cuda.shared_state([102], tmp_path)


def test_an_imex_channel_is_refused_with_the_multicast_fix(tmp_path):
    fake_proc(tmp_path, 100, fds={"20": "/dev/nvidia-caps-imex-channels/channel0"})
    why = cuda.shared_state([100], tmp_path)
    assert why and why.startswith("pid 100 has IMEX channel /dev/nvidia-caps-imex-channels/channel0 open")
    assert "NCCL_NVLS_ENABLE=0" in why


def test_names_are_compared_not_followed(tmp_path):
    """A container names its own files and sockets: look-alikes elsewhere say nothing."""
    fake_proc(tmp_path, 100, fds={"9": "/data/dev/shm/nccl-x", "10": "socket:[600]"},
              maps=CUDA_MAPS + "7f4000000000-7f4000001000 rw-p 00000000 00:1a 91 /tmp/nccl-socket-0-1\n",
              unix={"600": "/tmp/nccl-socket-0-1"})  # a path-bound socket, not NCCL's abstract one
    fake_proc(tmp_path, 102, fds={"10": "socket:[600]"}, unix={"600": "/tmp/nccl-socket-0-1"})
    assert cuda.shared_state([100, 102], tmp_path) is None


def test_a_refusal_comes_before_any_lock(drv, tmp_path):
    d = drv("100,102")
    fake_proc(tmp_path, 100, fds={"12": "/dev/shm/nccl-Zz99Yy"})
    fake_proc(tmp_path, 102)
    with pytest.raises(cuda.CudaRefused, match=r"^CUDA state the driver cannot checkpoint: pid 100 maps NCCL"):
        cuda.checkpoint_pids(d, [1, 100, 102], refusal=lambda pids: cuda.shared_state(pids, tmp_path))
    assert calls(d) == "" and d.state(100) == d.state(102) == cuda.RUNNING, "nothing locked: nothing to undo"
    s = cuda.checkpoint_pids(d, [1, 100, 102], refusal=lambda pids: None)
    assert s.checkpointed == [100, 102] and "cuda_shared_check" in s.timings


def test_checkpoint_container_asks_only_when_told(drv, monkeypatch):
    d = drv("100")
    monkeypatch.setattr(cuda.Driver, "load", classmethod(lambda cls, path=None: d))
    monkeypatch.setattr(cuda, "container_pids", lambda *a: [1, 100])
    seen = []
    monkeypatch.setattr(cuda, "shared_state", lambda pids, proc=None: seen.append(pids) or "pid 100 maps x; fix: y")
    gpu_spec = {"linux": {"devices": [{"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0}]}}
    with pytest.raises(cuda.CudaRefused):
        cuda.checkpoint_container(runc.Runc(Path("/x")), "c", gpu_spec)
    assert seen == [[100]], "asked about the CUDA processes only, and by default"
    _, s = cuda.checkpoint_container(runc.Runc(Path("/x")), "c", gpu_spec, refuse_shared=False)
    assert s.checkpointed == [100] and seen == [[100]], "cuda_ipc = \"try\": not asked"


def test_cuda_ipc_config_key(tmp_path):
    from warmstart import config
    cfg = tmp_path / "c.toml"
    assert config.load(cfg).cuda_ipc == "refuse", "refused by default"
    cfg.write_text('cuda_ipc = "try"\n')
    assert config.load(cfg).cuda_ipc == "try"
    cfg.write_text('cuda_ipc = "off"\n')
    with pytest.raises(config.ConfigError, match="cuda_ipc must be one of refuse, try"):
        config.load(cfg)
