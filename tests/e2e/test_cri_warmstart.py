"""The `warmstart` runtime handler through the CRI, playing kubelet against a real containerd.

Each test talks to containerd's CRI gRPC API only (RunPodSandbox, CreateContainer,
StartContainer, StopContainer, ...): containerd runs the runc-v2 shim, the shim
runs the installed warmstart-runtime, which runs runc and CRIU.
"""
from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from warmstart.testing.cri.client import NS_POD, http_get, wait_http

pytestmark = [pytest.mark.cri, pytest.mark.e2e]
PORT = 8080
ARGS = ["--port", str(PORT), "--state-mb", "32", "--rounds", "1"]


def _store(cfg: Path) -> Path:
    return cfg.parent / "checkpoints" / "default"  # the pods' namespace: its scope in the store


def _log(cfg: Path) -> list[dict]:
    p = cfg.parent / "log" / "runtime.log"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def _ann(cid: str) -> dict[str, str]:
    return {"warmstart.dev/checkpoint": "on-stop", "warmstart.dev/id": cid}


def _start_worker(cri, image, name, handler="warmstart", annotations=None, pod_annotations=None, **pod_kw):
    pod = cri.run_pod_sandbox(name, runtime_handler=handler,
                              annotations=annotations if pod_annotations is None else pod_annotations, **pod_kw)
    ctr = cri.create_container(pod, "worker", image, args=ARGS, annotations=annotations or {})
    cri.start_container(ctr)
    ip = cri.pod_ip(pod.id)
    wait_http(ip, PORT, "/ready", timeout=120)
    return pod, ctr, ip


def _stop_and_remove(cri, pod, ctr, grace=30):
    cri.stop_container(ctr, timeout=grace)
    status = cri.container_status(ctr)
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)
    return status


def test_checkpoint_at_stop_restore_in_new_pod(cri, worker_image, warmstart_config):
    cid = f"cri-{secrets.token_hex(3)}"
    pod1, c1, ip1 = _start_worker(cri, worker_image, "w-first", annotations=_ann(cid))
    for _ in range(2):
        _, before = http_get(ip1, PORT, "/infer")
    assert before["hostname"] == "w-first"
    _stop_and_remove(cri, pod1, c1)
    assert (_store(warmstart_config) / cid / "checkpoint.done").is_file()

    pod2, c2, ip2 = _start_worker(cri, worker_image, "w-second", annotations=_ann(cid))
    _, after = http_get(ip2, PORT, "/infer")
    assert ip2 != ip1, "a new sandbox with a new IP"
    assert (after["boot_id"], after["checksum"], after["random_value"]) == \
        (before["boot_id"], before["checksum"], before["random_value"]), "the same process state came back"
    assert after["counter"] == before["counter"] + 1
    assert after["hostname"] == "w-second", "the new pod's hostname, not the old pod's"
    st = cri.container_status(c2, verbose=True)
    assert st.running
    assert any("restored from" in r["msg"] and r.get("container") == c2 for r in _log(warmstart_config))
    # the new pod's sandbox (pause) kept its hostname too: CRIU joined the pod's UTS namespace
    pause_pid = cri.pod_status(pod2.id, verbose=True).info["info"]["pid"]
    assert Path(f"/proc/{pause_pid}/ns/uts").stat().st_ino == Path(f"/proc/{st.info['info']['pid']}/ns/uts").stat().st_ino
    cri.stop_container(c2, timeout=5)
    assert cri.container_status(c2).exited


def test_plain_pods_are_untouched(cri, worker_image, warmstart_config):
    before = len(_log(warmstart_config))
    # warmstart handler, no annotation
    pod, ctr, ip = _start_worker(cri, worker_image, "no-annotation")
    assert http_get(ip, PORT, "/infer")[1]["counter"] == 1
    _stop_and_remove(cri, pod, ctr, grace=5)
    # annotation, but the default runc handler: warmstart-runtime never runs
    cid = f"runc-{secrets.token_hex(3)}"
    pod, ctr, ip = _start_worker(cri, worker_image, "default-handler", handler="", annotations=_ann(cid))
    _stop_and_remove(cri, pod, ctr, grace=5)
    assert not (_store(warmstart_config) / cid).exists()
    assert _log(warmstart_config)[before:] == [], "warmstart logged nothing: it never touched these containers"


def test_sandbox_is_never_checkpointed(cri, worker_image, warmstart_config):
    cid = f"sbx-{secrets.token_hex(3)}"
    pod, ctr, _ = _start_worker(cri, worker_image, "sbx", annotations=_ann(cid))
    _stop_and_remove(cri, pod, ctr)
    touched = {r.get("container") for r in _log(warmstart_config) if r.get("checkpoint_id") == cid}
    assert touched == {ctr}, f"only the worker container, never the sandbox {pod.id}: {touched}"
    meta = json.loads((_store(warmstart_config) / cid / "metadata.json").read_text())
    assert meta["container"]["id"] == ctr


def test_shared_pid_namespace_is_not_checkpointed(cri, worker_image, warmstart_config):
    cid = f"pidns-{secrets.token_hex(3)}"
    pod, ctr, _ = _start_worker(cri, worker_image, "pidns", annotations=_ann(cid), pid_mode=NS_POD)
    status = _stop_and_remove(cri, pod, ctr)
    assert status.exited
    assert not (_store(warmstart_config) / cid).exists()
    msgs = [r["msg"] for r in _log(warmstart_config) if r.get("container") == ctr]
    assert any("PID namespace" in m for m in msgs), msgs
