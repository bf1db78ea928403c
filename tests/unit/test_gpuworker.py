"""The GPU reference worker (runtime/warmstart/testing/worker/gpuworker.py): its front/engine channel and HTTP
endpoints.

The front is tested against a stand-in engine that speaks the real channel code (no torch needed);
the whole worker runs on CPU (tiny preset, eager) when a python with torch and transformers is found
(WARMSTART_TORCH_PYTHON, or this interpreter).
"""
from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from warmstart.testing.worker import gpuworker

WORKER = Path(gpuworker.__file__)

# An engine with the real channel code and the engine's answers, minus the model.
FAKE_ENGINE = r'''
import hashlib, os, socket, sys
sys.path.insert(0, sys.argv[1])
import gpuworker as g
sock = socket.socket(fileno=int(sys.argv[sys.argv.index("--engine-fd") + 1]))
g.send_msg(sock, {"ok": True, "event": "ready", "timings": {"import_s": 0.1}, "kv_bytes": 4096,
                  "param_bytes": 8, "max_cache_len": 64, "reference": {"1": {"sha256_logits": "00" * 32}}})
asleep = False
while True:
    try:
        m = g.recv_msg(sock)
    except EOFError:
        break
    op = m["op"]
    if op == "crash":
        os._exit(3)
    if op == "generate":
        if asleep:
            g.send_msg(sock, {"ok": False, "error": "asleep: POST /wake_up first"})
            continue
        h = hashlib.sha256(f"{m['batch']}/{m['new_tokens']}".encode()).hexdigest()
        g.send_msg(sock, {"ok": True, "batch": m["batch"], "new_tokens": m["new_tokens"], "sha256_logits": h})
    elif op == "sleep":
        if m["level"] != 1:
            g.send_msg(sock, {"ok": False, "error": "level 2 not supported; use level=1"})
            continue
        asleep = True
        g.send_msg(sock, {"ok": True, "sleeping": True, "kv_bytes": 0})
    elif op == "wake_up":
        asleep = False
        g.send_msg(sock, {"ok": True, "sleeping": False, "kv_bytes": 4096})
    else:
        g.send_msg(sock, {"ok": False, "error": f"unknown op {op!r}"})
'''


