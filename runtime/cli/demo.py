"""`warmstart demo`: a real cold start, checkpoint and restore through the CRI, with a timing table.

Plays kubelet against its own containerd (own root, state, sockets, runc root,
CNI bridge) whose `warmstart` runtime handler runs the installed
warmstart-runtime: the reference worker starts cold in pod 1, answers
requests, is stopped (checkpoint) and removed; pod 2 (new sandbox, new IP)
restores it.  Everything started is removed at the end, also on Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

RUNTIME = Path("/usr/local/bin/warmstart-runtime")
PORT = 8080


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-mb", type=int, default=1024, help="worker state size in MiB (default 1024)")
    p.add_argument("--rounds", type=int, default=4, help="hash-chain rounds over the state: the cold-start work")
    p.add_argument("--json", type=Path, dest="json_out", help="also write the results as JSON to this file")
    p.add_argument("--runtime", type=Path, default=RUNTIME, help="the runtime handler's BinaryName")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, store) for inspection")
    p.add_argument("--grace", type=int, default=120, help="StopContainer timeout (terminationGracePeriodSeconds)")


class Progress:
    """One line per step with elapsed time; a ticker while a long step waits."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __call__(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {msg}", flush=True)

    def waiting(self, what: str) -> "Progress":
        start = time.monotonic()
        self._stop.clear()

        def tick() -> None:
            while not self._stop.wait(5.0):
                self(f"  ... {what} ({time.monotonic() - start:.0f}s so far)")
        self._ticker = threading.Thread(target=tick, daemon=True)
        self._ticker.start()
        return self

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._ticker:
            self._ticker.join()


@dataclass
class DemoResult:
    cold_start_s: float = 0.0
    cold_create_s: float = 0.0
    restore_s: float = 0.0
    speedup: float = 0.0
    stop_s: float = 0.0
    dump_s: float = 0.0
    dump_phases: dict[str, float] = field(default_factory=dict)
    criu_dump_stats: dict[str, Any] = field(default_factory=dict)
    restore_phases: dict[str, float] = field(default_factory=dict)
    checkpoint_bytes: int = 0
    checkpoint_id: str = ""
    state_preserved: bool = False
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    pod_ips: list[str] = field(default_factory=list)
    state_mb: int = 0


def _runtime_log(log_dir: Path, container: str) -> list[dict[str, Any]]:
    p = log_dir / "runtime.log"
    out = []
    for line in p.read_text().splitlines() if p.exists() else []:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("container") == container:
            out.append(rec)
    return out


