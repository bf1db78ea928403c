"""`warmstart bench --gpu`: the GPU reference worker, cold vs restored, beside the floors, in one run.

The worker is runtime/warmstart/testing/worker/gpuworker.py (an HTTP front and a GPU engine child, a Qwen3-shaped
model of `--preset`, static KV cache, CUDA graphs), bound read-only into GPU containers built as
tests/gpu builds them (runtime/warmstart/testing/gpu_bundle.py) and driven as containerd's shim drives
warmstart-runtime.  For each variant — `full` (the whole worker in the image) and `sleep` (the
worker's `warmstart.dev/pre-dump` hook frees its KV cache, `post-restore` wakes it) — it measures:

* cold start → first correct generation (create to the first 200 of GET /generate), once;
* the stop with dump (`kill 15`), its phases from the checkpoint's metadata, and the image size;
* restore (`create` returns) → first correct generation, with the page cache warm and dropped
  (`echo 3 > /proc/sys/vm/drop_caches` first): the token ids and the SHA-256 of every step's
  logits must equal the cold worker's, bit for bit, for every batch size served;
* the floors, in the same run: reading the image from the page cache and from disk, copying the
  worker's GPU bytes host-to-device with torch (pinned and pageable memory), writing the image's
  bytes with fdatasync.

Restores and floors of one repetition run back to back, the order rotated per repetition
(interleaved A/B, same machine state).  The plan, with an estimate of each step, is printed first.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import bench, gpu_bundle
from .preflight import ready_to_run

WORKER_SRC = Path(__file__).resolve().parent / "worker" / "gpuworker.py"
WORKER_DST = "/opt/warmstart/gpuworker.py"
HOOK_REL = Path("tests/e2e/fixtures/fake_ctk_hook.sh")
VARIANTS = ("full", "sleep")
CACHES = ("warm", "dropped")
# For the plan printed up front: rough H200 costs (cold start includes compile and graph capture for two
# batch sizes; dump and restore per GB of image as measured in issue 13). Estimates, not measurements.
COLD_S = {"tiny": 30.0, "1.7b": 90.0, "8b": 150.0}
PARAM_GB = {"tiny": 0.001, "1.7b": 4.1, "8b": 16.4}
HOST_GB = 3.0  # the worker's host memory (torch, CUDA's host side) that lands in the image
DUMP_S_PER_GB, RESTORE_S_PER_GB = 3.0, {"warm": 0.5, "dropped": 1.3}
FLOOR_S_PER_GB = 2.5  # read cached + read from disk + write with fdatasync, per GB of image
TEARDOWN_S = 4.0
DEFAULT_KV_GB = {"tiny": 0.002, "1.7b": 7.0, "8b": 7.0}  # gpuworker's defaults

H2D = r'''
import json, sys, time, torch
n = int(sys.argv[1]); chunk = max(1, min(n, 1 << 30))
dev = torch.empty(chunk, dtype=torch.uint8, device="cuda")
out = {"bytes": n, "chunk": chunk}
for kind in ("pinned", "pageable"):
    host = torch.ones(chunk, dtype=torch.uint8).pin_memory() if kind == "pinned" else torch.ones(chunk, dtype=torch.uint8)
    dev.copy_(host); torch.cuda.synchronize()
    t = time.perf_counter(); left = n
    while left > 0:
        k = min(left, chunk); dev[:k].copy_(host[:k], non_blocking=kind == "pinned"); left -= k
    torch.cuda.synchronize(); out[kind + "_s"] = time.perf_counter() - t
    del host
print(json.dumps(out))
'''


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("GPU mode (--gpu)")
    g.add_argument("--gpu", action="store_true", help="benchmark the GPU reference worker (needs an NVIDIA GPU)")
    g.add_argument("--preset", choices=sorted(COLD_S), default="1.7b", help="worker model shape (default 1.7b)")
    g.add_argument("--variants", default="full,sleep", help="full, sleep (KV freed by the pre-dump hook)")
    g.add_argument("--caches", default="warm,dropped", help="page cache before each restore: warm, dropped")
    g.add_argument("--kv-cache-gb", type=float, help="worker's KV cache, GB (default 7 for 1.7b/8b)")
    g.add_argument("--batch-sizes", default="1,2", help="batch sizes served, each a CUDA graph (default 1,2)")
    g.add_argument("--new-tokens", type=int, default=32, help="tokens per checked generation (default 32)")
    g.add_argument("--no-compile", action="store_true", help="worker decodes eagerly (no torch.compile)")
    g.add_argument("--sleep-offload-weights", action="store_true",
                   help="the worker's sleep also moves its weights to host memory (vLLM's level 1)")
    g.add_argument("--no-floors", action="store_true", help="skip the floors")
    g.add_argument("--floor-reps", type=int, default=1, help="repetitions of the floors (default 1)")
    g.add_argument("--worker-device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: the whole path on a machine without a GPU (no devices, no H2D floor; use --preset tiny)")
    g.add_argument("--python", help="the python with torch that runs the worker (default: found)")
    g.add_argument("--ctk-hook", type=Path, help=f"stand-in toolkit hook (default: {HOOK_REL} of this checkout)")
    g.add_argument("--plan-only", action="store_true", help="print the plan and its estimated cost, run nothing")


# -- set-up ------------------------------------------------------------------------------

def find_python(given: str | None) -> str | None:
    for py in (given, os.environ.get("WARMSTART_TORCH_PYTHON"), "/opt/torch/.venv/bin/python3", sys.executable,
               shutil.which("python3")):
        if py and Path(py).exists() and subprocess.run([py, "-c", "import torch, transformers"],
                                                       capture_output=True).returncode == 0:
            return str(Path(py).absolute())
    return None


def find_hook(given: Path | None) -> Path | None:
    for h in ([given] if given else [Path.cwd() / HOOK_REL, Path(__file__).resolve().parents[3] / HOOK_REL]):
        if h and h.is_file() and os.access(h, os.X_OK):
            return h.resolve()
    return None


def parse_list(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    out = [x.strip() for x in value.split(",") if x.strip()]
    bad = [x for x in out if x not in allowed]
    if bad or not out:
        raise ValueError(f"{flag}: {','.join(bad) or 'empty'} not one of {','.join(allowed)}")
    return out


@dataclass
class Plan:
    preset: str
    variants: list[str]
    caches: list[str]
    reps: int
    floor_reps: int
    kv_gb: float
    steps: list[tuple[str, float]] = field(default_factory=list)

    def image_gb(self, variant: str) -> float:
        return PARAM_GB[self.preset] + HOST_GB + (self.kv_gb if variant == "full" else 0.0)

    def estimate(self) -> None:
        for v in self.variants:
            gb = self.image_gb(v)
            self.steps.append((f"cold start + dump ({v}, ~{gb:.1f} GB image)",
                               COLD_S[self.preset] + DUMP_S_PER_GB * gb + TEARDOWN_S))
        for v in self.variants:
            for c in self.caches:
                self.steps.append((f"{self.reps} × restore ({v}, cache {c})",
                                   self.reps * (RESTORE_S_PER_GB[c] * self.image_gb(v) + TEARDOWN_S + 2)))
            if self.floor_reps:
                self.steps.append((f"{self.floor_reps} × floors ({v})",
                                   self.floor_reps * FLOOR_S_PER_GB * self.image_gb(v) + 3))

    def total(self) -> float:
        return sum(s for _, s in self.steps)


def make_plan(args: argparse.Namespace) -> Plan:
    p = Plan(args.preset, parse_list(args.variants, VARIANTS, "--variants"),
             parse_list(args.caches, CACHES, "--caches"), args.reps if args.reps is not None else 2,
             0 if args.no_floors else min(args.floor_reps, args.reps or 2), args.kv_cache_gb if args.kv_cache_gb is not None else DEFAULT_KV_GB[args.preset])
    if p.reps < 1 or args.floor_reps < 0:
        raise ValueError("--reps: at least 1; --floor-reps: 0 or more")
    p.estimate()
    return p


def worker_args(python: str, port: int, args: argparse.Namespace) -> list[str]:
    out = [python, "-u", WORKER_DST, "--host", "127.0.0.1", "--port", str(port), "--device", args.worker_device,
           "--preset", args.preset, "--batch-sizes", args.batch_sizes, "--new-tokens", str(args.new_tokens)]
    if args.kv_cache_gb is not None:
        out += ["--kv-cache-gb", str(args.kv_cache_gb)]
    if args.no_compile:
        out.append("--no-compile")
    if args.sleep_offload_weights:
        out.append("--sleep-offload-weights")
    return out


def annotations(variant: str, mode: str, ckpt_id: str, port: int) -> dict[str, str]:
    ann = {"warmstart.dev/checkpoint": mode, "warmstart.dev/id": ckpt_id}
    if variant == "sleep":
        ann.update({"warmstart.dev/pre-dump": f"POST :{port}/sleep?level=1",
                    "warmstart.dev/post-restore": f"POST :{port}/wake_up", "warmstart.dev/hook-timeout": "300"})
    return ann


def gpu_edit(python: str, hook: Path, device: str) -> Callable[[dict[str, Any], Path], None]:
    """The spec edit that makes bench's plain spec a GPU worker's (see gpu_bundle)."""
    def edit(cfg: dict[str, Any], rootfs: Path) -> None:
        gpu_bundle.add_gpu(cfg, rootfs, python, hook)
        if device == "cpu":  # no driver libraries to find; the host's own python may need its own libpython
            cfg["process"]["env"] = [e for e in cfg["process"]["env"] if not e.startswith("LD_LIBRARY_PATH=")]
        gpu_bundle.bind_file(cfg, rootfs, WORKER_SRC, WORKER_DST)
        cfg["mounts"].append({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                              "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]})
        # no passwd in the rootfs: name home, user and caches, or inductor's getpass() and Path.home() fail
        cfg["process"]["env"] += ["HOME=/root", "USER=root", "PYTHONUNBUFFERED=1",
                                  "TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor", "TRITON_CACHE_DIR=/tmp/triton"]
    return edit


def make_template(root: Path) -> Path:
    """A rootfs with nothing of its own: the host's /usr and the torch prefixes are bound in (gpu_bundle)."""
    for d in ("proc", "sys", "dev", "tmp", "etc", "usr", "run", "root", "opt/warmstart"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        if Path("/" + link).is_symlink():
            (root / link).symlink_to(os.readlink("/" + link))
    for f in ("passwd", "group", "nsswitch.conf", "hosts"):
        if Path("/etc", f).is_file():
            shutil.copy(Path("/etc", f), root / "etc" / f)
    return root


# -- a running worker --------------------------------------------------------------------

class Drain:
    """Reads a container's stdout and stderr pipes (a full pipe would stall the worker); keeps the tail."""

    def __init__(self, fds: list[int]) -> None:
        self.fds, self.lines = fds, deque(maxlen=200)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        buf = b""
        while not self.stop.is_set():
            try:
                ready = select.select(self.fds, [], [], 0.2)[0]
            except (OSError, ValueError):
                return
            for fd in ready:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                if not chunk:
                    self.fds = [f for f in self.fds if f != fd]
                buf += chunk
                *done, buf = buf.split(b"\n")
                self.lines.extend(x.decode(errors="replace") for x in done)
            if not self.fds:
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)

    def tail(self, n: int = 15) -> str:
        return "\n".join(list(self.lines)[-n:])

    def find(self, prefix: str) -> str:
        return next((x for x in reversed(self.lines) if x.startswith(prefix)), "")


