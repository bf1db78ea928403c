"""on-ready through the CRI: the first worker is checkpointed while it keeps serving; the next restores.

Also the seed's (Dynamo's) file protocol: DYN_CHECKPOINT_SIGNAL_FILE and
DYN_RESTORE_MARKER_FILE written into the containers.
"""
from __future__ import annotations

import json
import secrets
import subprocess
import threading
import time
from pathlib import Path

import pytest

from warmstart.testing.cri.client import http_get, wait_http

pytestmark = [pytest.mark.cri, pytest.mark.e2e]
PORT = 8080
SEED_ENV = {"DYN_CHECKPOINT_SIGNAL_FILE": "/tmp/checkpoint-signal.json",
            "DYN_RESTORE_MARKER_FILE": "/tmp/restored.json", "DYN_CHECKPOINT_PATH": "/checkpoints"}


def _store(cfg: Path) -> Path:
    return cfg.parent / "checkpoints" / "default"  # the pods' namespace: its scope in the store


def _log(cfg: Path) -> list[dict]:
    p = cfg.parent / "log" / "runtime.log"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def _supervisors() -> list[str]:
    out = subprocess.run(["pgrep", "-af", "warmstart.supervisor"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if "pgrep" not in ln]


def _wait(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Hammer(threading.Thread):
    """A client that keeps sending requests; every one must succeed."""

    def __init__(self, ip: str) -> None:
        super().__init__(daemon=True)
        self.ip, self.ok, self.failures, self.last = ip, 0, [], {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                status, body = http_get(self.ip, PORT, "/infer", timeout=30)
                if status == 200:
                    self.ok += 1
                    self.last = body
                else:
                    self.failures.append(status)
            except OSError as e:
                self.failures.append(repr(e))
            time.sleep(0.02)


def _pod(cri, image, name, annotations, args, env=None):
    pod = cri.run_pod_sandbox(name, runtime_handler="warmstart", annotations=annotations)
    ctr = cri.create_container(pod, "worker", image, args=args, annotations=annotations, env=env or {})
    cri.start_container(ctr)
    return pod, ctr


def test_on_ready_checkpoints_a_serving_worker_and_the_next_pod_restores(cri, worker_image, warmstart_config):
    cid = f"ready-{secrets.token_hex(3)}"
    ann = {"warmstart.dev/checkpoint": "on-ready", "warmstart.dev/id": cid,
           "warmstart.dev/ready-file": "/tmp/worker-ready", "warmstart.dev/ready-delay": "0.5"}
    args = ["--port", str(PORT), "--state-mb", "64", "--rounds", "1", "--ready-file", "/tmp/worker-ready"]
    pod1, c1 = _pod(cri, worker_image, "first", ann, args, SEED_ENV)
    ip1 = cri.pod_ip(pod1.id)
    wait_http(ip1, PORT, "/ready", timeout=120)
    hammer = Hammer(ip1)
    hammer.start()
    done = _store(warmstart_config) / cid / "checkpoint.done"
    _wait(done.is_file, 120, "the on-ready checkpoint")
    time.sleep(1.0)
    hammer.stop.set()
    hammer.join()
    assert hammer.failures == [] and hammer.ok > 10, (hammer.failures, hammer.ok)
    assert cri.container_status(c1).running, "the first worker keeps running after its checkpoint"
    pid1 = cri.container_status(c1, verbose=True).info["info"]["pid"]
    signal = json.loads(Path(f"/proc/{pid1}/root/tmp/checkpoint-signal.json").read_text())
    assert signal["success"] is True and signal["checkpoint_id"] == cid and signal["error"] is None
    assert signal["checkpoint_path"] == f"/checkpoints/{cid}"
    paused = [r for r in _log(warmstart_config) if r.get("container") == c1 and "pause_s" in r]
    assert paused and 0 < paused[-1]["pause_s"] < 30, paused
    marker = json.loads(done.read_text())
    assert marker["success"] is True and marker["checkpoint_id"] == cid
    final_counter = hammer.last["counter"]

    pod2, c2 = _pod(cri, worker_image, "second", ann, args, SEED_ENV)
    ip2 = cri.pod_ip(pod2.id)
    wait_http(ip2, PORT, "/ready", timeout=60)
    _, after = http_get(ip2, PORT, "/infer")
    assert after["boot_id"] == hammer.last["boot_id"] and after["checksum"] == hammer.last["checksum"]
    assert 1 <= after["counter"] <= final_counter + 1
    pid2 = cri.container_status(c2, verbose=True).info["info"]["pid"]
    restored = json.loads(Path(f"/proc/{pid2}/root/tmp/restored.json").read_text())
    assert restored["checkpoint_id"] == cid
    # exactly one checkpoint was made for the id, and no supervisor is left for either pod
    assert sum(1 for r in _log(warmstart_config) if r.get("checkpoint_id") == cid and "checkpointed into" in r["msg"]) == 1
    cri.remove_all()
    _wait(lambda: not [s for s in _supervisors() if c1 in s or c2 in s], 10, "supervisors to exit")


def test_on_ready_http_signal(cri, worker_image, warmstart_config):
    cid = f"readyhttp-{secrets.token_hex(3)}"
    ann = {"warmstart.dev/checkpoint": "on-ready", "warmstart.dev/id": cid, "warmstart.dev/ready-http": "8080/ready"}
    pod, ctr = _pod(cri, worker_image, "http", ann, ["--port", str(PORT), "--state-mb", "16", "--rounds", "1"])
    _wait((_store(warmstart_config) / cid / "checkpoint.done").is_file, 120, "the on-ready (HTTP) checkpoint")
    assert cri.container_status(ctr).running
    assert http_get(cri.pod_ip(pod.id), PORT, "/infer")[0] == 200


def test_worker_dying_before_ready_leaves_nothing(cri, worker_image, warmstart_config):
    cid = f"dies-{secrets.token_hex(3)}"
    ann = {"warmstart.dev/checkpoint": "on-ready", "warmstart.dev/id": cid}
    pod = cri.run_pod_sandbox("dies", runtime_handler="warmstart", annotations=ann)
    ctr = cri.create_container(pod, "worker", worker_image, command=["python3", "-c", "import time; time.sleep(1)"],
                               annotations=ann)
    cri.start_container(ctr)
    _wait(lambda: [s for s in _supervisors() if ctr in s], 10, "the supervisor to start")
    _wait(lambda: cri.container_status(ctr).exited, 30, "the container to exit")
    _wait(lambda: not [s for s in _supervisors() if ctr in s], 10, "the supervisor to notice and exit")
    cri.remove_container(ctr)
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)
    store = _store(warmstart_config)
    assert not (store / cid).exists()
    assert not [p for p in (store / ".tmp").glob(f"{cid}.*")] if (store / ".tmp").is_dir() else True
    assert not (warmstart_config.parent / "state" / "containers" / ctr).exists()
    reasons = [r["msg"] for r in _log(warmstart_config) if r.get("container") == ctr and "on-ready:" in r["msg"]]
    assert any(("exited" in m or "deleted" in m) and "before it was" in m for m in reasons), reasons
