"""`warmstart bench` end to end at a tiny size: every comparison runs and the JSON has every key with samples.

The numbers are not asserted (speed is measured, not tested); that every
comparison produced real samples is.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.e2e, pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc, CRIU, podman)"),
    pytest.mark.skipif(not shutil.which("warmstart") or not Path("/usr/local/bin/warmstart-runtime").exists(),
                       reason="warmstart not installed (install.sh)"),
]
KEYS = ["cold_start_s", "restore_s", "speedup", "restore_vs_fill_floor", "restore_vs_runc_restore",
        "restore_vs_podman", "dump_vs_write_floor", "passthrough_overhead_ms", "time_to_first_response_s",
        "checkpoint_bytes", "hook_ms", "poststop_ms", "python_startup_ms"]
# per size, each with real samples: every restore variant and floor ran
SIZE_KEYS = ["restore_s", "restore_serial_reads_s", "runc_restore_s", "time_to_first_response_s",
             "fill_floor_s", "fill_floor_all_cores_s", "read_cached_s", "read_cold_s", "write_floor_s"]


def test_bench_json_has_every_comparison(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    p = subprocess.run(["warmstart", "bench", "--sizes", "64", "--reps", "1", "--cold-reps", "1",
                        "--passthrough-reps", "2", "--hook-reps", "3", "--pause", "0.2", "--workdir", str(tmp_path),
                        "--json", str(out), "--plot", str(png)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    data = json.loads(out.read_text())
    text = json.dumps(data)
    for key in KEYS:
        assert f'"{key}"' in text, f"{key} missing from the bench JSON"
    size = data["sizes"]["64"]
    # each restore variant's worker re-hashed its whole state once: intact
    assert size["state_verified"] == {f"verified_{v}": [1.0] for v in ("eager", "serial_reads", "lazy")}, \
        size["state_verified"]
    for key in SIZE_KEYS:
        assert size.get(key, {}).get("n", 0) >= 1, f"{key}: no samples ({size.get(key)}; notes {size['notes']})"
    assert png.stat().st_size > 10_000
    assert "restore" in p.stdout and "floor" in p.stdout, p.stdout[-2000:]
    assert not [x for x in tmp_path.iterdir() if x.name not in ("bench.json", "bench.png")], \
        "bench leaves nothing behind in its work dir"