def request(port: int, method: str, path: str, timeout: float = 600) -> tuple[int, dict[str, Any]]:
    code, body = bench.http(port, path, timeout=timeout, method=method)
    try:
        return code, json.loads(body)
    except ValueError:
        return code, {"raw": body[:200].decode(errors="replace")}


def first_generation(port: int, batch: int, new_tokens: int, timeout: float,
                     alive: Callable[[], bool]) -> tuple[float, dict[str, Any]]:
    """Poll GET /generate until it answers 200: (the monotonic time it did, its body)."""
    deadline = time.monotonic() + timeout
    fast_until = time.monotonic() + 30
    last = ""
    while time.monotonic() < deadline:
        try:
            code, body = request(port, "GET", f"/generate?batch={batch}&new_tokens={new_tokens}")
            if code == 200:
                return time.monotonic(), body
            last = f"HTTP {code} {body}"
            if code != 503:
                raise RuntimeError(f"generate answered {last}")
        except OSError as e:
            last = str(e)
        if not alive():
            raise RuntimeError(f"the worker's container stopped ({last})")
        time.sleep(0.005 if time.monotonic() < fast_until else 0.1)  # a restore answers within seconds
    raise TimeoutError(f"no generation within {timeout:.0f}s ({last})")


def drop_caches(files: list[Path]) -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass
    for f in files:  # and these files for sure, where the global drop is not allowed
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def image_files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.rglob("*") if p.is_file() and not p.is_symlink())


