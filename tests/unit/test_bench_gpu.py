"""`warmstart bench --gpu` without a GPU: its plan, the specs it writes, its hooks, and its results."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from warmstart import annotations, image_id
from warmstart.testing import bench, bench_gpu, gpu_bundle
from warmstart.testing.worker import gpuworker


def args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(["--gpu", *argv])


def test_plan_estimates_each_step_and_bounds_the_floors():
    plan = bench_gpu.make_plan(args("--preset", "1.7b"))
    assert plan.reps == 2 and plan.floor_reps == 1 and plan.kv_gb == 7.0
    labels = [s for s, _ in plan.steps]
    assert labels[0].startswith("cold start + dump (full") and any("restore (sleep, cache dropped)" in x for x in labels)
    assert 300 < plan.total() < 600, "the 1.7b default run is budgeted at about 8 minutes"
    small = bench_gpu.make_plan(args("--preset", "tiny", "--variants", "sleep", "--caches", "warm", "--reps", "1",
                                     "--no-floors"))
    assert [s for s, _ in small.steps] == ["cold start + dump (sleep, ~3.0 GB image)", "1 × restore (sleep, cache warm)"]
    with pytest.raises(ValueError, match="--variants: bogus"):
        bench_gpu.make_plan(args("--variants", "full,bogus"))
    with pytest.raises(ValueError, match="--reps"):
        bench_gpu.make_plan(args("--reps", "0"))


def test_cpu_bench_defaults_are_unchanged():
    a = args()
    a.gpu = False
    assert a.reps is None and a.pause is None  # resolved in bench.run: 5 and 2 s, as before


def test_sleep_hooks_parse_as_the_runtime_parses_them():
    ann = bench_gpu.annotations("sleep", "on-stop", "ck", 8123)
    hooks = annotations.worker_hooks(ann)
    assert (hooks.pre_dump.kind, hooks.pre_dump.method, hooks.pre_dump.url) == \
        ("http", "POST", "http://127.0.0.1:8123/sleep?level=1")
    assert (hooks.post_restore.method, hooks.post_restore.url) == ("POST", "http://127.0.0.1:8123/wake_up")
    assert hooks.timeout_s == 300
    assert "warmstart.dev/pre-dump" not in bench_gpu.annotations("full", "restore-only", "ck", 8123)


def test_worker_argv_is_one_the_worker_accepts():
    a = args("--preset", "8b", "--kv-cache-gb", "3.5", "--batch-sizes", "1,4", "--no-compile",
             "--sleep-offload-weights", "--new-tokens", "16")
    argv = bench_gpu.worker_args("/py", 9000, a)
    assert argv[:3] == ["/py", "-u", bench_gpu.WORKER_DST]
    w = gpuworker.parse_args(argv[3:])
    assert (w.preset, w.port, w.device, w.kv_cache_gb, w.batch_sizes, w.compile, w.sleep_offload_weights,
            w.new_tokens) == ("8b", 9000, "cuda", 3.5, [1, 4], False, True, 16)


def _bundle(base: Path, template: Path, edit) -> tuple[dict, Path]:
    rootfs = base / "rootfs"
    import shutil
    shutil.copytree(template, rootfs, symlinks=True)
    cfg = bench.spec(["x"], {}, "/c")
    edit(cfg, rootfs)
    return cfg, rootfs


def test_gpu_spec_binds_the_worker_and_keeps_one_image_fingerprint(tmp_path):
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\n")
    template = bench_gpu.make_template(tmp_path / "template")
    edit = bench_gpu.gpu_edit(sys.executable, hook, "cuda")
    cfg, rootfs_a = _bundle(tmp_path / "a", template, edit)
    time.sleep(1.1)  # later containers write their copies and mount targets at another second
    _, rootfs_b = _bundle(tmp_path / "b", template, edit)
    assert image_id.fingerprint(rootfs_a) == image_id.fingerprint(rootfs_b), \
        "restores would be refused: the image fingerprint holds file mtimes"
    binds = {m["destination"]: m for m in cfg["mounts"] if m["type"] == "bind"}
    assert binds[bench_gpu.WORKER_DST]["source"] == str(bench_gpu.WORKER_SRC)
    assert binds[bench_gpu.WORKER_DST]["options"] == ["bind", "ro"]
    assert (rootfs_a / bench_gpu.WORKER_DST.lstrip("/")).is_file()
    assert "/usr" in binds and "/dev/shm" in {m["destination"] for m in cfg["mounts"]}
    assert not any(n["type"] == "network" for n in cfg["linux"]["namespaces"])
    env = cfg["process"]["env"]
    assert {"HOME=/root", "USER=root", "NCCL_NVLS_ENABLE=0"} <= set(env) and any(e.startswith("LD_LIBRARY_PATH=")
                                                                                   for e in env)
    assert cfg["hooks"]["createContainer"][0]["args"][1:3] == [str(rootfs_a), "suffix"]
    cpu_cfg, _ = _bundle(tmp_path / "c", template, bench_gpu.gpu_edit(sys.executable, hook, "cpu"))
    assert not any(e.startswith("LD_LIBRARY_PATH=") for e in cpu_cfg["process"]["env"])


def test_python_prefixes_bind_a_venv_by_its_pyvenv_cfg(tmp_path):
    venv = tmp_path / "torchvenv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (venv / "bin" / "python").symlink_to(sys.executable)
    assert str(venv) in gpu_bundle.python_prefixes(str(venv / "bin" / "python"))


def test_host_mounts_lists_submounts_parents_first():
    info = "\n".join(f"1 2 0:1 / {mp} rw - x x rw" for mp in ("/usr/local/nvidia", "/usr", "/opt/torch/.venv",
                                                               "/var", "/usr/lib/x\\040y"))
    assert gpu_bundle.host_mounts(("/usr", "/opt/torch/.venv"), info) == \
        ["/usr", "/usr/local/nvidia", "/opt/torch/.venv", "/usr/lib/x y"]


def _variant() -> bench_gpu.Variant:
    v = bench_gpu.Variant("sleep", 1, "ck", image_bytes=6_500_000_000, gpu_bytes=4_000_000_000,
                          gpu_bytes_estimated=True)
    for k, xs in {"cold_first_gen_s": [80.0], "dump_s": [16.0], "restore_warm_first_gen_s": [4.0, 3.0],
                  "restore_warm_create_s": [3.5, 2.5], "h2d_pinned_s": [0.1], "write_fdatasync_s": [8.0]}.items():
        for x in xs:
            v.add(k, x)
    v.identical["warm"] = [True, True]
    v.restore_phases["warm"] = [{"verify": 0.01, "restore": 1.1, "cuda_restore": 1.6, "criu_restore_time": 900000},
                                {"verify": 0.01, "restore": 1.0, "cuda_restore": 1.4, "criu_restore_time": 700000}]
    v.dump_phases.append({"pre_dump_hook": 0.5, "cuda_checkpoint": 3.0, "cuda": {"processes": 1}})
    return v


def test_results_table_json_and_plot(tmp_path):
    gb = bench_gpu.GpuBench.__new__(bench_gpu.GpuBench)
    gb.variants, gb.batch_sizes = {"sleep": _variant()}, [1, 2]
    a = args("--preset", "tiny", "--variants", "sleep", "--caches", "warm")
    a.pause = 1.0
    res = bench_gpu.collect(gb, bench_gpu.make_plan(a), a, {"cores": 16}, 12.0)
    d = res["variants"]["sleep"]
    assert d["speedup_warm"]["median"] == pytest.approx((80 / 4 + 80 / 3) / 2)
    assert d["cuda_restore_warm_vs_h2d_pinned"]["median"] == pytest.approx(15.0)
    assert d["dump_vs_write_floor"]["median"] == 2.0
    assert d["restore_warm_phase_medians"] == {"verify": 0.01, "restore": pytest.approx(1.05),
                                              "cuda_restore": pytest.approx(1.5), "criu_restore_time": 0.8}
    text = bench_gpu.table(res)
    assert "| restore → first correct generation, warm | 3.500 s [3.000–4.000] n=2 |" in text
    assert "4.00 (est.: used − KV)" in text and "2/2; 0/0" in text
    json.dumps(res)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not bench_gpu.plot(res, tmp_path / "p.png")
    else:
        assert bench_gpu.plot(res, tmp_path / "p.png") and (tmp_path / "p.png").stat().st_size > 1000


def test_plot_in_another_interpreter(tmp_path):
    gb = bench_gpu.GpuBench.__new__(bench_gpu.GpuBench)
    gb.variants, gb.batch_sizes = {"sleep": _variant()}, [1]
    a = args("--preset", "tiny", "--variants", "sleep", "--caches", "warm")
    a.pause = 1.0
    res = json.loads(json.dumps(bench_gpu.collect(gb, bench_gpu.make_plan(a), a, {}, 1.0)))
    has_mpl = subprocess.run([sys.executable, "-c", "import matplotlib"]).returncode == 0
    assert bench_gpu.plot_with(sys.executable, res, tmp_path / "p.png") == has_mpl
    assert (tmp_path / "p.png").exists() == has_mpl


def test_drain_keeps_the_tail_of_a_workers_output():
    r, w = os.pipe()
    os.set_blocking(r, False)
    d = bench_gpu.Drain([r])
    os.write(w, b"gpuworker starting\ngpuworker ready port=1 cold_start_s=2.0\npartial")
    os.close(w)
    d.thread.join(timeout=5)
    d.close()
    os.close(r)
    assert d.find("gpuworker ready") == "gpuworker ready port=1 cold_start_s=2.0"
    assert d.tail(1) == "gpuworker ready port=1 cold_start_s=2.0"
