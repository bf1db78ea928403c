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
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import INSTALLED_RUNTIME
from .preflight import ready_to_run

RUNTIME = INSTALLED_RUNTIME
PORT = 8080


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-mb", type=int, default=1024, help="worker state size in MiB (default 1024)")
    p.add_argument("--rounds", type=int, default=6,
                   help="hash-chain rounds over the state: the cold-start work (default 6: ~30 s here)")
    p.add_argument("--json", type=Path, dest="json_out", help="also write the results as JSON to this file")
    p.add_argument("--runtime", type=Path, default=RUNTIME, help="the runtime handler's BinaryName")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, store) for inspection")
    p.add_argument("--grace", type=int, default=120, help="StopContainer timeout (terminationGracePeriodSeconds)")
    from . import fleet_demo  # noqa: PLC0415 - the --fleet variant builds on this module

    fleet_demo.add_arguments(p)


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


@dataclass
class Pod:
    sandbox: Any
    container: str
    ip: str


class Demo:
    """The demo's steps, each a method; `run` strings them together and cleans up."""

    def __init__(self, args: argparse.Namespace, say: Progress, work: Path) -> None:
        from .. import config as wconfig  # noqa: PLC0415
        self.args, self.say, self.work = args, say, work
        self.node = work / "node"
        self.node.mkdir(mode=0o700)
        self.config = self.node / "config.toml"
        self.config.write_text(
            f'store = "{self.node}/store"\nseal_dir = "{self.node}/seals"\nstate_dir = "{self.node}/state"\n'
            f'log_dir = "{self.node}/logs"\ncriu = "{wconfig.load().criu}"\n')
        self.res = DemoResult(state_mb=args.state_mb, checkpoint_id=f"demo-{secrets.token_hex(4)}")
        self.annotations = {"warmstart.dev/checkpoint": "on-stop", "warmstart.dev/id": self.res.checkpoint_id}
        self.worker_args = ["--port", str(PORT), "--state-mb", str(args.state_mb), "--rounds", str(args.rounds)]

    def log(self, container: str) -> list[dict[str, Any]]:
        return _runtime_log(self.node / "logs", container)

    def start_pod(self, cri: Any, image: str, name: str, what: str) -> tuple[Pod, float]:
        """RunPodSandbox + CreateContainer, then StartContainer timed to /ready (as a client sees it)."""
        from .cri.client import wait_http  # noqa: PLC0415
        sandbox = cri.run_pod_sandbox(name, runtime_handler="warmstart", annotations=self.annotations)
        pod = Pod(sandbox, "", cri.pod_ip(sandbox.id))
        pod.container = cri.create_container(sandbox, "worker", image, args=self.worker_args,
                                             annotations=self.annotations)
        self.say(f"{name} ({pod.ip}): starting the worker; {what}")
        t = time.monotonic()
        cri.start_container(pod.container)
        with self.say.waiting(f"{name}: waiting for /ready"):
            wait_http(pod.ip, PORT, "/ready", timeout=1800)
        return pod, time.monotonic() - t

    def checkpoint(self, cri: Any, pod: Pod) -> bool:
        """StopContainer (warmstart dumps inside it), remove the pod, read what the dump recorded."""
        res = self.res
        t = time.monotonic()
        with self.say.waiting("checkpoint"):
            cri.stop_container(pod.container, timeout=self.args.grace)
        res.stop_s = time.monotonic() - t
        exit_code = cri.container_status(pod.container).exit_code
        cri.stop_pod(pod.sandbox.id)
        cri.remove_pod(pod.sandbox.id)
        ck = self.node / "store" / "default" / res.checkpoint_id  # the demo pod's namespace
        if not (ck / "checkpoint.done").is_file():
            self.say(f"no checkpoint was made; runtime log: {self.log(pod.container)[-2:]}")
            return False
        meta = json.loads((ck / "metadata.json").read_text())
        res.criu_dump_stats = meta["dump"].get("criu_stats", {})
        res.checkpoint_bytes = meta["sizes"]["total_bytes"]
        done = [r for r in self.log(pod.container) if "checkpointed" in r.get("msg", "")]
        res.dump_phases = done[-1].get("phases", meta["dump"]["phases"]) if done else meta["dump"]["phases"]
        res.dump_s = sum(res.dump_phases.values())
        self.say(f"checkpoint {res.checkpoint_id}: {res.checkpoint_bytes / 2**20:.0f} MiB in {res.dump_s:.2f}s "
                 f"(container exit code {exit_code}); pod removed")
        return True

    def run(self, ctrd: Any) -> int:
        from .cri import images  # noqa: PLC0415 - grpc is heavy; only the demo needs it
        from .cri.client import http_get  # noqa: PLC0415
        res, say = self.res, self.say
        say(f"work dir {self.work}; starting a private containerd")
        ctrd.start()
        say("building and importing images (cached after the first run)")
        images.ensure_pause_image(ctrd, progress=say)
        image = images.ensure_worker_image(ctrd, progress=say)
        with ctrd.client(timeout=300) as cri:
            pod1, res.cold_start_s = self.start_pod(
                cri, image, "worker-1", f"cold start ({self.args.state_mb} MiB state, {self.args.rounds} rounds)")
            for _ in range(3):
                _, res.before = http_get(pod1.ip, PORT, "/infer")
            say(f"worker-1 ready after {res.cold_start_s:.2f}s; answered 3 requests: counter={res.before['counter']} "
                f"checksum={res.before['checksum'][:16]}…")
            say("stopping worker-1 (StopContainer): warmstart checkpoints it")
            if not self.checkpoint(cri, pod1):
                return 1
            pod2, res.restore_s = self.start_pod(cri, image, "worker-2", "a new sandbox: it restores")
            _, res.after = http_get(pod2.ip, PORT, "/infer")
            res.pod_ips = [pod1.ip, pod2.ip]
            restored = [r for r in self.log(pod2.container) if "restored from" in r.get("msg", "")]
            if not restored:
                say(f"worker-2 started cold, not restored: {self.log(pod2.container)[-1:]}")
            res.restore_phases = restored[-1].get("phases", {}) if restored else {}
            res.state_preserved = bool(restored) and all(
                res.after.get(k) == res.before.get(k) for k in ("checksum", "boot_id", "random_value")) \
                and res.after.get("counter") == res.before.get("counter") + 1
            res.speedup = res.cold_start_s / res.restore_s if res.restore_s else 0.0
            say(f"worker-2 ready after {res.restore_s:.2f}s: counter={res.after.get('counter')} "
                f"checksum={str(res.after.get('checksum'))[:16]}… hostname={res.after.get('hostname')}")
            cri.stop_container(pod2.container, timeout=2)
            cri.remove_all()
        print_table(res)
        if self.args.json_out:
            self.args.json_out.write_text(json.dumps(res.__dict__, indent=1, default=str))
            say(f"results written to {self.args.json_out}")
        return 0 if res.state_preserved else 1


def run(args: argparse.Namespace) -> int:
    from .cri.containerd import Containerd  # noqa: PLC0415

    if args.fleet:
        from . import fleet_demo  # noqa: PLC0415
        return fleet_demo.run(args)
    if not ready_to_run("demo", args.runtime, "it starts containerd, runc and CRIU"):
        return 2
    say = Progress()
    work = Path(tempfile.mkdtemp(prefix="warmstart-demo-"))
    work.chmod(0o700)
    demo = Demo(args, say, work)
    ctrd = Containerd(work / "containerd", warmstart_binary=args.runtime,
                      env={"WARMSTART_CONFIG": str(demo.config)}, progress=say)
    try:
        return demo.run(ctrd)
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    finally:
        clean_up(say, work, args.keep, ctrd.stop(), "containerd, pods, mounts, network, temp dirs")


def clean_up(say: Progress, work: Path, keep: bool, problems: list[str], what: str) -> None:
    """The work dir goes (unless kept); one line says what was cleaned, or the problems met."""
    if keep:
        say(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    say("cleaned up" + (f" with problems: {problems}" if problems else f": {what}"))


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