def h2d_floor(python: str, nbytes: int) -> dict[str, Any]:
    p = subprocess.run([python, "-c", H2D, str(nbytes)], capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"host-to-device floor failed: {p.stderr.strip()[-300:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- the benchmark -------------------------------------------------------------------------

@dataclass
class Variant:
    name: str
    port: int
    ckpt_id: str
    reference: dict[int, dict[str, Any]] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    identical: dict[str, list[bool]] = field(default_factory=dict)
    dump_phases: list[dict[str, Any]] = field(default_factory=list)
    restore_phases: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    cold: dict[str, Any] = field(default_factory=dict)
    image_bytes: int = 0
    gpu_bytes: int = 0
    gpu_bytes_estimated: bool = False
    cached: bool = True
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, v: float | None) -> None:
        if v is not None:
            self.samples.setdefault(key, []).append(v)


class GpuBench:
    def __init__(self, node: bench.Node, args: argparse.Namespace, python: str, plan: Plan) -> None:
        self.node, self.args, self.python, self.plan = node, args, python, plan
        self.batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
        self.variants: dict[str, Variant] = {}
        self.last_start_s = 0.0  # the last start()'s `start` call

    def box(self, v: Variant, mode: str, name: str) -> bench.Box:
        return self.node.new(name, worker_args(self.python, v.port, self.args),
                             annotations(v.name, mode, v.ckpt_id, v.port))

    def start(self, b: bench.Box) -> tuple[float, Drain]:
        """`create` (timed, as the shim calls it) then `start`; the worker's output drained from then on."""
        t = time.monotonic()
        rc = self.node.spawn(self.node.runtime, b, "create", "--bundle", str(b.bundle), "--pid-file",
                             str(b.bundle / "init.pid"), b.id)
        created = time.monotonic() - t
        drain = Drain(b.fds[-2:])
        if rc != 0:
            drain.close()
            raise RuntimeError(f"create {b.id} failed ({rc}): {bench._tail(b.bundle / 'log.json')}")
        t = time.monotonic()
        p = self.node.call(self.node.runtime, b, "start", b.id)
        self.last_start_s = time.monotonic() - t
        if p.returncode != 0:
            drain.close()
            raise RuntimeError(f"start {b.id} failed: {p.stderr[-300:]}")
        return created, drain

    def alive(self, b: bench.Box) -> Callable[[], bool]:
        def check() -> bool:
            p = self.node.call("runc", b, "state", b.id)
            return p.returncode == 0 and '"running"' in p.stdout
        return check

    def stop(self, b: bench.Box, drain: Drain | None) -> None:
        if drain:
            drain.close()
        self.node.destroy(b)

    def check_all(self, v: Variant, first: dict[str, Any]) -> bool:
        """The first generation and one of every other batch size equal the cold worker's, bit for bit."""
        same = [first.get("sha256_logits") == v.reference[self.batch_sizes[0]]["sha256_logits"]
                and first.get("token_ids") == v.reference[self.batch_sizes[0]]["token_ids"]]
        for bs in self.batch_sizes[1:]:
            code, out = request(v.port, "GET", f"/generate?batch={bs}&new_tokens={self.args.new_tokens}")
            same.append(code == 200 and out.get("sha256_logits") == v.reference[bs]["sha256_logits"])
        return all(same)

    def cold(self, v: Variant) -> None:
        b = self.box(v, "on-stop", f"cold-{v.name}")
        t0 = time.monotonic()
        created, drain = self.start(b)
        try:
            alive = self.alive(b)
            deadline = time.monotonic() + 1800
            while time.monotonic() < deadline:
                try:
                    if request(v.port, "GET", "/health", timeout=5)[0] == 200:
                        break
                except OSError:
                    pass
                if not alive():
                    raise RuntimeError(f"cold worker died:\n{drain.tail()}")
                time.sleep(0.1)
            healthy = time.monotonic()
            done, first = first_generation(v.port, self.batch_sizes[0], self.args.new_tokens, 120, alive)
            v.add("cold_first_gen_s", done - t0)
            v.add("cold_health_s", healthy - t0)
            v.add("cold_create_s", created)
            v.add("cold_gen_worker_s", first.get("gen_s"))  # the worker's own time for one generation, warmed up
            for k, x in (first.get("gen_phases") or {}).items():
                v.add(f"cold_gen_{k}", x)
            v.reference[self.batch_sizes[0]] = first
            for bs in self.batch_sizes[1:]:
                code, out = request(v.port, "GET", f"/generate?batch={bs}&new_tokens={self.args.new_tokens}")
                if code != 200:
                    raise RuntimeError(f"cold generate batch {bs}: HTTP {code} {out}")
                v.reference[bs] = out
            code, stats = request(v.port, "GET", "/stats")
            v.cold = {"worker": stats, "ready_line": drain.find("gpuworker ready"), "finite": first.get("finite")}
            used = int(stats.get("gpu_used") or 0)
            v.gpu_bytes = used - (int(stats.get("kv_bytes") or 0) if v.name == "sleep" else 0)
            v.gpu_bytes_estimated = v.name == "sleep"
            time.sleep(self.args.pause)
            t = time.monotonic()
            p = self.node.call(self.node.runtime, b, "kill", b.id, "15", timeout=1800)
            v.add("dump_s", time.monotonic() - t)
            self.node.wait_stopped(b, 120)
        except Exception:
            say_tail(drain)
            raise
        finally:
            self.stop(b, drain)
        meta_p = self.node.store / v.ckpt_id / "metadata.json"
        if p.returncode != 0 or not meta_p.exists():
            raise RuntimeError(f"no checkpoint from the cold {v.name} worker: "
                               f"{bench.runtime_log(self.node, b.id, '').get('msg', '')}")
        meta = json.loads(meta_p.read_text())
        # the log line's phases end with `publish` (hash, fsync, seal), which the metadata cannot hold
        logged = bench.runtime_log(self.node, b.id, "checkpointed on stop").get("phases") or {}
        v.dump_phases.append({**meta["dump"]["phases"], **({"publish": logged["publish"]} if "publish" in logged else {}),
                              "cuda": meta["dump"].get("cuda")})
        v.image_bytes = sum(f.stat().st_size for f in image_files(self.node.store / v.ckpt_id))
        v.add("image_bytes", v.image_bytes)

    def restore(self, v: Variant, cache: str) -> None:
        files = image_files(self.node.store / v.ckpt_id)
        if cache == "dropped":
            drop_caches(files)
            for other in self.variants.values():
                other.cached = False
        elif not v.cached:
            bench.warm_cache(files)
        b = self.box(v, "restore-only", f"{v.name}-{cache}")
        t0 = time.monotonic()
        created, drain = self.start(b)
        try:
            rec = bench.runtime_log(self.node, b.id, "restored from")
            if not rec:
                raise RuntimeError(f"not restored: {bench.runtime_log(self.node, b.id, '').get('msg', '?')}")
            v.cached = True
            done, first = first_generation(v.port, self.batch_sizes[0], self.args.new_tokens, 300, self.alive(b))
            v.add(f"restore_{cache}_create_s", created)
            v.add(f"restore_{cache}_start_s", self.last_start_s)
            v.add(f"restore_{cache}_gen_worker_s", first.get("gen_s"))  # inside first_gen_s: the worker's own
            for k, x in (first.get("gen_phases") or {}).items():
                v.add(f"restore_{cache}_gen_{k}", x)
            v.add(f"restore_{cache}_first_gen_s", done - t0)
            v.restore_phases.setdefault(cache, []).append(rec.get("phases", {}))
            v.identical.setdefault(cache, []).append(self.check_all(v, first))
        except Exception:
            say_tail(drain)
            raise
        finally:
            self.stop(b, drain)

    def floors(self, v: Variant) -> None:
        files = image_files(self.node.store / v.ckpt_id)
        bench.warm_cache(files)
        v.add("read_cached_s", bench.read_floor(files, drop=False))
        drop_caches(files)
        for other in self.variants.values():
            other.cached = False
        v.add("read_cold_s", bench.read_floor(files, drop=False))
        v.cached = True
        if self.args.worker_device == "cuda":
            h = h2d_floor(self.python, v.gpu_bytes)
            v.add("h2d_pinned_s", h["pinned_s"])
            v.add("h2d_pageable_s", h["pageable_s"])
        v.add("write_fdatasync_s", bench.write_floor(files, self.node.base / "dd.out"))

    def run(self, progress: Callable[[], None] = lambda: None) -> None:
        """Cold starts, then the rounds; `progress` after each step (partial results survive a time limit)."""
        for name in self.plan.variants:
            v = Variant(name, bench.free_port(), f"gpubench-{name}-{secrets.token_hex(3)}")
            self.variants[name] = v
            t = time.monotonic()
            self.cold(v)
            bench.say(f"{name}: cold start → first generation {v.samples['cold_first_gen_s'][-1]:.1f}s, "
                      f"dump {v.samples['dump_s'][-1]:.1f}s, image {v.image_bytes / 1e9:.2f} GB "
                      f"(step {time.monotonic() - t:.0f}s)")
            progress()
        steps: list[tuple[str, Callable[[], None]]] = []
        for v in self.variants.values():
            steps += [(f"restore {v.name}/{c}", (lambda v=v, c=c: self.restore(v, c))) for c in self.plan.caches]
            steps.append((f"floors {v.name}", lambda v=v: self.floors(v)))
        for rep in range(self.plan.reps):
            order = steps[rep % len(steps):] + steps[:rep % len(steps)]
            order = [s for s in order if not s[0].startswith("floors") or rep < self.plan.floor_reps]
            for label, fn in order:
                t = time.monotonic()
                try:
                    fn()
                except Exception as e:  # noqa: BLE001 - one failed step must not sink the run
                    self.variants[label.split()[1].split("/")[0]].notes.append(
                        f"rep {rep} {label}: {type(e).__name__}: {str(e)[:400]}")
                    bench.say(f"  {label} failed: {e}")
                bench.say(f"  rep {rep + 1}/{self.plan.reps} {label}: {time.monotonic() - t:.1f}s"
                          + latest(self.variants, label))
                progress()
                time.sleep(self.args.pause)


