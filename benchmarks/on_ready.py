"""The automatic flow, measured: worker 1 starts cold under `on-ready`, is checkpointed while it serves
(its pause = CRIU's frozen time), worker 2 restores.  Through the CRI, on a private containerd.

Run as root after install.sh:  /opt/warmstart/venv/bin/python benchmarks/on_ready.py [--state-mb 1024]
Prints a table and writes benchmarks/on_ready.json.
"""
from __future__ import annotations

import argparse
import json
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path

from warmstart.testing.cri import images
from warmstart.testing.cri.client import http_get, wait_http
from warmstart.testing.cri.containerd import Containerd

PORT = 8080


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state-mb", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json", type=Path, default=Path(__file__).with_name("on_ready.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="warmstart-onready-"))
    node = work / "node"
    node.mkdir()
    cfg = node / "config.toml"
    cfg.write_text(f'store = "{node}/store"\nseal_dir = "{node}/seals"\nstate_dir = "{node}/state"\n'
                   f'log_dir = "{node}/logs"\ncriu = "/usr/local/sbin/criu"\n')
    cid = f"onready-{secrets.token_hex(3)}"
    ann = {"warmstart.dev/checkpoint": "on-ready", "warmstart.dev/id": cid,
           "warmstart.dev/ready-http": f"{PORT}/ready", "warmstart.dev/ready-delay": "1"}
    wargs = ["--port", str(PORT), "--state-mb", str(args.state_mb), "--rounds", str(args.rounds)]
    out: dict = {"state_mb": args.state_mb, "rounds": args.rounds}
    try:
        measure(args, work, node, cfg, cid, ann, wargs, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # checkpoints and logs: nothing of the run stays behind
    args.json.write_text(json.dumps(out, indent=1))
    print(f"| on-ready, {args.state_mb} MiB worker | seconds |\n|---|---|")
    print(f"| worker 1 cold start → ready | {out['cold_start_s']:.2f} |")
    print(f"| worker 1 paused for the checkpoint (CRIU frozen time) | {out['pause_s']:.3f} |")
    print(f"| slowest request during the checkpoint | {out['max_request_latency_s']:.3f} |")
    print(f"| requests during the checkpoint: ok / failed | {out['requests_ok']} / {out['requests_failed']} |")
    print(f"| worker 2 restore → ready | {out['restore_s']:.2f} ({out['speedup']:.1f}x) |")


def measure(args: argparse.Namespace, work: Path, node: Path, cfg: Path, cid: str, ann: dict, wargs: list,
            out: dict) -> None:
    with Containerd(work / "containerd", env={"WARMSTART_CONFIG": str(cfg)}) as ctrd:
        images.ensure_pause_image(ctrd)
        image = images.ensure_worker_image(ctrd)
        with ctrd.client(timeout=300) as cri:
            def start(name: str) -> tuple[str, str, float]:
                """A pod with the worker; StartContainer timed to /ready."""
                pod = cri.run_pod_sandbox(name, runtime_handler="warmstart", annotations=ann)
                ctr = cri.create_container(pod, "worker", image, args=wargs, annotations=ann)
                ip = cri.pod_ip(pod.id)
                t0 = time.monotonic()
                cri.start_container(ctr)
                wait_http(ip, PORT, "/ready", timeout=1800)
                return ctr, ip, time.monotonic() - t0

            c1, ip1, out["cold_start_s"] = start("first")
            t = time.monotonic()
            lat: list[float] = []
            fails: list[str] = []
            stop = threading.Event()

            def hammer() -> None:
                while not stop.is_set():
                    s = time.monotonic()
                    try:
                        status, _ = http_get(ip1, PORT, "/infer", timeout=60)
                        (lat.append(time.monotonic() - s) if status == 200 else fails.append(str(status)))
                    except OSError as e:
                        fails.append(repr(e))
                    time.sleep(0.02)
            th = threading.Thread(target=hammer, daemon=True)
            th.start()
            done = node / "store" / "default" / cid / "checkpoint.done"  # the pods' namespace
            while not done.exists() and time.monotonic() - t < 600:
                time.sleep(0.1)
            time.sleep(1)
            stop.set()
            th.join()
            recs = [json.loads(x) for x in (node / "logs" / "runtime.log").read_text().splitlines()]
            ck = next(r for r in recs if r.get("container") == c1 and "pause_s" in r)
            out.update(pause_s=ck["pause_s"], checkpoint_phases=ck.get("phases"), requests_ok=len(lat),
                       requests_failed=len(fails), max_request_latency_s=max(lat) if lat else None,
                       first_still_running=cri.container_status(c1).running)
            c2, ip2, out["restore_s"] = start("second")
            _, body = http_get(ip2, PORT, "/infer")
            out["restored"] = any("restored from" in r.get("msg", "") for r in
                                  (json.loads(x) for x in (node / "logs" / "runtime.log").read_text().splitlines())
                                  if r.get("container") == c2)
            out["speedup"] = out["cold_start_s"] / out["restore_s"]
            cri.remove_all()


if __name__ == "__main__":
    main()
