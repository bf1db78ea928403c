"""The node agent: the one long-running warmstart process of a node (DaemonSet container or systemd unit).

It exports the node's metrics for Prometheus (metrics.py, fed from the runtime's
log), keeps the store within its byte budget by evicting the least recently
restored checkpoints, and remembers which checkpoint ids this node's pods asked
for, which is what a prefetch from the registry needs to know.  It never sits on a container's
path: the runtime works the same with the agent down.
"""
from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass, field


from .config import Settings
from .fileutil import write_json_atomic
from .log import Logger
from .metrics import LogTail, NodeMetrics
from .store import Store, evict_to_budget

WANTED_MAX = 1000  # ids remembered; the oldest asked-for go first


@dataclass
class Agent:
    settings: Settings
    budget_bytes: int | None = None
    metrics: NodeMetrics = field(default_factory=NodeMetrics)
    log: Logger = field(default_factory=Logger)
    from_start: bool = False

    def __post_init__(self) -> None:
        self.tail = LogTail(self.settings.log_dir / "runtime.log", from_start=self.from_start)
        self.wanted_path = self.settings.state_dir / "agent-wanted.json"
        self.wanted: dict[str, float] = self._load_wanted()

    def _load_wanted(self) -> dict[str, float]:
        try:
            raw = json.loads(self.wanted_path.read_text())
            return {str(k): float(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
        except (OSError, ValueError, TypeError):
            return {}

    def read_log(self) -> int:
        """Feed the new runtime-log lines to the metrics; note the ids pods asked for. Returns lines read."""
        recs = self.tail.read()
        changed = False
        for rec in recs:
            o = self.metrics.observe(rec)
            cid = rec.get("checkpoint_id")
            if o is not None and o.kind in ("restore", "cold_start") and isinstance(cid, str):
                self.wanted[f"{o.namespace}/{cid}"] = time.time()
                changed = True
        if changed:
            for key in sorted(self.wanted, key=self.wanted.get)[:max(0, len(self.wanted) - WANTED_MAX)]:
                del self.wanted[key]
            try:
                write_json_atomic(self.wanted_path, self.wanted)
            except OSError:
                pass
        return len(recs)

    def prefetch(self, max_pulls: int = 4, deadline_s: float = 600) -> list[str]:
        """[registry] pull = "prefetch": pull the ids this node's pods asked for that are not here, most
        recently asked first (the pulls share fleet's per-key lock with any create missing them now)."""
        reg = self.settings.registry
        if not reg.enabled or reg.pull != "prefetch":
            return []
        from . import fleet  # noqa: PLC0415
        from .store import locate  # noqa: PLC0415
        done = []
        for key in sorted(self.wanted, key=self.wanted.get, reverse=True):
            scope, _, cid = key.partition("/")
            try:
                if locate(self.settings, scope, cid) is not None:
                    continue
            except ValueError:
                continue
            if fleet.pull_on_miss(self.settings, scope, cid, deadline_s):
                done.append(key)
            if len(done) >= max_pulls:
                break
        return done

    def scan_store(self) -> None:
        """Store gauges per namespace; then eviction down to the budget, when one is set."""
        if self.budget_bytes is not None:
            ev = evict_to_budget(self.settings, self.budget_bytes)
            for key in ev.evicted:
                self.log.info(f"agent: evicted {key} (store over its budget of {self.budget_bytes} bytes)")
        for scope in Store.scopes(self.settings):
            s = Store(self.settings, scope)
            ids = [cid for cid in s.ids() if s.exists(cid)]
            self.metrics.store_checkpoints.labels(scope).set(len(ids))
            self.metrics.store_bytes.labels(scope).set(sum(s.bytes_used(cid) for cid in ids))

    def run(self, addr: str, port: int, interval_s: float, stop: threading.Event | None = None) -> None:
        from prometheus_client import start_http_server  # noqa: PLC0415

        stop = stop or threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        start_http_server(port, addr=addr, registry=self.metrics.registry)
        self.log.info(f"agent: metrics on http://{addr}:{port}/metrics, store scan every {interval_s:g}s",
                      budget_bytes=self.budget_bytes)
        next_scan = 0.0
        while not stop.is_set():
            self.read_log()
            if time.monotonic() >= next_scan:
                self.prefetch()
                self.scan_store()
                next_scan = time.monotonic() + interval_s
            stop.wait(1.0)


def wanted_ids(settings: Settings) -> list[str]:
    """"<namespace>/<id>" this node's pods asked for, most recent first (for prefetching)."""
    try:
        raw = json.loads((settings.state_dir / "agent-wanted.json").read_text())
    except (OSError, ValueError):
        return []
    return sorted(raw, key=raw.get, reverse=True) if isinstance(raw, dict) else []