def latest(variants: dict[str, Variant], label: str) -> str:
    kind, rest = label.split(" ", 1)
    v = variants[rest.split("/")[0]]
    keys = ([f"restore_{rest.split('/')[1]}_create_s", f"restore_{rest.split('/')[1]}_first_gen_s"]
            if kind == "restore" else ["read_cached_s", "read_cold_s", "h2d_pinned_s", "h2d_pageable_s",
                                       "write_fdatasync_s"])
    return "".join(f", {k}={v.samples[k][-1]:.3f}" for k in keys if v.samples.get(k))


def say_tail(drain: Drain) -> None:
    if drain.lines:
        bench.say("  worker output (tail):\n" + drain.tail())


# -- results -------------------------------------------------------------------------------

def phase_medians(phases: list[dict[str, Any]]) -> dict[str, float]:
    """Median seconds per phase, in the order the phases ran; CRIU's own stats (µs) in seconds too."""
    keys = list(dict.fromkeys(k for p in phases for k, x in p.items() if isinstance(x, (int, float))))
    out = {}
    for k in keys:
        m = statistics.median([p[k] for p in phases if isinstance(p.get(k), (int, float))])
        out[k] = m / 1e6 if k.startswith("criu_") and k.endswith("_time") else m
    return out


def derive(v: Variant) -> dict[str, Any]:
    s = v.samples
    out: dict[str, Any] = {k: bench.summary(x) for k, x in s.items()}
    cold = statistics.median(s["cold_first_gen_s"]) if s.get("cold_first_gen_s") else None
    for c in CACHES:
        restored = s.get(f"restore_{c}_first_gen_s", [])
        out[f"speedup_{c}"] = bench.summary([cold / x for x in restored if x] if cold else [])
        ph = v.restore_phases.get(c, [])
        out[f"restore_{c}_phases"] = ph
        out[f"restore_{c}_phase_medians"] = phase_medians(ph)
        out[f"identical_{c}"] = v.identical.get(c, [])
        cuda = [p.get("cuda_restore") for p in ph if isinstance(p.get("cuda_restore"), (int, float))]
        out[f"cuda_restore_{c}_vs_h2d_pinned"] = bench.summary(bench.ratios(cuda, s.get("h2d_pinned_s", [])))
    out["dump_vs_write_floor"] = bench.summary(bench.ratios(s.get("dump_s", []), s.get("write_fdatasync_s", [])))
    out["dump_phases"] = v.dump_phases
    out["dump_phase_medians"] = phase_medians(v.dump_phases)
    out["image_bytes"] = v.image_bytes
    out["gpu_bytes"] = v.gpu_bytes
    out["gpu_bytes_estimated"] = v.gpu_bytes_estimated
    out["cold"] = v.cold
    out["reference"] = {str(k): {x: r.get(x) for x in ("sha256_logits", "sha256_ids", "finite")}
                        for k, r in v.reference.items()}
    out["notes"] = v.notes
    return out


