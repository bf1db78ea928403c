"""`warmstart demo --fleet` end to end at a small size: two private containerds, one loopback registry.

Node A's pod cold-starts and is checkpointed and pushed by itself; node B's pod pulls on the miss and
restores with the worker's state intact; the registry's own rate and both pull paths (skopeo,
containerd's content store) are measured; the JSON has every figure, and nothing is left behind.
Speeds are measured, not asserted; that each figure is a real sample is.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import _cri_skip_reason  # noqa: E402

RUNTIME = os.environ.get("WARMSTART_RUNTIME", "/usr/local/bin/warmstart-runtime")
pytestmark = [
    pytest.mark.cri, pytest.mark.e2e, pytest.mark.slow,
    pytest.mark.skipif(bool(_cri_skip_reason()), reason=_cri_skip_reason() or ""),
    pytest.mark.skipif(not shutil.which("docker-registry"), reason="needs docker-registry (install.sh installs it)"),
    pytest.mark.skipif(not shutil.which("warmstart") or not Path(RUNTIME).exists(),
                       reason="warmstart not installed (install.sh)"),
]
TIMED = ["cold_start_s", "dump_s", "push_s", "pull_s", "restore_s", "pull_restore_s", "pull_restore_vs_cold",
         "registry_upload_Bps", "registry_download_Bps"]


@pytest.fixture
def work():
    d = Path(tempfile.mkdtemp(prefix="wsf-", dir="/var/tmp"))  # short: containerd's socket paths
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_fleet_demo_carries_a_checkpoint_from_node_a_to_node_b(tmp_path, work):
    out = tmp_path / "fleet.json"
    p = subprocess.run(["warmstart", "demo", "--fleet", "--state-mb", "32", "--rounds", "1", "--compare-pull",
                        "--runtime", RUNTIME, "--workdir", str(work), "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-3000:]
    size = json.loads(out.read_text())["sizes"]["32"]
    s, (rep,) = size["summary"], size["reps"]
    assert s["all_restored_with_state"] and rep["restored"], rep
    for key in TIMED:
        assert s[key]["n"] == 1 and s[key]["median"] > 0, (key, s[key])
    assert rep["pull_s"] < rep["pull_restore_s"]  # the pull ran inside B's StartContainer
    assert rep["blobs_sent"] >= 2 and rep["registry_bytes"] > 16 << 20  # the page chunk(s), files layer
    assert 0 < s["push_floor_s"] and 0 < s["pull_floor_s"]
    for how in ("skopeo", "containerd"):
        got = size["pull_compare"][how]
        assert got["download_s"] > 0 and got["disk_peak_bytes"] >= rep["registry_bytes"], (how, got)
    assert "Pull + restore vs cold" in p.stdout and "State preserved on B" in p.stdout, p.stdout[-2000:]
    assert "cleaned up: both containerds" in p.stdout and "problems" not in p.stdout.splitlines()[-1]
    assert list(work.iterdir()) == [], "the fleet demo leaves nothing behind in its work dir"
