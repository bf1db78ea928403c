"""cuda.py against a fake libcuda (tests/unit/fixtures/fake_libcuda.c) through real ctypes calls."""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from warmstart import cuda, runc
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
