"""What integrity checking costs on the restore path: sealed (stat) vs full SHA-256, on a multi-GiB checkpoint.

Run as root: /opt/warmstart/venv/bin/python benchmarks/verify_cost.py [--gib 2] [--json out.json]
Prints a table and writes JSON; the full check is also timed after dropping caches (cold disk).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from warmstart.config import Settings
from warmstart.store import Store


def metadata(cid: str) -> dict:
    return {"schema_version": 1, "id": cid, "id_source": "id", "identity": None, "created": "2026-01-01T00:00:00Z",
            "container": {"id": "bench", "args": ["x"], "env": [], "cwd": "/", "rootfs": {"kind": "dir"}, "mounts": []},
            "versions": {"criu": "4.1.1", "runc": "1.1.5", "kernel": os.uname().release, "arch": "x86_64",
                         "warmstart": "0"},
            "dump": {"phases": {}}, "sizes": {"total_bytes": 0, "files": 0}, "manifest": {}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        base = Path(d)
        store = Store(Settings(store=base / "store", seal_dir=base / "seals"))
        tmp = store.new_tmp("bench")
        chunk = os.urandom(64 << 20)
        with open(tmp / "pages-1.img", "wb") as f:
            for _ in range(int(args.gib * 1024 / 64)):
                f.write(chunk)
        for i in range(40):
            (tmp / f"core-{i}.img").write_bytes(os.urandom(4096))
        t = time.perf_counter()
        store.publish("bench", tmp, metadata("bench"))
        publish_s = time.perf_counter() - t
        sealed, full_warm, full_cold = [], [], []
        for _ in range(args.reps):  # interleaved: sealed, full (page cache warm), full (caches dropped)
            t = time.perf_counter()
            assert store.open_verified("bench").verified_by == "seal"
            sealed.append(time.perf_counter() - t)
            t = time.perf_counter()
            store.open_verified("bench", full=True)
            full_warm.append(time.perf_counter() - t)
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            t = time.perf_counter()
            store.open_verified("bench", full=True)
            full_cold.append(time.perf_counter() - t)
        res = {"checkpoint_gib": args.gib, "publish_s": publish_s, "sealed_s": sealed,
               "full_page_cached_s": full_warm, "full_cold_s": full_cold}
        print(f"{'check':<28}{'median':>10}{'min':>10}{'max':>10}   ({args.gib} GiB checkpoint, {args.reps} reps)")
        for k in ("sealed_s", "full_page_cached_s", "full_cold_s"):
            v = res[k]
            print(f"{k:<28}{statistics.median(v):>10.4f}{min(v):>10.4f}{max(v):>10.4f}")
        print(f"publish (hash+fsync+seal)   {publish_s:>10.3f}")
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
