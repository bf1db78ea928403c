"""`criu restore` of a GPU-worker-shaped tree (small root, a child that holds the state) with
CRIU_PARALLEL_READS=0, 2 and 4, page cache warm.

Why: real inference workers keep their multi-GB state in a child (vLLM's engine core), and
warmstart's CRIU patch (packaging/criu-4.2.1-parallel-reads.patch) first read only the root's
pages in parallel.  This measures what reading the child's pages in parallel buys.

Run as root: python3 benchmarks/criu_parallel_children/bench.py --criu /path/to/criu \
    [--child-mib 2048] [--reps 5] [--json out.json]
The tree is the init of its own pid namespace (as in a container): the root (a few MiB) and one
child with CHILD_MIB of random bytes mapped after the fork (its own, not shared with the root).
It is dumped once; each repetition restores it with every setting, in a rotating order, and
checks the child's SHA-256 after each restore (outside the timed part).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TREE = r'''
import hashlib, mmap, os, signal, sys
d, mib = sys.argv[1], int(sys.argv[2])
os.setsid()  # a session of its own, inside the namespace
if os.fork() == 0:
    state = mmap.mmap(-1, mib << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for o in range(0, len(state), 1 << 20):
        state[o:o + (1 << 20)] = os.urandom(1 << 20)
    def report(*_):
        with open(f"{d}/digest.tmp", "w") as f:
            f.write(hashlib.sha256(state).hexdigest())
        os.rename(f"{d}/digest.tmp", f"{d}/digest")
    signal.signal(signal.SIGUSR1, report)
    open(f"{d}/ready", "w").close()
while True:
    signal.pause()
'''
LINE = re.compile(r"^\(\s*[\d.]+\)\s+(\d+): Reading (\d+) bytes of pages in \d+ chunks with (\d+) threads$", re.M)


def poll(cond, seconds: float) -> bool:
    """Whether cond() became true within `seconds`."""
    until = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > until:
            return False
        time.sleep(0.02)
    return True


def wait_for(cond, seconds: float, what: str) -> None:
    if not poll(cond, seconds):
        raise SystemExit(f"timed out waiting for {what}")


def child_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])


def digest(d: Path, child: int) -> str:
    """The child's SHA-256 of its state.  The signal is sent again until it answers: one that lands while
    a just-restored task is still leaving CRIU's restorer runs the handler and then the task re-enters
    the pause() it was dumped in (seen once in 30 restores, on CRIU's own path too)."""
    (d / "digest").unlink(missing_ok=True)
    for _ in range(12):
        os.kill(child, signal.SIGUSR1)
        if poll((d / "digest").exists, 10):
            return (d / "digest").read_text()
    raise SystemExit("timed out waiting for the child's digest")


def gone(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:  # `criu restore -d` left it to init
        return not Path(f"/proc/{pid}").exists()


def kill_tree(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)  # the pid namespace's init: the kernel kills the rest
    wait_for(lambda: gone(pid), 30, "tree gone")


def restore(criu: str, images: Path, work: Path, threads: int) -> tuple[float, int, dict[int, tuple[int, int]]]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CRIU_PARALLEL_READS"}
    env["CRIU_PARALLEL_READS"] = str(threads)
    t = time.monotonic()
    p = subprocess.run([criu, "restore", "-D", str(images), "-W", str(work), "-d", "--pidfile", str(work / "pid"),
                        "-o", "restore.log", "-v4"], env=env, capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - t
    if p.returncode:
        raise SystemExit(f"criu restore failed ({p.returncode}), see {work}/restore.log")
    log = (work / "restore.log").read_text()
    return wall, int((work / "pid").read_text()), {int(m[1]): (int(m[2]), int(m[3])) for m in LINE.finditer(log)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--criu", default=os.environ.get("WARMSTART_CRIU", "/usr/local/sbin/criu"))
    ap.add_argument("--child-mib", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--settings", default="0,2,4")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    settings = [int(x) for x in args.settings.split(",")]
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="criu-par-children-") as tmp:
        d = Path(tmp)
        (d / "tree.py").write_text(TREE)
        u = subprocess.Popen(["unshare", "--pid", "--fork", sys.executable, str(d / "tree.py"), str(d),
                              str(args.child_mib)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for(lambda: Path(f"/proc/{u.pid}/task/{u.pid}/children").read_text().split(), 30, "tree")
            root = child_of(u.pid)
            wait_for(lambda: (d / "ready").exists(), 300, "child filled")
            want = digest(d, child_of(root))
            (d / "img").mkdir()
            subprocess.run([args.criu, "dump", "-t", str(root), "-D", str(d / "img"), "-o", "dump.log"],
                           check=True)
            u.wait(timeout=60)
        finally:
            if u.poll() is None:  # the dump failed: the tree still runs; killing its pid namespace's init ends it
                for pid in Path(f"/proc/{u.pid}/task/{u.pid}/children").read_text().split():
                    os.kill(int(pid), signal.SIGKILL)
                u.wait(timeout=60)
        img_bytes = sum(f.stat().st_size for f in (d / "img").glob("pages-*.img"))
        if img_bytes < args.child_mib << 20:
            raise SystemExit(f"the dump holds {img_bytes} bytes of pages, less than the child's {args.child_mib} MiB")
        print(f"dumped: {img_bytes} bytes of pages", flush=True)
        for f in (d / "img").iterdir():  # page cache warm
            with open(f, "rb") as fh:
                while fh.read(16 << 20):
                    pass
        samples: dict[int, list[float]] = {s: [] for s in settings}
        reads: dict[int, dict] = {}
        loads: list[float] = []  # 1-min load average after each restore: this VM is shared
        for rep in range(args.reps):
            order = settings[rep % len(settings):] + settings[:rep % len(settings)]
            for s in order:
                wall, pid, rd = restore(args.criu, d / "img", d / f"work-{s}", s)
                try:
                    got = digest(d, child_of(pid))
                finally:
                    kill_tree(pid)
                if got != want:
                    raise SystemExit(f"CRIU_PARALLEL_READS={s}: the child's state differs after the restore")
                samples[s].append(wall)
                loads.append(os.getloadavg()[0])
                reads[s] = {str(k): {"bytes": v[0], "workers": v[1]} for k, v in rd.items()}
                print(f"rep {rep} CRIU_PARALLEL_READS={s}: {wall:.3f} s, parallel reads {rd}", flush=True)
                time.sleep(1)
    res = {
        "what": "criu restore -d wall time, root + one child holding the state, page cache warm",
        "criu": args.criu, "child_mib": args.child_mib, "page_image_bytes": img_bytes, "reps": args.reps,
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "thp": Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip(),
                    "loadavg_1min": [round(x, 2) for x in loads]},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "results": {str(s): {"samples_s": [round(x, 4) for x in samples[s]],
                             "median_s": round(statistics.median(samples[s]), 4),
                             "min_s": round(min(samples[s]), 4), "max_s": round(max(samples[s]), 4),
                             "parallel_reads_by_task": reads[s]} for s in settings},
    }
    print(json.dumps(res["results"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
