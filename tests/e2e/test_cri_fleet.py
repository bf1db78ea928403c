"""Two nodes through the CRI and a registry: node A's pod is checkpointed at stop and pushed by itself;
node B (its own store, seals, state and log; the same containerd, the config swapped) starts a pod of
the same id, and its CreateContainer pulls the checkpoint and restores it. No hand step between."""
from __future__ import annotations

import secrets
import shutil
import sys
import time
from pathlib import Path

import pytest

from warmstart.testing.cri.client import http_get

sys.path.insert(0, str(Path(__file__).parent))
from test_cri_warmstart import PORT, _ann, _log, _start_worker, _stop_and_remove, _store  # noqa: E402
from test_registry import start_registry  # noqa: E402

pytestmark = [pytest.mark.cri, pytest.mark.e2e,
              pytest.mark.skipif(not shutil.which("docker-registry") or not shutil.which("skopeo"),
                                 reason="needs docker-registry and skopeo (install.sh installs both)")]


def _fleet_lines(cfg: Path, prefix: str) -> list[dict]:
    return [r for r in _log(cfg) if r.get("component") == "fleet" and str(r.get("msg", "")).startswith(prefix)]


def test_a_pod_on_another_node_pulls_the_checkpoint_and_restores(cri, worker_image, warmstart_config,
                                                                 tmp_path_factory):
    proc, addr = start_registry(tmp_path_factory.mktemp("registry"))
    node_a = warmstart_config.read_text()
    registry = f'[registry]\nrepository = "{addr}/fleet"\ntls_verify = false\nchunk_bytes = 1048576\n'
    node_b_dir = tmp_path_factory.mktemp("node-b")
    try:
        warmstart_config.write_text(node_a + registry)
        cid = f"fleet-{secrets.token_hex(3)}"
        pod1, c1, ip1 = _start_worker(cri, worker_image, "f-first", annotations=_ann(cid))
        for _ in range(2):
            _, before = http_get(ip1, PORT, "/infer")
        _stop_and_remove(cri, pod1, c1)
        assert (_store(warmstart_config) / cid / "checkpoint.done").is_file()
        deadline = time.monotonic() + 120
        while not _fleet_lines(warmstart_config, "pushed") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _fleet_lines(warmstart_config, "pushed"), [r["msg"] for r in _log(warmstart_config)][-5:]

        # node B: the same registry, nothing else shared
        node_b = node_a.replace(str(warmstart_config.parent), str(node_b_dir))
        assert node_b != node_a
        warmstart_config.write_text(node_b + registry)
        b_cfg = node_b_dir / "config.toml"  # where node B's paths put its log (see _log)
        pod2, c2, ip2 = _start_worker(cri, worker_image, "f-second", annotations=_ann(cid))
        _, after = http_get(ip2, PORT, "/infer")
        assert (after["checksum"], after["random_value"]) == (before["checksum"], before["random_value"])
        assert after["counter"] == before["counter"] + 1 and after["hostname"] == "f-second"
        assert (_store(b_cfg) / cid / "checkpoint.done").is_file()
        pulled = _fleet_lines(b_cfg, "pulled")
        assert len(pulled) == 1, [r["msg"] for r in _log(b_cfg)]
        assert any("restored from" in r["msg"] and r.get("container") == c2 for r in _log(b_cfg))
        print(f"\nnode B: {pulled[0]['msg']}")
        _stop_and_remove(cri, pod2, c2, grace=5)
    finally:
        warmstart_config.write_text(node_a)
        proc.terminate()
        proc.wait(timeout=10)
