"""Soak: N create → stop → delete cycles through the runtime (the first checkpoints, the rest restore).

After the cycles, file descriptors, processes, mounts, cgroups, runc state, warmstart state, store temp
dirs and store size are back to their values after the first cycle.  Reports time per cycle and the
runtime's peak RSS per `create`.  WARMSTART_SOAK_CYCLES sets N (default 100).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import time

import pytest
from reliability_lib import RNode, ann, assert_clean, count, shim

pytestmark = [pytest.mark.reliability]
CYCLES = int(os.environ.get("WARMSTART_SOAK_CYCLES", "100"))


def create_measured(c: shim.Container) -> int:
    """shim's create, but reaped with wait4 to read the runtime's peak RSS (KiB)."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    argv = [shim.RUNTIME, "--root", str(c.root), "--log", str(c.bundle / "log.json"), "--log-format", "json",
            "create", "--bundle", str(c.bundle), "--pid-file", str(c.bundle / "init.pid"), c.id]
    p = subprocess.Popen(argv, stdin=in_r, stdout=out_w, stderr=err_w, env={**os.environ, **c.extra_env})
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    c.proc_stdin, c.proc_stdout, c.stderr_r = in_w, out_r, err_r
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    assert p.returncode == 0, c.log_text()
    return ru.ru_maxrss


def du(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) if path.exists() else 0


def mem_available_kib() -> int:
    for ln in open("/proc/meminfo"):
        if ln.startswith("MemAvailable:"):
            return int(ln.split()[1])
    return 0


def test_soak(node: RNode):
    times, rss = [], []
    base_fds = base = base_store = base_mem = None
    for i in range(CYCLES):
        t0 = time.monotonic()
        c = node.ctr(f"s{i}", ann("soak"))
        rss.append(create_measured(c))
        c.start()
        got = c.ask()
        if i > 0:
            assert got["counter"] >= 2, f"cycle {i} did not restore: {got}"
        c.stop()
        c.delete()
        node.containers.remove(c)
        times.append(time.monotonic() - t0)
        if i == 0:
            assert (node.store / "soak" / "checkpoint.done").is_file()
            base_fds = len(os.listdir("/proc/self/fd"))
            base = node.snapshot()
            base_store = du(node.store)
            base_mem = mem_available_kib()
    count("soak.cycles", CYCLES)
    msgs = node.log_msgs()
    assert sum(m.startswith("restored from soak") for m in msgs) == CYCLES - 1
    assert len(os.listdir("/proc/self/fd")) == base_fds, "file descriptors leaked"
    assert_clean(node, base, f"after {CYCLES} cycles")
    assert du(node.store) == base_store, "store size changed"
    restore_logs = list((node.base / "logs").glob("restore-*.log"))
    report = {
        "cycles": CYCLES, "seconds_total": round(sum(times), 2),
        "seconds_per_cycle": {"median": round(statistics.median(times), 3), "max": round(max(times), 3)},
        "runtime_create_peak_rss_kib": {"median": int(statistics.median(rss)), "max": max(rss)},
        "mem_available_delta_kib": mem_available_kib() - (base_mem or 0),
        "store_bytes": base_store, "restore_logs_kept": len(restore_logs),
        "log_dir_bytes": du(node.base / "logs"),
    }
    print("soak:", json.dumps(report))
    (node.base.parent / "soak-report.json").write_text(json.dumps(report))
    # per-container CRIU restore logs are kept by design (one per container id, no rotation): see docs
    assert len(restore_logs) == CYCLES - 1
    late = statistics.median(times[-10:]) if CYCLES >= 20 else None
    early = statistics.median(times[1:11]) if CYCLES >= 20 else None
    if late and early:
        assert late < 2 * early + 0.5, f"cycles slow down: {early:.2f}s → {late:.2f}s"
