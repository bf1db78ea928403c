"""The harness itself, on the plain `runc` handler: no warmstart code on the path.

If these fail, a warmstart CRI test failing says nothing about warmstart.
"""
from __future__ import annotations

import ipaddress
import time
from pathlib import Path

import pytest

from warmstart.testing.cri import images
from warmstart.testing.cri.client import http_get, wait_http
from warmstart.testing.cri.containerd import Containerd
from warmstart.testing.worker import refworker

pytestmark = pytest.mark.cri

PORT = 8080
STATE_MB, ROUNDS = 16, 1
WORKER_ARGS = ["--state-mb", str(STATE_MB), "--rounds", str(ROUNDS), "--port", str(PORT)]


def expected_checksum() -> str:
    """The worker's state is a pure function of its flags: compute it here, independently of the pod."""
    w = refworker.Worker(STATE_MB, ROUNDS, "warmstart")
    w.build()
    return w.compute_checksum()


def test_plain_pod_runs_reference_worker(containerd: Containerd, cri, worker_image: str) -> None:
    t0 = time.monotonic()
    pod = cri.run_pod_sandbox("plain-worker", runtime_handler="runc")
    cid = cri.run_container(pod, "worker", worker_image, args=WORKER_ARGS)
    started_s = time.monotonic() - t0
    assert cri.container_status(cid).running

    ip = cri.pod_ip(pod.id)
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(containerd.subnet)
    ready_s, body = wait_http(ip, PORT, "/ready", timeout=30)
    print(f"pod+container started in {started_s:.2f}s, ready {ready_s:.2f}s later")

    status, a = http_get(ip, PORT, "/infer")
    assert status == 200
    status, b = http_get(ip, PORT, "/infer?verify=1")
    assert status == 200
    assert a["checksum"] == b["checksum"] == body["checksum"] == expected_checksum()
    assert b["verified"] is True
    assert (a["counter"], b["counter"]) == (1, 2)
    assert a["boot_id"] == b["boot_id"] and a["random_value"] == b["random_value"]
    assert a["pid"] == 1, "kubelet's default: the container has its own pid namespace"
    assert a["hostname"] == "plain-worker", "the pod's UTS namespace carries the pod name"

    t = time.monotonic()
    cri.stop_container(cid, timeout=10)
    stop_s = time.monotonic() - t
    st = cri.container_status(cid)
    assert st.exited and st.exit_code == 0, st
    assert stop_s < 5, f"SIGTERM should stop the worker at once (took {stop_s:.1f}s)"
    log = Path(st.log_path).read_text()
    assert "refworker ready" in log and "signal 15" in log

    cri.remove_container(cid)
    assert cri.list_containers(pod.id) == []
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)
    assert cri.list_pods() == []
    assert not containerd.shim_pids(), "the pod's shim exits once its sandbox is removed"
    assert not containerd.veths()


def test_stop_cleans_up_running_pods(tmp_path: Path, worker_image: str) -> None:
    """stop() with a pod still running (a test that died midway) leaves nothing behind."""
    ctrd = Containerd(tmp_path / "c2")
    with ctrd:
        images.ensure_pause_image(ctrd)
        ref = images.ensure_worker_image(ctrd)
        assert ref == worker_image
        cri = ctrd.client()
        pod = cri.run_pod_sandbox("left-running")
        cri.run_container(pod, "worker", ref, args=WORKER_ARGS)
        wait_http(cri.pod_ip(pod.id), PORT, "/ready", timeout=30)
        during = {"mounts": len(ctrd.mounts()), "shims": len(ctrd.shim_pids()),
                  "veths": len(ctrd.veths()), "cgroups": len(ctrd.cgroup_dirs())}
        cri.close()
        assert all(during.values()), during  # the checks below are not vacuous
    assert ctrd.leftovers() == {}
    assert not ctrd.running
    assert (ctrd.log_dir / "containerd.log").exists(), "logs are kept for post-mortems"