ROWS = [("cold start → first correct generation", "cold_first_gen_s"), ("  cold: /health 200", "cold_health_s"),
        ("stop with dump (kill 15 returns)", "dump_s"),
        ("  cold: one generation, the worker's own time (warmed up)", "cold_gen_worker_s"),
        ("restore (create returns), cache warm", "restore_warm_create_s"),
        ("  then `start` returns, warm", "restore_warm_start_s"),
        ("restore → first correct generation, warm", "restore_warm_first_gen_s"),
        ("  of which the first generation, the worker's own time, warm", "restore_warm_gen_worker_s"),
        ("restore (create returns), cache dropped", "restore_dropped_create_s"),
        ("restore → first correct generation, dropped", "restore_dropped_first_gen_s"),
        ("  of which the first generation, the worker's own time, dropped", "restore_dropped_gen_worker_s"),
        ("speed-up (cold / restore, warm)", "speedup_warm"), ("speed-up (cold / restore, dropped)", "speedup_dropped"),
        ("floor: read image (page cache)", "read_cached_s"), ("floor: read image (disk)", "read_cold_s"),
        ("floor: H2D copy of the GPU bytes, pinned", "h2d_pinned_s"),
        ("floor: H2D copy of the GPU bytes, pageable", "h2d_pageable_s"),
        ("floor: write image (fdatasync)", "write_fdatasync_s"),
        ("CUDA restore / H2D pinned floor (warm)", "cuda_restore_warm_vs_h2d_pinned"),
        ("dump / write floor", "dump_vs_write_floor")]


