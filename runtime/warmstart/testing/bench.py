"""`warmstart bench`: restore side by side with the physical floors, plain runc and podman, in one run.

For each state size (non-zero, non-repeating memory of the reference worker):

* cold start to ready vs restore to ready through warmstart-runtime (eager and
  lazy), plain `runc restore` of the same images, podman's in-place restore and
  its `--export`/`--import` restore (podman's own checkpoint of the same
  workload), all driven the way containerd's shim drives a runtime (stdio
  pipes, `create` + `start`), readiness = the first 200 from `GET /ready`;
* the floors, measured in the same run: faulting and filling fresh memory of
  the image's size, reading the image's page files (page-cached, and after
  dropping them from the cache with fadvise), writing the same bytes with
  `dd conv=fdatasync`;
* the dump (StopContainer's `kill 15`, a full warmstart checkpoint) against
  the write floor.

The restore variants and floors of one repetition run back to back with a
fixed pause between each; repetitions repeat the whole round (A/B/C interleaved,
same machine state).  A last section times warmstart-runtime against bare runc
per call (state, list, create, start, kill, delete of a plain container), and
another times the OCI hook warmstart-runtime injects into an opted-in container
(per create and per delete).  Everything started is removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config import INSTALLED_RUNTIME
from ..criu import PARALLEL_READS_ENV, has_parallel_reads
from ..runc import wait_exit
from ..state import StateDir
from .preflight import ready_to_run

RUNTIME = INSTALLED_RUNTIME
BENCH_CACHE = Path("/var/cache/warmstart/bench")
PODMAN_GLOBAL = ["--cgroup-manager", "cgroupfs", "--runtime", "runc"]
PODMAN_RUN = ["--network", "host", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
WORKER = ["/usr/bin/python3", "-u", "/opt/warmstart/refworker.py"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="1024,4096", help="worker state sizes in MiB, comma-separated (default 1024,4096)")
    p.add_argument("--reps", type=int, help="repetitions of each restore round (default 5; --gpu: 2)")
    p.add_argument("--cold-reps", type=int, default=2, help="cold starts (each followed by a dump) per size (default 2)")
    p.add_argument("--rounds", type=int, default=1, help="worker hash-chain rounds: the cold-start CPU work (default 1)")
    p.add_argument("--pause", type=float, help="fixed pause between measurements, seconds (default 2; --gpu: 1)")
    p.add_argument("--passthrough-reps", type=int, default=20, help="pass-through rounds (default 20; 0 skips)")
    p.add_argument("--hook-reps", type=int, default=20,
                   help="runs of the injected OCI hook, timed alone (default 20; 0 skips)")
    p.add_argument("--only", default="",
                   help="comma-separated subset of: warmstart,serial,lazy,runc,podman,podman-import,floors")
    p.add_argument("--no-podman", action="store_true", help="skip podman even if it is installed")
    p.add_argument("--json", type=Path, dest="json_out", help="write all results (with raw samples) to this file")
    p.add_argument("--plot", type=Path, help="draw the comparison into this PNG (needs matplotlib)")
    p.add_argument("--runtime", type=Path, default=RUNTIME, help="warmstart-runtime to measure")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="where checkpoints and bundles go (disk)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    from . import bench_gpu  # noqa: PLC0415 - bench_gpu builds on this module

    bench_gpu.add_arguments(p)


def say(msg: str, _t0: list[float] = [time.monotonic()]) -> None:  # noqa: B006 - a start time, on purpose
    print(f"[{time.monotonic() - _t0[0]:7.1f}s] {msg}", flush=True)


# -- statistics ----------------------------------------------------------------

def summary(samples: list[float]) -> dict[str, Any]:
    s = [float(x) for x in samples if x is not None]
    if not s:
        return {"median": None, "min": None, "max": None, "spread": None, "n": 0, "samples": []}
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
    return {"median": statistics.median(s), "min": min(s), "max": max(s), "iqr": q[2] - q[0],
            "spread": max(s) - min(s), "n": len(s), "samples": s}


def ratios(a: list[float], b: list[float]) -> list[float]:
    """Paired ratios (same repetition); a shorter list pairs with the other's median."""
    if not a or not b:
        return []
    if len(a) == len(b):
        return [x / y for x, y in zip(a, b) if y]
    mb = statistics.median(b)
    return [x / mb for x in a] if mb else []


# -- the worker rootfs -----------------------------------------------------------

def worker_rootfs() -> tuple[Path, Path, str]:
    """(rootfs dir, docker-archive, image ref) of the reference worker image, unpacked once and cached."""
    from .cri import images  # noqa: PLC0415

    tar, ref = images.build_worker_image(progress=say)
    out = BENCH_CACHE / tar.stem
    rootfs = out / "bundle" / "rootfs"
    if (rootfs / "opt/warmstart/refworker.py").exists():
        return rootfs, tar, ref
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, mode=0o700)
    layout = out / "oci"
    _run(["skopeo", "--insecure-policy", "copy", f"docker-archive:{tar}", f"oci:{layout}:bench"])
    _run(["umoci", "unpack", "--image", f"{layout}:bench", str(out / "bundle")])
    shutil.rmtree(layout, ignore_errors=True)
    return rootfs, tar, ref


