"""The node agent against the real runtime: its /metrics count what real creates and stops did, and its
store budget evicts the least recently restored checkpoint while one in use stays."""
from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request

import pytest
from reliability_lib import RNode, ann, make_checkpoint

RESTORE_ONLY = "restore-only"

pytestmark = [pytest.mark.reliability]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _wait_for(port: int, key: str, want: float, timeout: float = 15) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            m = _scrape(port)
        except OSError:
            m = {}
        if m.get(key) == want or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def test_agent_metrics_count_real_restores_and_cold_starts_and_evict_to_budget(node: RNode):
    port = _port()
    (node.base / "logs").mkdir(exist_ok=True)
    (node.base / "logs" / "runtime.log").touch()
    agent = subprocess.Popen(["warmstart", "agent", "--metrics-addr", "127.0.0.1", "--metrics-port", str(port),
                              "--interval", "0.5"], env={**os.environ, **node.env()},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(port, "warmstart_restore_seconds_count", 0.0), "the agent did not come up"
        make_checkpoint(node, "agent-a")                        # a cold start (no checkpoint yet), then a dump
        c = node.ctr("again", ann("agent-a", RESTORE_ONLY))     # a restore
        c.create()
        c.start()
        assert c.ask()["counter"] == 3  # the dumped workload had answered twice
        m = _wait_for(port, 'warmstart_restores_total{namespace="_local"}', 1.0)
        assert m.get('warmstart_cold_starts_total{namespace="_local",reason="no_checkpoint"}') == 1.0, m
        assert m.get('warmstart_dumps_total{namespace="_local",outcome="ok"}') == 1.0, m
        assert m.get('warmstart_restores_total{namespace="_local"}') == 1.0, m
        assert m.get("warmstart_restore_seconds_count") == 1.0, m
        assert m.get('warmstart_store_checkpoints{namespace="_local"}') == 1.0, m
        assert m.get('warmstart_store_bytes{namespace="_local"}', 0) > 1 << 20, m
        c.stop()
        c.delete()
    finally:
        agent.terminate()
        agent.wait(timeout=10)
    # a budget for one checkpoint: the least recently restored goes (agent-a, restored before agent-b was
    # even made), the one just restored stays
    make_checkpoint(node, "agent-b", short="dumper-b")
    held = node.ctr("holder", ann("agent-b", RESTORE_ONLY))
    held.create()
    held.start()
    held.ask()
    size_b = sum(f.stat().st_size for f in (node.store / "agent-b").rglob("*") if f.is_file())
    p = node.warmstart("gc", "--budget", str(size_b + 4096))
    assert p.returncode == 0, p.stderr
    assert "evicted _local/agent-a" in p.stdout, p.stdout
    assert not (node.store / "agent-a").exists() and (node.store / "agent-b").exists()
    held.stop()
    held.delete()