def request(port: int, method: str, path: str) -> tuple[int, dict]:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(f"{method} {path} HTTP/1.0\r\nContent-Length: 0\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.fixture
def front():
    lost: list[str] = []
    engine = gpuworker.EngineClient([sys.executable, "-c", FAKE_ENGINE, str(WORKER.parent)], on_lost=lost.append)
    server = gpuworker.Server(("127.0.0.1", 0), gpuworker.make_handler(engine))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield engine, server.server_address[1], lost
    server.shutdown()
    engine.sock.close()
    engine.proc.wait(timeout=10)


def test_channel_round_trips_and_refuses_oversized_messages():
    a, b = socket.socketpair()
    with a, b:
        gpuworker.send_msg(a, {"op": "generate", "batch": 2, "ids": list(range(1000))})
        assert gpuworker.recv_msg(b) == {"op": "generate", "batch": 2, "ids": list(range(1000))}
        a.sendall((gpuworker.MAX_MSG + 1).to_bytes(4, "big"))
        with pytest.raises(ValueError, match="exceeds"):
            gpuworker.recv_msg(b)
        a.close()
        with pytest.raises(EOFError):
            gpuworker.recv_msg(b)


def test_front_endpoints_against_an_engine(front):
    engine, port, lost = front
    assert request(port, "GET", "/health")[0] == 503, "not ready before the engine says so"
    assert request(port, "GET", "/generate")[0] == 503
    info = engine.wait_ready()
    assert info["kv_bytes"] == 4096
    assert request(port, "GET", "/health") == (200, {"ready": True, "sleeping": False})
    code, gen = request(port, "GET", "/generate?batch=2&new_tokens=5")
    assert code == 200 and gen["batch"] == 2 and gen["new_tokens"] == 5
    assert request(port, "POST", "/generate?batch=2&new_tokens=5") == (200, gen)
    assert request(port, "GET", "/generate?batch=x")[0] == 400
    assert request(port, "POST", "/sleep?level=2")[0] == 400
    assert request(port, "GET", "/is_sleeping") == (200, {"is_sleeping": False})
    code, slept = request(port, "POST", "/sleep?level=1")
    assert code == 200 and slept == {"sleeping": True, "kv_bytes": 0}
    assert request(port, "GET", "/is_sleeping") == (200, {"is_sleeping": True})
    assert request(port, "GET", "/health") == (200, {"ready": True, "sleeping": True}), "asleep is still healthy"
    assert request(port, "GET", "/generate?batch=2&new_tokens=5")[0] == 409
    assert request(port, "POST", "/wake_up")[0] == 200
    assert request(port, "GET", "/generate?batch=2&new_tokens=5") == (200, gen)
    assert request(port, "GET", "/nope")[0] == 404
    assert request(port, "POST", "/nope")[0] == 404
    assert not lost


def test_front_gives_up_when_the_engine_dies(front):
    engine, _port, lost = front
    engine.wait_ready()
    out = engine.call("crash")
    assert not out["ok"] and lost, "a dead engine must end the front"


def _torch_python() -> str | None:
    for py in (os.environ.get("WARMSTART_TORCH_PYTHON"), sys.executable):
        if py and subprocess.run([py, "-c", "import torch, transformers"], capture_output=True).returncode == 0:
            return py
    return None


TORCH_PY = _torch_python()


def _read_until(proc: subprocess.Popen, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 1)[0]:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            m = re.search(pattern, line)
            if m:
                return m
    raise AssertionError(f"no {pattern!r} within {timeout}s: {''.join(seen)[-2000:]}")


@pytest.mark.skipif(TORCH_PY is None, reason="no python with torch and transformers (WARMSTART_TORCH_PYTHON)")
def test_tiny_worker_on_cpu_sleeps_wakes_and_generates_the_same():
    proc = subprocess.Popen([TORCH_PY, str(WORKER), "--preset", "tiny", "--device", "cpu", "--no-compile",
                             "--port", "0", "--new-tokens", "8", "--sleep-offload-weights"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        m = _read_until(proc, r"engine_pid=(\d+) port=(\d+)", 60)
        engine_pid, port = int(m.group(1)), int(m.group(2))
        ready = _read_until(proc, r"gpuworker ready .*import_s=.*model_build_s=.*compile_and_warmup_s=", 120)
        assert ready
        code, first = request(port, "GET", "/generate?batch=1&new_tokens=8")
        assert code == 200 and first["finite"] and len(first["token_ids"][0]) == 8
        assert request(port, "GET", "/generate?batch=1&new_tokens=8")[1]["sha256_logits"] == first["sha256_logits"]
        assert len(set(first["token_ids"][0])) > 1, "random weights should not decode one token over and over"
        code, two = request(port, "GET", "/generate?batch=2&new_tokens=8")
        assert code == 200 and len(two["token_ids"]) == 2
        assert request(port, "GET", "/generate?batch=3")[0] == 400, "batch 3 has no KV cache"
        code, stats = request(port, "GET", "/stats")
        assert code == 200 and stats["kv_bytes"] > 0 and stats["param_bytes"] > 0
        code, slept = request(port, "POST", "/sleep?level=1")
        assert code == 200 and slept["kv_bytes"] == 0 and slept["offloaded_weights"]
        assert request(port, "GET", "/generate?batch=1&new_tokens=8")[0] == 409
        code, woke = request(port, "POST", "/wake_up")
        assert code == 200 and woke["kv_bytes"] == stats["kv_bytes"]
        code, again = request(port, "GET", "/generate?batch=1&new_tokens=8")
        assert (again["sha256_logits"], again["token_ids"]) == (first["sha256_logits"], first["token_ids"])
        assert request(port, "GET", "/generate?batch=2&new_tokens=8")[1]["sha256_logits"] == two["sha256_logits"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        for _ in range(100):  # the engine sees EOF and exits
            if not Path(f"/proc/{engine_pid}").exists() or "Z" in Path(f"/proc/{engine_pid}/stat").read_text().split()[2]:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("engine outlived its front")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
