#!/usr/bin/env python3
"""Where a registry pull's time goes: check, download (skopeo), unpack (decompress, hash, write), verify, seal.

One loopback docker-registry (warmstart.testing.registry); node A publishes a checkpoint shaped like the
reference worker's dump (one page image of incompressible bytes, as its SHAKE-256 state is, plus the small
CRIU files) and pushes it once per size; node B pulls it with transfer.pull into a fresh store each time,
its phases timed (transfer.pull's and Store.adopt's `phases`).  Each pull runs in its own process, with
the `warmstart` package of the tree given by --runtime, so that two trees (baseline and change) can be
interleaved rep by rep against the same image in the same registry:

    python3 benchmarks/pull_phases/bench.py --sizes 1024,4096 --reps 3 \\
        --runtime base=/opt/ws-pullfast/base/runtime --runtime new=runtime --json benchmarks/pull_phases/results.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CID = "pull-bench"
SCOPE = "_local"
SMALL = {"inventory.img": 64, "core-1.img": 20 << 10, "pagemap-1.img": 200 << 10, "mm-1.img": 8 << 10,
         "dump.log": 40 << 10, "rootfs-diff.tar": 10 << 10, "deleted.files": 0}


def _meta() -> dict:
    return {
        "schema_version": 2, "id": CID, "id_source": "id", "identity": None, "created": "2025-01-01T00:00:00Z",
        "container": {"id": "c1", "args": ["refworker"], "env": ["PATH=/bin"], "cwd": "/", "image": "img:1",
                      "hostname": "", "rootfs": {"kind": "overlay", "readonly": False}, "mounts": [],
                      "cgroup": {"version": 1, "path": "/bench"}, "namespaces": ["mount", "pid"]},
        "compat": {"scope": SCOPE, "args": ["refworker"], "image_name": "img:1", "image_fingerprint": "sha256:" + "a" * 64,
                   "namespaces": ["mount", "pid"], "id_mappings": {"uidMappings": [], "gidMappings": []},
                   "seccomp_sha256": "", "cgroup_version": 1, "arch": "x86_64", "criu": "4.2.1"},
        "versions": {"criu": "4.2.1", "runc": "1.1.5", "kernel": "6.1", "arch": "x86_64", "warmstart": "0.1.0"},
        "dump": {"phases": {}, "criu_stats": {}}, "rootfs_diff": {"files": 0, "deleted": 0, "bytes": 0},
        "sizes": {"total_bytes": 0, "files": 0}, "manifest": {}}


def settings(base: Path, keys: Path) -> object:
    from warmstart.config import Settings  # noqa: PLC0415 - from the tree under test
    return Settings(store=base / "store", seal_dir=base / "seals", state_dir=base / "state", log_dir=base / "log",
                    signing_key=keys / "node.key", trusted_keys=(keys / "node.pub",))


def make_and_push(work: Path, size_mb: int, ref: str) -> dict:
    """Node A: publish a checkpoint of `size_mb` MiB of random pages plus the small files, push it to `ref`."""
    from warmstart import signing, transfer  # noqa: PLC0415
    from warmstart.store import Store  # noqa: PLC0415
    keys = work / "keys"
    if not (keys / "node.key").exists():
        keys.mkdir(parents=True, exist_ok=True)
        signing.keygen(keys / "node.key", keys / "node.pub")
    node_a = work / f"a-{size_mb}"
    shutil.rmtree(node_a, ignore_errors=True)
    store = Store(settings(node_a, keys), SCOPE)
    tmp = store.new_tmp(CID)
    for name, n in SMALL.items():
        (tmp / name).write_bytes(os.urandom(n))
    with open(tmp / "pages-1.img", "wb") as f:
        for _ in range(size_mb // 64):
            f.write(os.urandom(64 << 20))
        f.write(os.urandom((size_mb % 64) << 20))
    ck = store.publish(CID, tmp, _meta())
    t0 = time.monotonic()
    pushed = transfer.push(store.settings, SCOPE, CID, ref, transfer.Remote(tls_verify=False))
    out = {"checkpoint_bytes": sum(f.stat().st_size for f in ck.iterdir()), "push_s": time.monotonic() - t0,
           "blobs_sent": pushed.copied.sent}
    shutil.rmtree(node_a)  # its bytes are in the registry now; keep the disk for the pulls
    return out


def pull_once(work: Path, ref: str) -> dict:
    """Node B: an empty store, one pull, its phases (in a process of its own: --runtime picks the tree)."""
    from warmstart import transfer  # noqa: PLC0415
    from warmstart.phases import Phases  # noqa: PLC0415
    node_b = work / "b"
    shutil.rmtree(node_b, ignore_errors=True)
    phases = Phases()
    try:
        cid = transfer.pull(settings(node_b, work / "keys"), SCOPE, ref, transfer.Remote(tls_verify=False), CID,
                            phases=phases)
        assert cid == CID
        return {"total_s": phases.total(), **{f"{k}_s": v for k, v in phases.timings.items()}}
    finally:
        shutil.rmtree(node_b, ignore_errors=True)


def _child(runtime: Path, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(runtime.resolve()))
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], env=env, capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:1])} with {runtime} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.splitlines()[-1])


def _summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


PHASES = ["total", "check", "download", "unpack", "download+unpack", "verify", "seal"]


def table(results: dict) -> str:
    """Median [min–max] seconds of each phase, one column per tree and size."""
    cols = [(size, tree) for size, e in results["sizes"].items() for tree in e["summary"]]
    lines = ["| seconds, median [min–max] | " + " | ".join(f"{s} MiB, {t}" for s, t in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for ph in PHASES:
        cells = []
        for size, tree in cols:
            v = results["sizes"][size]["summary"][tree].get(f"{ph}_s")
            cells.append(f"{v['median']:.2f} [{v['min']:.2f}–{v['max']:.2f}]" if v else "–")
        lines.append(f"| {ph} | " + " | ".join(cells) + " |")
    floors = " ".join(f"{s} MiB: checkpoint {e['checkpoint_bytes'] / 2**20:.0f} MiB, registry {e['registry_down_MBps']} "
                      f"MB/s down, floor {e['floor_s']} s;" for s, e in results["sizes"].items())
    return "\n".join(lines) + "\n\n" + floors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1024", help="page image sizes in MiB, comma-separated")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", action="append", default=[], metavar="NAME=DIR",
                    help="a tree's runtime/ dir to pull with (repeatable; interleaved rep by rep)")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--table", type=Path, metavar="JSON", help="print a results file as a Markdown table, and exit")
    ap.add_argument("--child", nargs=3, metavar=("WHAT", "WORK", "ARG"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.table:
        print(table(json.loads(a.table.read_text())))
        return
    if a.child:
        what, work, arg = a.child
        out = make_and_push(Path(work), int(arg.split("|")[0]), arg.split("|")[1]) if what == "push" \
            else pull_once(Path(work), arg)
        print(json.dumps(out))
        return
    sys.path.insert(0, str(HERE.parents[1] / "runtime"))
    from warmstart.testing.registry import blob_round_trip, start_registry  # noqa: PLC0415
    trees = dict(r.split("=", 1) for r in a.runtime) or {"this": str(HERE.parents[1] / "runtime")}
    work = Path(tempfile.mkdtemp(prefix="pull-phases.", dir=a.workdir))
    (work / "registry").mkdir()
    proc, addr = start_registry(work / "registry")
    results: dict = {"machine": f"{os.cpu_count()} vCPUs, load {os.getloadavg()[0]:.1f} at start",
                     "skopeo": subprocess.run(["skopeo", "--version"], capture_output=True, text=True).stdout.strip(),
                     "trees": trees, "sizes": {}}
    try:
        first = Path(next(iter(trees.values())))
        for size in [int(s) for s in a.sizes.split(",")]:
            ref = f"{addr}/bench/pull:{size}"
            pushed = _child(first, "--child", "push", str(work), f"{size}|{ref}")
            raw = work / "raw"
            with open(raw, "wb") as f:
                f.write(os.urandom(min(size, 1024) << 20))
            rt = blob_round_trip(addr, "bench/raw", raw)
            raw.unlink()
            entry: dict = {**pushed, "registry_down_MBps": round(rt.download_bps / 1e6), "runs": {n: [] for n in trees}}
            entry["floor_s"] = round(pushed["checkpoint_bytes"] / rt.download_bps, 2)
            for rep in range(a.reps):
                order = list(trees.items()) if rep % 2 == 0 else list(trees.items())[::-1]
                for name, tree in order:
                    r = _child(Path(tree), "--child", "pull", str(work), ref)
                    r["load"] = round(os.getloadavg()[0], 1)
                    entry["runs"][name].append(r)
                    print(f"{size} MiB rep {rep} {name}: " + " ".join(f"{k}={v:.2f}" for k, v in r.items()), flush=True)
            entry["summary"] = {n: {k: _summary([r[k] for r in runs]) for k in runs[0] if k != "load"}
                                for n, runs in entry["runs"].items()}
            results["sizes"][str(size)] = entry
            if a.json:
                a.json.write_text(json.dumps(results, indent=1) + "\n")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({s: e["summary"] for s, e in results["sizes"].items()}, indent=1))


if __name__ == "__main__":
    main()
