"""Node agent: which runtime-log lines count as which outcome, the log tail, and LRU eviction to a budget."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client")

from warmstart import config  # noqa: E402
from warmstart.agent import Agent, wanted_ids  # noqa: E402
from warmstart.metrics import LogTail, NodeMetrics, classify  # noqa: E402
from warmstart.store import MARKER, Store, evict_to_budget  # noqa: E402


def rec(msg: str, level: str = "info", **kw) -> dict:
    return {"time": "t", "level": level, "msg": msg, "scope": "team-a", "checkpoint_id": "w1", **kw}


@pytest.mark.parametrize("msg,kind,reason", [
    ("restored from w1 (verified by seal)", "restore", ""),
    ("cold start: no checkpoint w1 in the store yet", "cold_start", "no_checkpoint"),
    ("cold start: checkpoint w1 is quarantined after 3 failed restores (last: checkpoint w1 refused: x); "
     "clear with `warmstart verify --clear w1`", "cold_start", "quarantined"),
    ("cold start: checkpoint w1 refused: the checkpoint's process holds capabilities the spec does not grant",
     "cold_start", "refused"),
    ("cold start: restore from w1 refused: post-restore hook failed: HTTP 500", "cold_start", "worker_hook"),
    ("cold start: restore from w1 failed (now quarantined): runc restore failed (exit 1): x", "cold_start",
     "restore_failed"),
    ("checkpointed on stop into /var/lib/warmstart/checkpoints/team-a/w1; passing the stop signal on to runc",
     "dump", ""),
    ("on-ready: checkpointed into /s/team-a/w1 while running; the worker was paused 0.200s", "dump", ""),
])
def test_classify_the_runtimes_own_messages(msg: str, kind: str, reason: str) -> None:
    o = classify(rec(msg, phases={"verify": 0.001, "restore": 0.2, "criu_restore_time": 150000}))
    assert o is not None and (o.kind, o.reason, o.namespace) == (kind, reason, "team-a")
    if kind in ("restore", "dump"):
        assert o.seconds == pytest.approx(0.201)  # CRIU's own µs counters are not added twice


def test_lines_that_are_no_outcome() -> None:
    assert classify(rec("mounts: created /run/nvidia-ctk-hook")) is None
    assert classify(rec("not checkpointed: the container exited; stopping as plain runc")) is None  # info: a skip
    assert classify(rec("not checkpointed: runc checkpoint failed; stopping as plain runc", "warning")).kind \
        == "dump_failed"


def test_metrics_count_per_namespace_and_reason() -> None:
    m = NodeMetrics()
    m.observe(rec("restored from w1 (verified by seal)", phases={"restore": 0.3}))
    m.observe(rec("cold start: no checkpoint w1 in the store yet"))
    m.observe(rec("cold start: no checkpoint w1 in the store yet", scope="team-b"))
    get = m.registry.get_sample_value
    assert get("warmstart_restores_total", {"namespace": "team-a"}) == 1
    assert get("warmstart_cold_starts_total", {"namespace": "team-b", "reason": "no_checkpoint"}) == 1
    assert get("warmstart_restore_seconds_count") == 1


def test_pulls_by_outcome_with_seconds(tmp_path: Path) -> None:
    """fleet.py's lines: a pull with its seconds; a failure, a full disk and a missed deadline told apart."""
    m = NodeMetrics()
    fleet = {"component": "fleet", "scope": None, "namespace": "team-a"}
    m.observe(rec("pulled r:team-a.w1, verified and sealed, in 2.5s", seconds=2.5, **fleet))
    m.observe(rec("pull of r:team-a.w1 failed: skopeo inspect r failed: manifest unknown; the store is unchanged",
                  "warning", **fleet))
    m.observe(rec("pull of r:team-a.w1 failed: the store's disk is full: /s/team-a has 0 bytes free without this "
                  "pull (x); free space there, ...; the store is unchanged", "warning", **fleet))
    m.observe(rec("pull of r:team-a.w1 not finished after 30s (pull_deadline_s): starting cold; the pull goes on",
                  "warning", **fleet))
    get = m.registry.get_sample_value
    for outcome in ("ok", "failed", "disk_full", "deadline"):
        assert get("warmstart_pulls_total", {"namespace": "team-a", "outcome": outcome}) == 1, outcome
    assert get("warmstart_pull_seconds_sum") == 2.5 and get("warmstart_pull_seconds_count") == 1
    assert classify(rec("pull from the registry not started: x; starting cold", "warning", component="fleet")) is None


def test_log_tail_reads_whole_lines_and_follows_rotation(tmp_path: Path) -> None:
    log = tmp_path / "runtime.log"
    log.write_text(json.dumps({"msg": "old"}) + "\n")
    t = LogTail(log)  # starts at the end: history is not counted again
    assert t.read() == []
    with log.open("a") as f:
        f.write(json.dumps({"msg": "a"}) + "\n" + '{"msg": "half')
    assert [r["msg"] for r in t.read()] == ["a"]
    with log.open("a") as f:
        f.write('"}\nnot json\n')
    assert [r["msg"] for r in t.read()] == ["half"]
    log.rename(tmp_path / "runtime.log.1")
    log.write_text(json.dumps({"msg": "new file"}) + "\n")
    assert [r["msg"] for r in t.read()] == ["new file"]


def _settings(tmp_path: Path) -> config.Settings:
    return config.Settings(store=tmp_path / "store", seal_dir=tmp_path / "seals", state_dir=tmp_path / "state",
                           log_dir=tmp_path / "logs")


def _checkpoint(s: config.Settings, scope: str, cid: str, size: int, published: float) -> None:
    d = s.store / scope / cid
    d.mkdir(parents=True)
    (d / "pages-1.img").write_bytes(b"\0" * size)
    (d / MARKER).write_text('{"success": true}')
    os.utime(d / MARKER, (published, published))


def test_evict_to_budget_removes_least_recently_used_first_and_keeps_busy(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    now = time.time()
    _checkpoint(s, "team-a", "old", 4000, now - 300)
    _checkpoint(s, "team-a", "used", 4000, now - 400)  # older, but restored a moment ago
    _checkpoint(s, "team-b", "busy", 4000, now - 500)
    _checkpoint(s, "_local", "new", 4000, now - 10)
    Store(s, "team-a").ensure()
    Store(s, "team-a").mark_used("used")
    with Store(s, "team-b").lock("busy", exclusive=False, blocking=True):  # a restore holds it
        ev = evict_to_budget(s, 3 * 4017 + 50)  # one of four must go; the busy one cannot
    assert ev.busy == ["team-b/busy"]
    assert ev.evicted == ["team-a/old"]
    assert not (s.store / "team-a" / "old").exists() and (s.store / "team-a" / "used").exists()
    assert ev.total_bytes == 3 * 4017
    assert evict_to_budget(s, 1 << 40).evicted == []  # under budget: nothing goes


def test_agent_remembers_the_ids_pods_asked_for(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    s.log_dir.mkdir()
    s.state_dir.mkdir()
    log = s.log_dir / "runtime.log"
    log.write_text("")
    a = Agent(s)
    with log.open("a") as f:
        for line in (rec("cold start: no checkpoint w1 in the store yet"),
                     rec("restored from w2 (verified by seal)", checkpoint_id="w2", scope="team-b")):
            f.write(json.dumps(line) + "\n")
    assert a.read_log() == 2
    assert set(wanted_ids(s)) == {"team-b/w2", "team-a/w1"}
    a.scan_store()
    assert a.metrics.registry.get_sample_value("warmstart_cold_starts_total",
                                               {"namespace": "team-a", "reason": "no_checkpoint"}) == 1