def table(results: dict[str, Any]) -> str:
    names = list(results["variants"])
    lines = ["| measurement | " + " | ".join(f"{n}: median [min–max]" for n in names) + " |",
             "|---|" + "---|" * len(names)]

    def cell(d: dict[str, Any], unit: str) -> str:
        if not d or not d.get("n"):
            return "–"
        return f"{d['median']:.3f}{unit} [{d['min']:.3f}–{d['max']:.3f}] n={d['n']}"
    for label, key in ROWS:
        cells = [cell(results["variants"][n].get(key) or {}, " s" if key.endswith("_s") else "×") for n in names]
        if any(c != "–" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    extra = [("image (GB)", lambda d: f"{d['image_bytes'] / 1e9:.2f}"),
             ("GPU bytes restored by CUDA (GB)", lambda d: "–" if d["gpu_bytes"] <= 0 else
              f"{d['gpu_bytes'] / 1e9:.2f}" + (" (est.: used − KV)" if d["gpu_bytes_estimated"] else "")),
             ("dump phases (median s)", lambda d: ", ".join(f"{k} {x:.2f}" for k, x in d["dump_phase_medians"].items())),
             ("restore phases, warm (median s)",
              lambda d: ", ".join(f"{k} {x:.2f}" for k, x in d["restore_warm_phase_medians"].items())),
             ("restore phases, dropped (median s)",
              lambda d: ", ".join(f"{k} {x:.2f}" for k, x in d["restore_dropped_phase_medians"].items())),
             ("bit-identical after restore (warm; dropped)",
              lambda d: f"{sum(d['identical_warm'])}/{len(d['identical_warm'])}; "
                        f"{sum(d['identical_dropped'])}/{len(d['identical_dropped'])}")]
    for label, fn in extra:
        lines.append(f"| {label} | " + " | ".join(fn(results["variants"][n]) for n in names) + " |")
    return "\n".join(lines)


PLOT_KEYS = [("cold start", "cold_first_gen_s"), ("restore warm\n(create)", "restore_warm_create_s"),
             ("restore warm\n→ 1st gen", "restore_warm_first_gen_s"),
             ("restore dropped\n→ 1st gen", "restore_dropped_first_gen_s"), ("dump", "dump_s"),
             ("read cached", "read_cached_s"), ("read disk", "read_cold_s"), ("H2D pinned", "h2d_pinned_s"),
             ("H2D pageable", "h2d_pageable_s"), ("write fdatasync", "write_fdatasync_s")]


def plot(results: dict[str, Any], path: Path) -> bool:
    """A bar chart of the medians (min–max as error bars); False when matplotlib is missing."""
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    names = list(results["variants"])
    fig, ax = plt.subplots(figsize=(12, 5.5))
    width = 0.8 / max(1, len(names))
    for j, n in enumerate(names):
        d = results["variants"][n]
        med = [(d.get(k) or {}).get("median") or 0 for _, k in PLOT_KEYS]
        lo = [m - ((d.get(k) or {}).get("min") or m) for m, (_, k) in zip(med, PLOT_KEYS)]
        hi = [((d.get(k) or {}).get("max") or m) - m for m, (_, k) in zip(med, PLOT_KEYS)]
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(PLOT_KEYS))]
        ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, label=f"{n} ({d['image_bytes'] / 1e9:.1f} GB image)")
        for x, m in zip(xs, med):
            if m:
                ax.text(x, m * 1.08, f"{m:.2f}", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(range(len(PLOT_KEYS)))
    ax.set_xticklabels([k for k, _ in PLOT_KEYS], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("seconds (median, bars: min–max; log scale)")
    m = results.get("machine", {})
    ax.set_title(f"GPU worker {results['params']['preset']}: cold vs restore vs floors — {m.get('gpu', '')}, "
                 f"{m.get('cores')} cores, kernel {m.get('kernel')}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def plot_with(python: str, results: dict[str, Any], path: Path) -> bool:
    """plot() in another interpreter (the worker's has matplotlib where warmstart's venv may not); this
    package's modules import only the standard library, so a link to it is all that one needs."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "warmstart").symlink_to(Path(__file__).resolve().parents[1])
        (Path(d) / "results.json").write_text(json.dumps(results, default=str))
        code = ("import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
                "from warmstart.testing.bench_gpu import plot; "
                "sys.exit(0 if plot(json.loads(Path(sys.argv[1], 'results.json').read_text()), Path(sys.argv[2])) "
                "else 3)")
        p = subprocess.run([python, "-I", "-c", code, d, str(path)], capture_output=True, text=True, timeout=120)
    return p.returncode == 0


def gpu_name() -> str:
    p = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                       capture_output=True, text=True) if shutil.which("nvidia-smi") else None
    return p.stdout.strip() if p and p.returncode == 0 else ""


def collect(gb: GpuBench, plan: Plan, args: argparse.Namespace, machine: dict[str, Any], took: float
            ) -> dict[str, Any]:
    return {"machine": machine, "command": "warmstart bench " + " ".join(sys.argv[2:]),
            "params": {"preset": args.preset, "variants": plan.variants, "caches": plan.caches, "reps": plan.reps,
                       "floor_reps": plan.floor_reps, "worker_device": args.worker_device, "kv_cache_gb": plan.kv_gb, "batch_sizes": gb.batch_sizes,
                       "new_tokens": args.new_tokens, "compile": not args.no_compile,
                       "sleep_offload_weights": args.sleep_offload_weights, "pause_s": args.pause},
            "plan": [{"step": s, "estimate_s": round(e, 1)} for s, e in plan.steps], "took_s": round(took, 1),
            "variants": {n: derive(v) for n, v in gb.variants.items()}}


def run(args: argparse.Namespace) -> int:
    args.pause = 1.0 if args.pause is None else args.pause
    try:
        plan = make_plan(args)
    except ValueError as e:
        print(f"warmstart bench --gpu: {e}", file=sys.stderr)
        return 2
    bench.say(f"plan ({args.preset}, KV cache {plan.kv_gb:g} GB, {plan.reps} rep(s)); estimates, not measurements:")
    for step, est in plan.steps:
        bench.say(f"  ~{est:6.0f}s  {step}")
    bench.say(f"  ~{plan.total():6.0f}s  in all")
    if args.plan_only:
        return 0
    if not ready_to_run("bench --gpu", args.runtime, "runc, CRIU, the GPU"):
        return 2
    python, hook = find_python(args.python), find_hook(args.ctk_hook)
    problems = [msg for ok, msg in (
        (Path("/dev/nvidia0").exists() or args.worker_device == "cpu",
         "no /dev/nvidia0: needs an NVIDIA GPU and its driver (or --worker-device cpu)"),
        (python is not None, "no python with torch and transformers: give --python"),
        (hook is not None, f"no executable stand-in toolkit hook: run from the checkout or give --ctk-hook "
                           f"({HOOK_REL})"),
        (WORKER_SRC.is_file(), f"{WORKER_SRC} missing")) if not ok]
    if problems:
        for msg in problems:
            print(f"warmstart bench --gpu: {msg}", file=sys.stderr)
        return 2
    from .. import config as wconfig  # noqa: PLC0415
    criu = str(wconfig.load().criu)
    base = Path(tempfile.mkdtemp(prefix="warmstart-gpubench-", dir=args.workdir))
    base.chmod(0o700)
    node = bench.Node(base, make_template(base / "rootfs-template"), args.runtime, criu, copy_rootfs=True,
                      edit=gpu_edit(python, hook, args.worker_device))
    gb = GpuBench(node, args, python, plan)
    machine = {**bench.machine(criu), "gpu": gpu_name(), "python": python}
    t0 = time.monotonic()

    def partial() -> None:
        if args.json_out:
            args.json_out.write_text(json.dumps({**collect(gb, plan, args, machine, time.monotonic() - t0),
                                                 "partial": True}, indent=1, default=str))
    try:
        gb.run(partial)
        results = collect(gb, plan, args, machine, time.monotonic() - t0)
        print()
        print(table(results))
        print()
        if args.json_out:
            args.json_out.write_text(json.dumps(results, indent=1, default=str))
            bench.say(f"results written to {args.json_out}")
        if args.plot:
            if plot(results, args.plot) or plot_with(python, results, args.plot):
                bench.say(f"plot written to {args.plot}")
            else:
                bench.say("no plot: matplotlib is importable neither here nor in the worker's python")
        return 0 if all(not v.notes for v in gb.variants.values()) else 1
    except KeyboardInterrupt:
        bench.say("interrupted; cleaning up")
        return 130
    except Exception as e:  # noqa: BLE001 - what was measured so far is still written
        bench.say(f"failed: {type(e).__name__}: {e}")
        if args.json_out and gb.variants:
            results = collect(gb, plan, args, machine, time.monotonic() - t0)
            results["error"] = f"{type(e).__name__}: {e}"
            args.json_out.write_text(json.dumps(results, indent=1, default=str))
            bench.say(f"partial results written to {args.json_out}")
        return 1
    finally:
        node.cleanup()
        if args.keep:
            bench.say(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