def run(args: argparse.Namespace) -> int:
    from ..cri import images  # noqa: PLC0415 - grpc is heavy; only the demo needs it
    from ..cri.client import wait_http, http_get  # noqa: PLC0415
    from ..cri.containerd import Containerd  # noqa: PLC0415

    if os.geteuid() != 0:
        print("warmstart demo: must run as root (it starts containerd, runc and CRIU)", file=sys.stderr)
        return 2
    if not args.runtime.exists():
        print(f"warmstart demo: {args.runtime} not found; run install.sh first", file=sys.stderr)
        return 2
    say = Progress()
    work = Path(tempfile.mkdtemp(prefix="warmstart-demo-"))
    work.chmod(0o700)
    node = work / "node"
    cfg = node / "config.toml"
    node.mkdir(mode=0o700)
    from .. import config as wconfig  # noqa: PLC0415
    criu = wconfig.load().criu
    cfg.write_text(f'store = "{node}/store"\nseal_dir = "{node}/seals"\nstate_dir = "{node}/state"\n'
                   f'log_dir = "{node}/logs"\ncriu = "{criu}"\n')
    res = DemoResult(state_mb=args.state_mb, checkpoint_id=f"demo-{secrets.token_hex(4)}")
    annotations = {"warmstart.dev/checkpoint": "on-stop", "warmstart.dev/id": res.checkpoint_id}
    worker_args = ["--port", str(PORT), "--state-mb", str(args.state_mb), "--rounds", str(args.rounds)]
    ctrd = Containerd(work / "containerd", warmstart_binary=args.runtime, env={"WARMSTART_CONFIG": str(cfg)},
                      progress=say)
    try:
        say(f"work dir {work}; starting a private containerd")
        ctrd.start()
        say("building and importing images (cached after the first run)")
        images.ensure_pause_image(ctrd, progress=say)
        image = images.ensure_worker_image(ctrd, progress=say)
        with ctrd.client(timeout=300) as cri:
            # -- pod 1: cold start -------------------------------------------------
            pod1 = cri.run_pod_sandbox("worker-1", runtime_handler="warmstart", annotations=annotations)
            ip1 = cri.pod_ip(pod1.id)
            c1 = cri.create_container(pod1, "worker", image, args=worker_args, annotations=annotations)
            say(f"pod 1 ({ip1}): starting the reference worker cold ({args.state_mb} MiB state, {args.rounds} rounds)")
            t = time.monotonic()
            cri.start_container(c1)
            res.cold_create_s = time.monotonic() - t
            with say.waiting("cold start: worker building its state"):
                waited, _ = wait_http(ip1, PORT, "/ready", timeout=1800)
            res.cold_start_s = time.monotonic() - t
            say(f"pod 1 ready after {res.cold_start_s:.2f}s")
            for _ in range(3):
                _, res.before = http_get(ip1, PORT, "/infer")
            say(f"pod 1 answered 3 requests: counter={res.before['counter']} checksum={res.before['checksum'][:16]}…")
            # -- stop = checkpoint -------------------------------------------------
            say("stopping pod 1's worker (StopContainer): warmstart checkpoints it")
            t = time.monotonic()
            with say.waiting("checkpoint"):
                cri.stop_container(c1, timeout=args.grace)
            res.stop_s = time.monotonic() - t
            st1 = cri.container_status(c1)
            cri.stop_pod(pod1.id)
            cri.remove_pod(pod1.id)
            ck = node / "store" / res.checkpoint_id
            if not (ck / "checkpoint.done").is_file():
                say(f"no checkpoint was made; runtime log: {_runtime_log(node / 'logs', c1)[-2:]}")
                return 1
            meta = json.loads((ck / "metadata.json").read_text())
            res.dump_phases = meta["dump"]["phases"]
            res.criu_dump_stats = meta["dump"].get("criu_stats", {})
            res.checkpoint_bytes = meta["sizes"]["total_bytes"]
            done = [r for r in _runtime_log(node / "logs", c1) if "checkpointed" in r.get("msg", "")]
            res.dump_phases = done[-1].get("phases", res.dump_phases) if done else res.dump_phases
            res.dump_s = sum(res.dump_phases.values())
            say(f"checkpoint {res.checkpoint_id}: {res.checkpoint_bytes / 2**20:.0f} MiB in {res.dump_s:.2f}s "
                f"(container exit code {st1.exit_code}); pod 1 removed")
            # -- pod 2: restore ----------------------------------------------------
            pod2 = cri.run_pod_sandbox("worker-2", runtime_handler="warmstart", annotations=annotations)
            ip2 = cri.pod_ip(pod2.id)
            c2 = cri.create_container(pod2, "worker", image, args=worker_args, annotations=annotations)
            say(f"pod 2 ({ip2}, a new sandbox): starting the worker, which restores")
            t = time.monotonic()
            cri.start_container(c2)
            wait_http(ip2, PORT, "/ready", timeout=300)
            res.restore_s = time.monotonic() - t
            _, res.after = http_get(ip2, PORT, "/infer")
            res.pod_ips = [ip1, ip2]
            restored = [r for r in _runtime_log(node / "logs", c2) if "restored from" in r.get("msg", "")]
            if not restored:
                say(f"pod 2 started cold, not restored: {_runtime_log(node / 'logs', c2)[-1:]}")
            res.restore_phases = restored[-1].get("phases", {}) if restored else {}
            res.state_preserved = bool(restored) and all(
                res.after.get(k) == res.before.get(k) for k in ("checksum", "boot_id", "random_value")) \
                and res.after.get("counter") == res.before.get("counter") + 1
            res.speedup = res.cold_start_s / res.restore_s if res.restore_s else 0.0
            say(f"pod 2 ready after {res.restore_s:.2f}s: counter={res.after.get('counter')} "
                f"checksum={str(res.after.get('checksum'))[:16]}… hostname={res.after.get('hostname')}")
            cri.stop_container(c2, timeout=2)
            cri.remove_all()
        print_table(res)
        if args.json_out:
            args.json_out.write_text(json.dumps(res.__dict__, indent=1, default=str))
            say(f"results written to {args.json_out}")
        return 0 if res.state_preserved else 1
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    finally:
        problems = ctrd.stop()
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        say("cleaned up" + (f" with problems: {problems}" if problems else ": containerd, pods, mounts, network, temp dirs"))


def print_table(r: DemoResult) -> None:
    rows: list[tuple[str, str]] = [("**Checkpoint (on StopContainer)**", "")]
    rows += [(f"  {k}", f"{v:.3f}s") for k, v in r.dump_phases.items()]
    stats = r.criu_dump_stats
    if stats:
        rows += [("  (CRIU: frozen / memdump / memwrite)",
                  f"{stats.get('frozen_time', 0) / 1e6:.3f} / {stats.get('memdump_time', 0) / 1e6:.3f} / "
                  f"{stats.get('memwrite_time', 0) / 1e6:.3f}s")]
    rows += [("  total checkpoint", f"{r.dump_s:.3f}s"), ("  checkpoint size", f"{r.checkpoint_bytes / 2**20:.0f} MiB"),
             ("**Restore (inside StartContainer)**", "")]
    rows += [(f"  {k}", f"{v / 1e6:.3f}s" if k.startswith("criu_") else f"{v:.3f}s")  # CRIU's are in µs
             for k, v in r.restore_phases.items()]
    rows += [("  total restore, StartContainer to /ready", f"{r.restore_s:.3f}s"),
             ("**Cold start, StartContainer to /ready**", f"{r.cold_start_s:.3f}s"),
             ("**Speed-up (cold / restore)**", f"{r.speedup:.1f}x"),
             ("State preserved (checksum, boot id, counter+1)", "yes" if r.state_preserved else "NO")]
    width = max(len(a) for a, _ in rows) + 2
    print()
    print(f"| {'Operation':<{width}} | {'Duration':>14} |")
    print(f"|{'-' * (width + 2)}|{'-' * 16}|")
    for a, b in rows:
        print(f"| {a:<{width}} | {b:>14} |")
    print()