def _run(argv: list[str], timeout: float = 600, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}… failed ({p.returncode}): {(p.stderr or p.stdout)[-500:]}")
    return p


# -- containers driven like the shim does ----------------------------------------

def spec(args: list[str], annotations: dict[str, str], cgroups_path: str) -> dict[str, Any]:
    caps = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_KILL", "CAP_SETGID", "CAP_SETUID",
            "CAP_NET_BIND_SERVICE"]
    return {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": args,
                    "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                            "PYTHONDONTWRITEBYTECODE=1"],
                    "cwd": "/", "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
                    "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096}],
                    "noNewPrivileges": True},
        "root": {"path": "rootfs", "readonly": False},
        "hostname": "bench",
        "annotations": annotations,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
        ],
        # No network namespace: the worker listens on the host's loopback (podman: --network host),
        # so every variant is probed the same way.
        "linux": {"cgroupsPath": cgroups_path,
                  "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
                  "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list"],
                  "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]},
    }


@dataclass
class Box:
    """One container: bundle on an overlay of the worker rootfs, stdio pipes held here."""
    id: str
    bundle: Path
    fds: list[int] = field(default_factory=list)
    mounted: bool = False


class Node:
    """A private warmstart node; `copy_rootfs` copies `lower` per container instead of an overlay, and `edit`
    changes each container's spec before it is written (the GPU bench's devices and binds)."""

    def __init__(self, base: Path, lower: Path, runtime: Path, criu: str, copy_rootfs: bool = False,
                 edit: Callable[[dict[str, Any], Path], None] | None = None):
        self.base, self.lower, self.runtime, self.criu = base, lower, runtime, criu
        self.copy_rootfs, self.edit = copy_rootfs, edit
        self.runc_root = base / "runc-root"
        self.config = base / "config.toml"
        self.store = base / "store" / "_local"  # containers outside Kubernetes: the _local scope
        common = (f'store = "{base / "store"}"\nseal_dir = "{base}/seals"\nstate_dir = "{base}/state"\n'
                  f'log_dir = "{base}/logs"\ncriu = "{criu}"\n')
        self.config.write_text(common)
        # the same node with CRIU's own single-threaded page reads: the "before" of parallel reads
        (base / "config-serial.toml").write_text(common + "restore_read_threads = 1\n")
        # plain runc gets CRIU's defaults, whatever the caller's environment says
        clean = {k: v for k, v in os.environ.items() if k != PARALLEL_READS_ENV}
        self.env = {**clean, "WARMSTART_CONFIG": str(self.config)}
        self.env_serial = {**clean, "WARMSTART_CONFIG": str(base / "config-serial.toml")}
        self.boxes: list[Box] = []

    def new(self, name: str, args: list[str], annotations: dict[str, str]) -> Box:
        cid = f"{name}-{secrets.token_hex(3)}"
        b = Box(cid, self.base / "bundles" / cid)
        if self.copy_rootfs:
            b.bundle.mkdir(parents=True)
            shutil.copytree(self.lower, b.bundle / "rootfs", symlinks=True)
        else:
            for d in ("rootfs", "upper", "work"):
                (b.bundle / d).mkdir(parents=True)
            _run(["mount", "-t", "overlay", "overlay", "-o",
                  f"lowerdir={self.lower},upperdir={b.bundle / 'upper'},workdir={b.bundle / 'work'}",
                  str(b.bundle / "rootfs")])
            b.mounted = True
        cfg = spec(args, annotations, f"/warmstart-bench/{cid}")
        if self.edit:
            self.edit(cfg, b.bundle / "rootfs")
        (b.bundle / "config.json").write_text(json.dumps(cfg))
        self.boxes.append(b)
        return b

    def globals(self, b: Box) -> list[str]:
        return ["--root", str(self.runc_root), "--log", str(b.bundle / "log.json"), "--log-format", "json"]

    def call(self, binary: Path | str, b: Box, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([str(binary), *self.globals(b), *args], capture_output=True, text=True,
                              timeout=timeout, env=self.env)

    def spawn(self, binary: Path | str, b: Box, *args: str, env: dict[str, str] | None = None) -> int:
        """create/restore with pipes as stdio, like the shim; returns the exit code."""
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        p = subprocess.Popen([str(binary), *self.globals(b), *args], stdin=in_r, stdout=out_w, stderr=err_w,
                             env=env or self.env)
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        b.fds += [in_w, out_r, err_r]
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)  # never read; a non-blocking end keeps nothing stuck
        return wait_exit(p, 900)  # exact: Popen.wait(timeout) polls in steps of up to 50 ms

    def create_start(self, binary: Path | str, b: Box, env: dict[str, str] | None = None) -> None:
        rc = self.spawn(binary, b, "create", "--bundle", str(b.bundle), "--pid-file", str(b.bundle / "init.pid"), b.id,
                        env=env)
        if rc != 0:
            raise RuntimeError(f"create {b.id} failed ({rc}): {_tail(b.bundle / 'log.json')}")
        p = self.call(binary, b, "start", b.id)
        if p.returncode != 0:
            raise RuntimeError(f"start {b.id} failed: {p.stderr[-300:]}")

    def wait_stopped(self, b: Box, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.call("runc", b, "state", b.id)
            if p.returncode != 0 or '"stopped"' in p.stdout:
                return
            time.sleep(0.05)

    def destroy(self, b: Box) -> None:
        self.call("runc", b, "kill", "--all", b.id, "9")
        self.wait_stopped(b, 20)
        self.call(self.runtime, b, "delete", "--force", b.id)
        for fd in b.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        b.fds.clear()
        if b.mounted:
            subprocess.run(["umount", "-l", str(b.bundle / "rootfs")], capture_output=True)
            b.mounted = False
        shutil.rmtree(b.bundle, ignore_errors=True)
        if b in self.boxes:
            self.boxes.remove(b)

    def cleanup(self) -> None:
        for b in list(self.boxes):
            self.destroy(b)


def _tail(p: Path) -> str:
    try:
        return p.read_text(errors="replace")[-400:]
    except OSError:
        return ""


def http(port: int, path: str, timeout: float = 5.0, method: str = "GET") -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"{method} {path} HTTP/1.0\r\nContent-Length: 0\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def wait_ready(port: int, timeout: float = 900) -> float:
    """Seconds until GET /ready answers 200 (probing every 2 ms); returns the monotonic time it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            code, _ = http(port, "/ready", timeout=timeout)
            if code == 200:
                return time.monotonic()
        except OSError:
            pass
        time.sleep(0.002)
    raise TimeoutError(f"worker on port {port} not ready within {timeout}s")


def infer(port: int, verify: bool = False) -> dict[str, Any]:
    code, body = http(port, "/infer?verify=1" if verify else "/infer", timeout=600)
    return json.loads(body) if code == 200 else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- floors --------------------------------------------------------------------

FILL = r'''
import mmap, os, sys, time
n = int(sys.argv[1]); src = os.urandom(1 << 22); step = len(src)
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
t = time.monotonic()
for off in range(0, n - step + 1, step):
    m[off:off + step] = src
print(t, time.monotonic())
'''


def fill_floor(nbytes: int, procs: int = 1) -> float:
    """Fault and fill fresh anonymous memory of the image's size (4 KiB pages unless THP), split over
    `procs` fresh processes filling at once: first start to last end."""
    ps = [subprocess.Popen(["/usr/bin/python3", "-I", "-S", "-c", FILL, str(nbytes // procs)],
                           stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    spans = []
    for p in ps:
        out, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"fill floor process failed ({p.returncode})")
        spans.append([float(x) for x in out.split()])
    return max(e for _, e in spans) - min(b for b, _ in spans)


def page_files(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("pages-*.img"))


def read_floor(files: list[Path], drop: bool) -> float:
    """Read the image's page files into one reused buffer; drop=True evicts them from the page cache first."""
    if drop:
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    buf = bytearray(1 << 24)
    t = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t


def write_floor(files: list[Path], out: Path) -> float:
    """`dd … conv=fdatasync` of the same bytes to the same file system."""
    total = 0.0
    for f in files:
        t = time.perf_counter()
        _run(["dd", f"if={f}", f"of={out}", "bs=4M", "conv=fdatasync"])
        total += time.perf_counter() - t
        out.unlink(missing_ok=True)
    return total


def warm_cache(files: list[Path]) -> None:
    read_floor(files, drop=False)


# -- podman ----------------------------------------------------------------------

class Podman:
    def __init__(self, tar: Path, ref: str):
        self.tar, self.ref = tar, ref
        self.names: list[str] = []

    @staticmethod
    def available() -> bool:
        return shutil.which("podman") is not None

    def pm(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        return _run(["podman", *PODMAN_GLOBAL, *args], check=check, timeout=timeout)

    def ensure_image(self) -> None:
        if self.pm("image", "exists", self.ref, check=False).returncode != 0:
            self.pm("load", "-i", str(self.tar))

    def rm(self, name: str) -> None:
        self.pm("rm", "-f", "-t", "0", name, check=False)
        if name in self.names:
            self.names.remove(name)

    def cleanup(self) -> None:
        for n in list(self.names):
            self.rm(n)


# -- the benchmark -------------------------------------------------------------

@dataclass
class SizeResult:
    state_mb: int
    samples: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    checkpoint_bytes: int = 0
    pages_bytes: int = 0
    restore_phases: list[dict[str, Any]] = field(default_factory=list)
    lazy_phases: list[dict[str, Any]] = field(default_factory=list)
    dump_phases: list[dict[str, Any]] = field(default_factory=list)

    def add(self, key: str, v: float | None) -> None:
        if v is not None:
            self.samples.setdefault(key, []).append(v)


def runtime_log(node: Node, cid: str, needle: str) -> dict[str, Any]:
    p = node.base / "logs" / "runtime.log"
    for line in reversed(p.read_text().splitlines() if p.exists() else []):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("container") == cid and needle in rec.get("msg", ""):
            return rec
    return {}


def lazy_daemons(work_hint: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"lazy-pages" in cmd and any(work_hint.encode() in c for c in cmd):
                out.append(int(d.name))
    return out


def wait_gone(pids: list[int], timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{p}").exists() for p in pids):
            return time.monotonic()
        time.sleep(0.01)
    return None


def bench_size(node: Node, pod: Podman | None, mb: int, args: argparse.Namespace, which: set[str]) -> SizeResult:
    r = SizeResult(mb)
    port = free_port()
    wargs = WORKER + ["--host", "127.0.0.1", "--port", str(port), "--state-mb", str(mb), "--rounds", str(args.rounds)]
    ckpt_id = ""
    checksum = ""
    # -- cold starts, each checkpointed by warmstart on stop -------------------
    for i in range(args.cold_reps):
        cid = f"bench-{mb}-{secrets.token_hex(3)}"
        b = node.new(f"cold{mb}", wargs, {"warmstart.dev/checkpoint": "on-stop", "warmstart.dev/id": cid})
        t = time.monotonic()
        node.create_start(node.runtime, b)
        r.add("cold_start_s", wait_ready(port) - t)
        checksum = infer(port)["checksum"]
        time.sleep(args.pause)
        t = time.monotonic()
        p = node.call(node.runtime, b, "kill", b.id, "15")
        r.add("dump_s", time.monotonic() - t)
        node.wait_stopped(b)
        node.destroy(b)
        meta_p = node.store / cid / "metadata.json"
        if p.returncode != 0 or not meta_p.exists():
            raise RuntimeError(f"no checkpoint from the cold run: {runtime_log(node, b.id, '')}")
        meta = json.loads(meta_p.read_text())
        r.dump_phases.append(meta["dump"]["phases"])
        r.add("dump_checkpoint_phase_s", meta["dump"]["phases"].get("checkpoint"))
        r.add("checkpoint_bytes", meta["sizes"]["total_bytes"])
        if not ckpt_id:
            ckpt_id = cid  # restores use the first checkpoint; later ones were only for dump timings
        else:
            shutil.rmtree(node.store / cid, ignore_errors=True)  # only its dump time mattered
        # write floor right after the dump, on the same file system
        files = page_files(node.store / ckpt_id)
        r.add("write_floor_s", write_floor(files, node.base / "dd.out"))
        say(f"{mb} MiB: cold start {r.samples['cold_start_s'][-1]:.2f}s, dump {r.samples['dump_s'][-1]:.2f}s, "
            f"write floor {r.samples['write_floor_s'][-1]:.2f}s")
        time.sleep(args.pause)
    ck = node.store / ckpt_id
    files = page_files(ck)
    r.pages_bytes = sum(f.stat().st_size for f in files)
    r.checkpoint_bytes = int(r.samples["checkpoint_bytes"][0])
    # podman's own checkpoint of the same workload
    pm_name = pm_export = None
    if pod and ({"podman", "podman-import"} & which):
        pm_name = f"ws-bench-{mb}-{secrets.token_hex(3)}"
        pod.names.append(pm_name)
        t = time.monotonic()
        pod.pm("run", "-d", "--name", pm_name, *PODMAN_RUN, pod.ref, *wargs[3:])
        r.add("podman_cold_start_s", wait_ready(port) - t)
        pm_export = node.base / f"{pm_name}.tar"
        time.sleep(args.pause)
        t = time.monotonic()
        pod.pm("container", "checkpoint", "--keep", "--export", str(pm_export), "--compress", "none", pm_name)
        r.add("podman_checkpoint_export_s", time.monotonic() - t)
        say(f"{mb} MiB: podman checkpoint (+export) {r.samples['podman_checkpoint_export_s'][-1]:.2f}s")
        time.sleep(args.pause)

    def warmstart(lazy: bool, serial: bool = False) -> None:
        ann = {"warmstart.dev/checkpoint": "restore-only", "warmstart.dev/id": ckpt_id}
        if lazy:
            ann["warmstart.dev/restore"] = "lazy"
        b = node.new(f"ws{mb}", wargs, ann)
        t = time.monotonic()
        node.create_start(node.runtime, b, env=node.env_serial if serial else None)
        ready = wait_ready(port)
        rec = runtime_log(node, b.id, "restored from")
        if not rec:
            raise RuntimeError(f"not restored: {runtime_log(node, b.id, '')}")
        mode = rec.get("restore_mode", "eager")
        if lazy:
            if mode != "lazy":
                r.notes.append(f"lazy run restored as: {mode}")
            r.add("time_to_first_response_s", ready - t)
            daemons = lazy_daemons(str(node.base))
            gone = wait_gone(daemons, 600) if daemons else ready
            r.add("lazy_all_pages_in_s", (gone - t) if gone else None)
            r.lazy_phases.append(rec.get("phases", {}))
        elif serial:
            r.add("restore_serial_reads_s", ready - t)
        else:
            r.add("restore_s", ready - t)
            r.restore_phases.append(rec.get("phases", {}))
        key = "verified_" + ("lazy" if lazy else "serial_reads" if serial else "eager")
        out = infer(port, verify=not r.samples.get(key))  # the whole state re-hashed once per variant
        if "verified" in out:
            r.add(key, 1.0 if out["verified"] and out["checksum"] == checksum else 0.0)
        node.destroy(b)
        if lazy:
            left = lazy_daemons(str(node.base))
            if left:
                r.notes.append(f"lazy-pages daemon still alive after delete: {left}")

    def plain_runc() -> None:
        b = node.new(f"runc{mb}", wargs, {})
        work = b.bundle / "criu-work"
        work.mkdir()
        t = time.monotonic()
        # the same argv shape warmstart sends (runc's global --criu, --no-subreaper), minus the wrapper
        rc = node.spawn("runc", b, "--criu", node.criu, "restore", "--detach", "--bundle", str(b.bundle),
                        "--image-path", str(ck), "--work-path", str(work), "--pid-file", str(b.bundle / "init.pid"),
                        "--no-subreaper", b.id)
        if rc != 0:
            raise RuntimeError(f"runc restore failed: {_tail(work / 'restore.log')}")
        r.add("runc_restore_s", wait_ready(port) - t)
        node.destroy(b)

    def podman_inplace() -> None:
        t = time.monotonic()
        pod.pm("container", "restore", "--keep", pm_name)
        r.add("podman_restore_s", wait_ready(port) - t)
        pod.pm("kill", pm_name)
        pod.pm("wait", pm_name, check=False)

    def podman_import() -> None:
        name = f"{pm_name}-imp-{secrets.token_hex(2)}"
        pod.names.append(name)
        t = time.monotonic()
        pod.pm("container", "restore", "--import", str(pm_export), "--name", name)
        r.add("podman_import_restore_s", wait_ready(port) - t)
        pod.rm(name)

    def floors() -> None:
        r.add("fill_floor_s", fill_floor(r.pages_bytes))
        time.sleep(args.pause)
        r.add("fill_floor_all_cores_s", fill_floor(r.pages_bytes, os.cpu_count() or 1))
        time.sleep(args.pause)
        r.add("read_cached_s", read_floor(files, drop=False))
        r.add("read_cold_s", read_floor(files, drop=True))
        warm_cache(files)  # restores below read a page-cached image, as after a dump or a prior restore

    steps: list[tuple[str, Callable[[], None]]] = [
        ("floors", floors), ("warmstart", lambda: warmstart(False)), ("runc", plain_runc),
        ("lazy", lambda: warmstart(True)), ("serial", lambda: warmstart(False, serial=True))]
    if pm_name:
        steps += [("podman", podman_inplace), ("podman-import", podman_import)]
        pod.pm("kill", pm_name, check=False)  # checkpoint --keep left it exited already; be sure
    steps = [s for s in steps if s[0] in which]
    warm_cache(files)
    for rep in range(args.reps):
        order = steps[rep % len(steps):] + steps[:rep % len(steps)]  # rotate: no variant always goes first
        for name, fn in order:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - one failed variant must not sink the run
                r.notes.append(f"rep {rep} {name}: {type(e).__name__}: {str(e)[:300]}")
                say(f"  {name} failed: {e}")
            time.sleep(args.pause)
        say(f"{mb} MiB rep {rep + 1}/{args.reps}: " + ", ".join(
            f"{k}={v[-1]:.3f}" for k, v in r.samples.items()
            if k in ("restore_s", "restore_serial_reads_s", "time_to_first_response_s", "lazy_all_pages_in_s",
                     "runc_restore_s", "podman_restore_s", "podman_import_restore_s", "fill_floor_s",
                     "fill_floor_all_cores_s") and v))
    if pm_name:
        pod.rm(pm_name)
        if pm_export:
            pm_export.unlink(missing_ok=True)
    return r


def bench_passthrough(node: Node, reps: int, pause: float) -> dict[str, dict[str, list[float]]]:
    """Per-call wall time of warmstart-runtime and bare runc on a plain (not opted-in) container."""
    out: dict[str, dict[str, list[float]]] = {"warmstart": {}, "runc": {}}
    for rep in range(reps):
        for rt_name in (("warmstart", "runc") if rep % 2 == 0 else ("runc", "warmstart")):
            binary = node.runtime if rt_name == "warmstart" else "runc"
            b = node.new("pt", ["/bin/sleep", "1000"], {})
            rec = out[rt_name]

            def timed(name: str, fn: Callable[[], Any]) -> None:
                t = time.perf_counter()
                fn()
                rec.setdefault(name, []).append(time.perf_counter() - t)
            timed("create", lambda: node.spawn(binary, b, "create", "--bundle", str(b.bundle),
                                               "--pid-file", str(b.bundle / "init.pid"), b.id))
            timed("start", lambda: node.call(binary, b, "start", b.id))
            timed("state", lambda: node.call(binary, b, "state", b.id))
            timed("list", lambda: node.call(binary, b, "list"))
            timed("kill", lambda: node.call(binary, b, "kill", b.id, "9"))
            node.wait_stopped(b)
            timed("delete", lambda: node.call(binary, b, "delete", b.id))
            node.destroy(b)
        time.sleep(pause / 10)
    return out


def bench_hook(node: Node, reps: int) -> dict[str, Any]:
    """The OCI hooks warmstart-runtime injects, timed as runc runs them: the exact command and env from a
    real opted-in create's config.json, the OCI state on stdin, `reps` times each.

    poststop runs once per delete of an opted-in container, inside `runc delete`: timed as it runs
    within warmstart-runtime's own delete (the state dir present, its busy lock held: the hook leaves
    the dir to the runtime) and as it runs when runc deletes the container without warmstart-runtime
    (it releases the state: a copy of the real state dir is put back before each run).  The
    interpreter's start-up alone is the floor of any Python hook.  Per create: the hooks of the
    createRuntime, prestart and createContainer stages, none today.
    """
    b = node.new("hook", ["/bin/sleep", "1000"], {"warmstart.dev/checkpoint": "restore-only",
                                                    "warmstart.dev/id": f"hook-{secrets.token_hex(4)}"})
    try:
        rc = node.spawn(node.runtime, b, "create", "--bundle", str(b.bundle), "--pid-file", str(b.bundle / "init.pid"),
                        b.id)
        if rc != 0:
            raise RuntimeError(f"create {b.id} failed ({rc}): {_tail(b.bundle / 'log.json')}")
        hooks = json.loads((b.bundle / "config.json").read_text()).get("hooks") or {}
        state_dir = node.base / "state" / "containers" / b.id
        template = node.base / "hook-state-template"
        shutil.copytree(state_dir, template, symlinks=True)
    finally:
        node.destroy(b)
    ours = [h for h in hooks.get("poststop", []) if "warmstart" in json.dumps(h)]
    per_create = [h for stage in ("createRuntime", "prestart", "createContainer") for h in hooks.get(stage, [])
                  if "warmstart" in json.dumps(h)]
    out: dict[str, Any] = {"per_create_hooks": len(per_create), "per_delete_hooks": len(ours)}
    state = json.dumps({"ociVersion": "1.0.2", "id": b.id, "status": "stopped", "bundle": str(b.bundle)})

    def timed(hook: dict[str, Any], argv: list[str] | None = None, before: Callable[[], None] | None = None
              ) -> dict[str, Any]:
        env = dict(e.split("=", 1) for e in hook.get("env") or [])
        ms = []
        for _ in range(reps):
            if before:
                before()
            t = time.perf_counter()
            subprocess.run(argv or hook["args"], executable=hook["path"], input=state, text=True, env=env,
                           capture_output=True, timeout=hook.get("timeout", 10))
            ms.append((time.perf_counter() - t) * 1e3)
        return summary(ms)

    def put_back() -> None:
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.copytree(template, state_dir, symlinks=True)

    try:
        if per_create:
            out["per_create_ms"] = timed(per_create[0])
        if ours:
            put_back()
            fd = StateDir(state_dir.parent.parent, b.id).hold_busy()  # as warmstart-runtime's delete does
            try:
                out["poststop_ms"] = timed(ours[0])
            finally:
                os.close(fd)
            out["poststop_releasing_ms"] = timed(ours[0], before=put_back)
            out["poststop_released_the_state_dir"] = not state_dir.exists()
            out["python_startup_ms"] = timed(ours[0], [ours[0]["args"][0], "-IS", "-c", "pass"])
            out["command"] = ours[0]["args"]
    finally:
        shutil.rmtree(template, ignore_errors=True)
        shutil.rmtree(state_dir, ignore_errors=True)
    return out


def machine(criu: str) -> dict[str, Any]:
    def read(p: str) -> str:
        try:
            return Path(p).read_text().strip()
        except OSError:
            return ""
    mem = read("/proc/meminfo").splitlines()[0] if read("/proc/meminfo") else ""
    cpu = next((x.split(":", 1)[1].strip() for x in read("/proc/cpuinfo").splitlines() if x.startswith("model name")), "")
    return {"host": platform.node(), "kernel": platform.release(), "cpu": cpu, "cores": os.cpu_count(),
            "mem": mem, "thp_enabled": read("/sys/kernel/mm/transparent_hugepage/enabled"),
            "thp_defrag": read("/sys/kernel/mm/transparent_hugepage/defrag"),
            "loadavg": read("/proc/loadavg"),
            "runc": _run(["runc", "--version"], check=False).stdout.splitlines()[:1],
            "criu": _run([criu, "--version"], check=False).stdout.split(),
            "criu_parallel_reads_patch": has_parallel_reads(Path(criu)),
            "podman": _run(["podman", "--version"], check=False).stdout.strip() if shutil.which("podman") else None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def derive(sr: SizeResult) -> dict[str, Any]:
    s = sr.samples
    cold_med = statistics.median(s["cold_start_s"]) if s.get("cold_start_s") else None
    out: dict[str, Any] = {k: summary(v) for k, v in s.items() if not k.startswith("verified_")}
    out["speedup"] = summary([cold_med / x for x in s.get("restore_s", []) if x] if cold_med else [])
    out["speedup_lazy"] = summary([cold_med / x for x in s.get("time_to_first_response_s", []) if x]
                                  if cold_med else [])
    out["restore_vs_fill_floor"] = summary(ratios(s.get("restore_s", []), s.get("fill_floor_s", [])))
    out["restore_vs_fill_floor_all_cores"] = summary(ratios(s.get("restore_s", []),
                                                            s.get("fill_floor_all_cores_s", [])))
    out["restore_vs_runc_restore"] = summary(ratios(s.get("restore_s", []), s.get("runc_restore_s", [])))
    out["restore_vs_serial_reads"] = summary(ratios(s.get("restore_s", []), s.get("restore_serial_reads_s", [])))
    out["restore_vs_podman"] = summary(ratios(s.get("restore_s", []), s.get("podman_restore_s", [])))
    out["lazy_vs_podman"] = summary(ratios(s.get("time_to_first_response_s", []), s.get("podman_restore_s", [])))
    out["dump_vs_write_floor"] = summary(ratios(s.get("dump_s", []), s.get("write_floor_s", [])))
    fill = statistics.median(s["fill_floor_s"]) if s.get("fill_floor_s") else None
    if fill is not None and s.get("restore_s"):
        out["eager_goal_s"] = 1.3 * fill + 0.15
        out["eager_goal_met"] = statistics.median(s["restore_s"]) <= out["eager_goal_s"]
    out["checkpoint_bytes"] = summary(s.get("checkpoint_bytes", []))
    out["pages_bytes"] = sr.pages_bytes
    out["state_verified"] = {str(k): v for k, v in s.items() if k.startswith("verified_")}
    out["restore_phases"] = sr.restore_phases
    out["lazy_phases"] = sr.lazy_phases
    out["dump_phases"] = sr.dump_phases
    out["notes"] = sr.notes
    return out


ROWS = [("cold start → ready", "cold_start_s"), ("warmstart restore → ready (eager)", "restore_s"),
        ("  eager, CRIU's single-threaded page reads", "restore_serial_reads_s"),
        ("warmstart lazy restore → first response", "time_to_first_response_s"),
        ("  lazy: all pages in (daemon exits)", "lazy_all_pages_in_s"),
        ("plain runc restore → ready", "runc_restore_s"), ("podman restore in place → ready", "podman_restore_s"),
        ("podman restore --import → ready", "podman_import_restore_s"),
        ("floor: fault+fill fresh memory", "fill_floor_s"),
        ("floor: fault+fill, split over all cores", "fill_floor_all_cores_s"),
        ("floor: read image (page cache)", "read_cached_s"),
        ("floor: read image (cold)", "read_cold_s"), ("dump (kill 15 → checkpoint published)", "dump_s"),
        ("floor: write image (dd fdatasync)", "write_floor_s"),
        ("podman checkpoint + export", "podman_checkpoint_export_s"),
        ("speed-up (cold / eager restore)", "speedup"), ("eager restore / fill floor", "restore_vs_fill_floor"),
        ("eager restore / fill floor over all cores", "restore_vs_fill_floor_all_cores"),
        ("eager restore / runc restore", "restore_vs_runc_restore"),
        ("eager restore / single-threaded reads", "restore_vs_serial_reads"),
        ("eager restore / podman in place", "restore_vs_podman"), ("lazy first response / podman", "lazy_vs_podman"),
        ("dump / write floor", "dump_vs_write_floor")]


def table(results: dict[str, Any]) -> str:
    sizes = list(results["sizes"])
    head = "| measurement | " + " | ".join(f"{int(s) // 1024 if int(s) % 1024 == 0 else s}"
                                         f"{' GiB' if int(s) % 1024 == 0 else ' MiB'}: median [min–max]"
                                         for s in sizes) + " |"
    lines = [head, "|---|" + "---|" * len(sizes)]
    for label, key in ROWS:
        cells = []
        for s in sizes:
            d = results["sizes"][s].get(key) or {}
            if not d.get("n"):
                cells.append("–")
                continue
            unit = "×" if not key.endswith("_s") else " s"
            cells.append(f"{d['median']:.3f}{unit} [{d['min']:.3f}–{d['max']:.3f}] n={d['n']}")
        if any(c != "–" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    pt = results.get("passthrough_overhead_ms")
    if pt:
        lines += ["", "| pass-through call | bare runc (ms, median) | warmstart-runtime (ms, median) | overhead (ms) |",
                  "|---|---|---|---|"]
        for call, d in pt["per_call"].items():
            lines.append(f"| {call} | {d['runc_ms']['median']:.1f} | {d['warmstart_ms']['median']:.1f} | "
                         f"{d['overhead_ms']['median']:+.1f} [{d['overhead_ms']['min']:+.1f}…"
                         f"{d['overhead_ms']['max']:+.1f}] |")
    hk = results.get("hook_ms")
    if hk and "error" not in hk:
        lines += ["", "| injected OCI hook | hooks | ms, median [min–max] |", "|---|---|---|"]
        for label, n, key in (("per create (createRuntime, prestart, createContainer)", hk["per_create_hooks"],
                               "per_create_ms"),
                              ("per delete: poststop in warmstart-runtime's delete", hk["per_delete_hooks"],
                               "poststop_ms"),
                              ("  poststop when runc deletes without it (releases the state)", "",
                               "poststop_releasing_ms"),
                              ("  the interpreter's start-up alone", "", "python_startup_ms")):
            d = hk.get(key) or {}
            cost = f"{d['median']:.1f} [{d['min']:.1f}–{d['max']:.1f}] n={d['n']}" if d.get("n") else "0"
            lines.append(f"| {label} | {n} | {cost} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: /opt/warmstart/venv/bin/pip install matplotlib") from None
    keys = [("fill floor", "fill_floor_s"), ("fill floor\n(all cores)", "fill_floor_all_cores_s"),
            ("read (cached)", "read_cached_s"), ("read (cold)", "read_cold_s"),
            ("warmstart eager", "restore_s"), ("eager, 1-thread\nreads", "restore_serial_reads_s"),
            ("warmstart lazy\n(1st response)", "time_to_first_response_s"),
            ("runc restore", "runc_restore_s"), ("podman in place", "podman_restore_s"),
            ("podman --import", "podman_import_restore_s"), ("cold start", "cold_start_s")]
    sizes = list(results["sizes"])
    fig, ax = plt.subplots(figsize=(12, 5.5))
    width = 0.8 / max(1, len(sizes))
    for j, s in enumerate(sizes):
        d = results["sizes"][s]
        med = [(d.get(k) or {}).get("median") or 0 for _, k in keys]
        lo = [m - ((d.get(k) or {}).get("min") or m) for m, (_, k) in zip(med, keys)]
        hi = [((d.get(k) or {}).get("max") or m) - m for m, (_, k) in zip(med, keys)]
        xs = [i + (j - (len(sizes) - 1) / 2) * width for i in range(len(keys))]
        bars = ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, label=f"{int(s) / 1024:g} GiB state")
        for x, m in zip(xs, med):
            if m:
                ax.text(x, m * 1.08, f"{m:.2f}", ha="center", va="bottom", fontsize=7, rotation=90)
        del bars
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([k for k, _ in keys], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("seconds (median, bars: min–max; log scale)")
    m = results.get("machine", {})
    ax.set_title(f"restore to ready vs floors and peers — {m.get('cores')} cores, kernel {m.get('kernel')}, "
                 f"THP {m.get('thp_enabled', '')}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args: argparse.Namespace) -> int:
    if args.gpu:
        from . import bench_gpu  # noqa: PLC0415

        return bench_gpu.run(args)
    args.reps = 5 if args.reps is None else args.reps
    args.pause = 2.0 if args.pause is None else args.pause
    if not ready_to_run("bench", args.runtime, "runc, CRIU, podman, mounts"):
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401, PLC0415
        except ImportError:
            print("warmstart bench: --plot needs matplotlib (/opt/warmstart/venv/bin/pip install matplotlib)",
                  file=sys.stderr)
            return 2
    which = {"warmstart", "serial", "lazy", "runc", "podman", "podman-import", "floors"}
    if args.only:
        which &= {x.strip() for x in args.only.split(",")}
    from .. import config as wconfig  # noqa: PLC0415
    criu = str(wconfig.load().criu)
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    base = Path(tempfile.mkdtemp(prefix="warmstart-bench-", dir=args.workdir))
    base.chmod(0o700)
    say(f"work dir {base}; preparing the worker rootfs")
    lower, tar, ref = worker_rootfs()
    node = Node(base, lower, args.runtime, criu)
    pod = None
    if not args.no_podman and Podman.available() and ({"podman", "podman-import"} & which):
        pod = Podman(tar, ref)
        pod.ensure_image()
    elif not args.no_podman and ({"podman", "podman-import"} & which):
        say("podman not installed: skipping the podman comparison (apt-get install podman)")
    results: dict[str, Any] = {"machine": machine(criu), "command": "warmstart bench " + " ".join(sys.argv[2:]),
                               "params": {"sizes_mb": sizes, "reps": args.reps, "cold_reps": args.cold_reps,
                                          "rounds": args.rounds, "pause_s": args.pause}, "sizes": {}}
    try:
        for mb in sizes:
            say(f"== {mb} MiB state ==")
            sr = bench_size(node, pod, mb, args, which)
            results["sizes"][str(mb)] = derive(sr)
        if args.passthrough_reps:
            say(f"== pass-through: {args.passthrough_reps} rounds of create/start/state/list/kill/delete ==")
            pt = bench_passthrough(node, args.passthrough_reps, args.pause)
            per = {}
            for call in pt["runc"]:
                a, w = pt["runc"][call], pt["warmstart"][call]
                per[call] = {"runc_ms": summary([x * 1e3 for x in a]), "warmstart_ms": summary([x * 1e3 for x in w]),
                             "overhead_ms": summary([(y - x) * 1e3 for x, y in zip(a, w)])}
            allov = [v for d in per.values() for v in d["overhead_ms"]["samples"]]
            results["passthrough_overhead_ms"] = {**summary(allov), "per_call": per}
        if args.hook_reps:
            say(f"== injected OCI hooks: {args.hook_reps} runs each ==")
            try:
                results["hook_ms"] = bench_hook(node, args.hook_reps)
            except Exception as e:  # noqa: BLE001 - the rest of the run still stands
                say(f"hook timing failed: {e}")
                results["hook_ms"] = {"error": str(e)[:300]}
        # top-level keys of the largest size, for a quick look
        if results["sizes"]:
            last = results["sizes"][str(sizes[-1])]
            for k in ("cold_start_s", "restore_s", "speedup", "restore_vs_fill_floor", "restore_vs_runc_restore",
                      "restore_vs_podman", "dump_vs_write_floor", "time_to_first_response_s", "checkpoint_bytes"):
                results[k] = last.get(k)
        print()
        print(table(results))
        print()
        if args.json_out:
            args.json_out.write_text(json.dumps(results, indent=1, default=str))
            say(f"results written to {args.json_out}")
        if args.plot:
            plot(results, args.plot)
            say(f"plot written to {args.plot}")
        return 0
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    finally:
        node.cleanup()
        if pod:
            pod.cleanup()
        if args.keep:
            say(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
