"""A node's warmstart metrics for Prometheus, read from the runtime's own log.

The runtime is one short process per container operation, so nothing long-lived
sees restores and dumps happen; each of them logs one JSON line instead, and the
node agent (agent.py) tails that log into these counters.  `classify` is the one
place that knows which log lines are which outcome.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# restore ~0.3 s (CPU) to ~10 s (GPU, cold page cache); dumps and pulls up to minutes
_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
COLD_REASONS = ("no_checkpoint", "quarantined", "refused", "restore_failed", "worker_hook", "other")
PULL_FAILURES = ("failed", "disk_full", "deadline")  # warmstart_pulls_total's outcomes besides "ok"


@dataclass(frozen=True)
class Outcome:
    kind: str            # restore | cold_start | dump | dump_failed | pull | pull_failed
    namespace: str
    reason: str = ""     # cold starts: one of COLD_REASONS; pull_failed: one of PULL_FAILURES
    seconds: float | None = None


def _seconds(rec: dict[str, Any]) -> float | None:
    """The time a record's phases add up to (CRIU's own µs counters, criu_*, are inside them)."""
    phases = rec.get("phases")
    if not isinstance(phases, dict):
        return None
    vals = [v for k, v in phases.items() if not str(k).startswith("criu_") and isinstance(v, (int, float))]
    return float(sum(vals)) if vals else None


def classify(rec: dict[str, Any]) -> Outcome | None:
    """The outcome one runtime-log record reports, or None for the lines that are not one."""
    msg = str(rec.get("msg", ""))
    ns = str(rec.get("scope") or rec.get("namespace") or "_local")  # the runtime's records / fleet's
    if msg.startswith("restored from "):
        return Outcome("restore", ns, seconds=_seconds(rec))
    if msg.startswith("cold start: "):
        body = msg.removeprefix("cold start: ")
        if body.startswith("no checkpoint"):
            reason = "no_checkpoint"
        elif " is quarantined" in body.split(";")[0]:
            reason = "quarantined"
        elif body.startswith("restore from ") and "hook failed" in body:
            reason = "worker_hook"
        elif body.startswith("checkpoint ") and " refused: " in body:
            reason = "refused"
        elif body.startswith("restore from ") and " failed" in body:
            reason = "restore_failed"
        else:
            reason = "other"
        return Outcome("cold_start", ns, reason=reason)
    if msg.startswith(("checkpointed on stop into ", "on-ready: checkpointed into ")):
        return Outcome("dump", ns, seconds=_seconds(rec))
    if rec.get("level") in ("warning", "error") and msg.startswith(("not checkpointed: ",
                                                                     "on-ready: not checkpointed: ")):
        return Outcome("dump_failed", ns)
    if rec.get("component") == "fleet":  # fleet.py's pulls (on a miss, or the agent's prefetch)
        if msg.startswith("pulled "):
            secs = rec.get("seconds")
            return Outcome("pull", ns, seconds=float(secs) if isinstance(secs, (int, float)) else None)
        if msg.startswith("pull of ") and " failed: " in msg:  # the disk full is the node's to fix, not the registry's
            return Outcome("pull_failed", ns, reason="disk_full" if "the store's disk is full" in msg else "failed")
        if msg.startswith("pull of ") and " not finished after " in msg:  # create went cold; the pull goes on
            return Outcome("pull_failed", ns, reason="deadline")
    return None


class NodeMetrics:
    """The metrics one node agent exports (own registry: nothing of the process's defaults)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.restores = Counter("warmstart_restores", "containers restored from a checkpoint", ["namespace"],
                                registry=r)
        self.cold_starts = Counter("warmstart_cold_starts", "opted-in containers that started cold, by reason",
                                   ["namespace", "reason"], registry=r)
        self.dumps = Counter("warmstart_dumps", "checkpoints taken, by outcome", ["namespace", "outcome"],
                             registry=r)
        self.pulls = Counter("warmstart_pulls", "checkpoint pulls from the registry, by outcome",
                             ["namespace", "outcome"], registry=r)
        self.restore_seconds = Histogram("warmstart_restore_seconds", "create of a restored container: its phases",
                                         buckets=_BUCKETS, registry=r)
        self.dump_seconds = Histogram("warmstart_dump_seconds", "a checkpoint's dump phases", buckets=_BUCKETS,
                                      registry=r)
        self.pull_seconds = Histogram("warmstart_pull_seconds", "a pull from the registry", buckets=_BUCKETS,
                                      registry=r)
        self.store_bytes = Gauge("warmstart_store_bytes", "bytes of complete checkpoints in the store",
                                 ["namespace"], registry=r)
        self.store_checkpoints = Gauge("warmstart_store_checkpoints", "complete checkpoints in the store",
                                       ["namespace"], registry=r)

    def observe(self, rec: dict[str, Any]) -> Outcome | None:
        o = classify(rec)
        if o is None:
            return None
        if o.kind == "restore":
            self.restores.labels(o.namespace).inc()
            if o.seconds is not None:
                self.restore_seconds.observe(o.seconds)
        elif o.kind == "cold_start":
            self.cold_starts.labels(o.namespace, o.reason).inc()
        elif o.kind in ("dump", "dump_failed"):
            self.dumps.labels(o.namespace, "ok" if o.kind == "dump" else "failed").inc()
            if o.seconds is not None:
                self.dump_seconds.observe(o.seconds)
        elif o.kind in ("pull", "pull_failed"):
            self.pulls.labels(o.namespace, "ok" if o.kind == "pull" else o.reason).inc()
            if o.seconds is not None:
                self.pull_seconds.observe(o.seconds)
        return o


class LogTail:
    """New complete JSON lines of a log file across calls; starts over when the file is replaced or truncated."""

    def __init__(self, path: Path, from_start: bool = False) -> None:
        self.path = path
        self.ino, self.offset = None, 0
        if not from_start:
            try:
                st = path.stat()
                self.ino, self.offset = st.st_ino, st.st_size
            except OSError:
                pass

    def read(self, max_bytes: int = 16 << 20) -> list[dict[str, Any]]:
        import json  # noqa: PLC0415

        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return []
        try:
            st = os.fstat(fd)
            if st.st_ino != self.ino or st.st_size < self.offset:
                self.ino, self.offset = st.st_ino, 0  # rotated or truncated
            os.lseek(fd, self.offset, os.SEEK_SET)
            raw = os.read(fd, max_bytes)
        finally:
            os.close(fd)
        end = raw.rfind(b"\n") + 1  # a line still being written waits for the next call
        self.offset += end
        out = []
        for line in raw[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out
