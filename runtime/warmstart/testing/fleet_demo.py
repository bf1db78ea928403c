"""`warmstart demo --fleet`: a checkpoint made on node A restores on node B through a registry, by itself.

Two node configurations on this machine, each with its own private containerd (root, sockets, CNI
bridge, runc roots), its own warmstart store, seals, state and log (its containerd hands the runtime
its own WARMSTART_CONFIG), and one docker-registry on loopback that both name in `[registry]`.
Node A's pod starts the reference worker cold and is stopped: warmstart checkpoints it and pushes it
in the background (push = "auto").  Node B's pod of the same checkpoint id finds nothing in its store:
its create pulls the checkpoint (pull = "on-miss") and restores it.  No hand step in between.

With `--sizes` and `--reps` it is the fleet benchmark: each repetition uses a fresh worker seed (new
page contents) and an emptied registry, so every push sends every byte.  Each size also measures the
registry's own rate (one blob of the checkpoint's page image up and down over HTTP: the floor) and,
with `--compare-pull`, skopeo against containerd's content store (`ctr content fetch`) for one pull.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .demo import PORT, Progress, _runtime_log, clean_up
from .preflight import ready_to_run
from .registry import RoundTrip, blob_round_trip, free_port, start_registry

REPO = "warmstart/fleet"
NAMESPACE = "default"  # the harness's pods run in the CRI's default namespace
WAIT_PUSH_S = 1800


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fleet", action="store_true",
                   help="two nodes, one registry: node A checkpoints and pushes, node B pulls on a miss and restores")
    p.add_argument("--sizes", default="", help="--fleet: worker state sizes in MiB, comma-separated "
                   "(default: --state-mb)")
    p.add_argument("--reps", type=int, default=1, help="--fleet: repetitions per size (default 1)")
    p.add_argument("--pull-deadline", type=int, default=110,
                   help="--fleet: node B's [registry] pull_deadline_s (default 110, the most allowed)")
    p.add_argument("--compare-pull", action="store_true",
                   help="--fleet: per size, also time one pull with skopeo and one through containerd's content "
                        "store, with their disk peaks")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                   help="--fleet: where the nodes' stores and the registry go (default /var/tmp: on disk)")


@dataclass
class Rep:
    """One checkpoint's trip: A's cold start and dump, the background push, B's pull on a miss and restore."""

    checkpoint_id: str
    cold_start_s: float = 0.0
    dump_s: float = 0.0
    push_s: float = 0.0
    blobs_sent: int = 0
    pull_s: float = 0.0
    pull_restore_s: float = 0.0  # B's StartContainer to /ready: the pull, then the restore
    restore_s: float = 0.0  # pull_restore_s less the pull
    restore_phases: dict[str, float] = field(default_factory=dict)
    checkpoint_bytes: int = 0
    registry_bytes: int = 0  # the manifest's blobs: what a pull downloads
    state_preserved: bool = False
    restored: bool = False


@dataclass
class SizeResult:
    state_mb: int
    reps: list[Rep] = field(default_factory=list)
    raw: list[dict[str, float]] = field(default_factory=list)  # blob round trips: bytes, upload_s, download_s
    pull_compare: dict[str, Any] = field(default_factory=dict)


# -- nodes ------------------------------------------------------------------------------------------

@dataclass
class FleetNode:
    name: str
    base: Path
    config: Path
    ctrd: Any = None

    @classmethod
    def make(cls, work: Path, name: str, criu: str, registry: str, deadline_s: int) -> FleetNode:
        """Node `name` under work/<name> (short: containerd's socket paths must stay under 104 bytes)."""
        base = work / name
        base.mkdir(mode=0o700)
        config = base / "config.toml"
        config.write_text(
            f'store = "{base}/store"\nseal_dir = "{base}/seals"\nstate_dir = "{base}/state"\n'
            f'log_dir = "{base}/logs"\ncriu = "{criu}"\n\n[registry]\nrepository = "{registry}/{REPO}"\n'
            f'tls_verify = false\npush = "auto"\npull = "on-miss"\npull_deadline_s = {deadline_s}\n')
        return cls(name, base, config)

    def store(self, cid: str) -> Path:
        return self.base / "store" / NAMESPACE / cid

    def log(self, **match: str) -> list[dict[str, Any]]:
        recs = _runtime_log(self.base / "logs", match.pop("container")) if "container" in match else _all(self.base)
        return [r for r in recs if all(r.get(k) == v for k, v in match.items())]

    def fleet_line(self, cid: str, *prefixes: str) -> dict[str, Any] | None:
        for r in reversed(self.log(checkpoint_id=cid, component="fleet")):
            if str(r.get("msg", "")).startswith(prefixes):
                return r
        return None

    def remove(self, cid: str) -> None:
        """Drop a repetition's checkpoint (its id is never used again), so disk use stays one size."""
        subprocess.run(["warmstart", "remove", "-n", NAMESPACE, cid], capture_output=True,
                       env={**os.environ, "WARMSTART_CONFIG": str(self.config)})
        shutil.rmtree(self.store(cid), ignore_errors=True)


def _all(base: Path) -> list[dict[str, Any]]:
    p = base / "logs" / "runtime.log"
    out = []
    for line in p.read_text().splitlines() if p.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


class Registry:
    """docker-registry on a fixed loopback port; `wipe` restarts it on empty storage (it caches blob
    descriptors in memory, so storage is never emptied under a running one)."""

    def __init__(self, base: Path) -> None:
        base.mkdir(mode=0o700, exist_ok=True)
        self.base, self.port = base, free_port()
        self.proc, self.addr = start_registry(base, self.port)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def wipe(self) -> None:
        self.stop()
        shutil.rmtree(self.base / "data", ignore_errors=True)
        self.proc, self.addr = start_registry(self.base, self.port)

    def manifest(self, tag: str) -> dict[str, Any]:
        p = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{self.addr}/{REPO}:{tag}"],
                           capture_output=True, text=True, check=True, timeout=60)
        return json.loads(p.stdout)


# -- the trip ------------------------------------------------------------------------------------------

class FleetDemo:
    def __init__(self, args: argparse.Namespace, say: Progress, work: Path) -> None:
        from .. import config as wconfig  # noqa: PLC0415
        self.args, self.say, self.work = args, say, work
        self.registry = Registry(work / "registry")
        criu = wconfig.load().criu
        self.a = FleetNode.make(work, "a", criu, self.registry.addr, args.pull_deadline)
        self.b = FleetNode.make(work, "b", criu, self.registry.addr, args.pull_deadline)

    def start_nodes(self, make: Callable[[FleetNode], Any]) -> str:
        from .cri import images  # noqa: PLC0415
        image = ""
        for n in (self.a, self.b):
            n.ctrd = make(n)
            self.say(f"node {n.name.upper()}: private containerd, store {n.base}/store")
            n.ctrd.start()
            images.ensure_pause_image(n.ctrd, progress=self.say)
            image = images.ensure_worker_image(n.ctrd, progress=self.say)
        return image

    def trip(self, image: str, state_mb: int, rep: int) -> Rep:
        """Node A: cold start, checkpoint on stop, push by itself. Node B: a pod of the same id restores."""
        from .cri.client import http_get, wait_http  # noqa: PLC0415
        say, a, b = self.say, self.a, self.b
        r = Rep(f"fleet-{state_mb}m-{rep}-{secrets.token_hex(3)}")
        ann = {"warmstart.dev/checkpoint": "on-stop", "warmstart.dev/id": r.checkpoint_id}
        args = ["--port", str(PORT), "--state-mb", str(state_mb), "--rounds", str(self.args.rounds),
                "--seed", r.checkpoint_id]  # new pages each repetition: the registry has none of them

        def start(node: FleetNode, name: str) -> tuple[Any, str, str, float]:
            cri = node.ctrd.client(timeout=1800)
            sb = cri.run_pod_sandbox(name, runtime_handler="warmstart", annotations=ann)
            c = cri.create_container(sb, "worker", image, args=args, annotations=ann)
            ip = cri.pod_ip(sb.id)
            t = time.monotonic()
            cri.start_container(c)
            with say.waiting(f"node {node.name.upper()}: {name} to /ready"):
                wait_http(ip, PORT, "/ready", timeout=1800)
            return (cri, sb), c, ip, time.monotonic() - t

        (cri_a, sb), c, ip, r.cold_start_s = start(a, "worker-a")
        for _ in range(2):
            _, before = http_get(ip, PORT, "/infer")
        say(f"node A: cold start {r.cold_start_s:.2f}s ({state_mb} MiB state); stopping it: warmstart checkpoints it")
        cri_a.stop_container(c, timeout=self.args.grace)
        cri_a.stop_pod(sb.id)
        cri_a.remove_pod(sb.id)
        cri_a.close()
        if not (a.store(r.checkpoint_id) / "checkpoint.done").is_file():
            raise RuntimeError(f"node A made no checkpoint: {[x.get('msg') for x in a.log(container=c)[-2:]]}")
        meta = json.loads((a.store(r.checkpoint_id) / "metadata.json").read_text())
        r.checkpoint_bytes = meta["sizes"]["total_bytes"]
        r.dump_s = sum(meta["dump"]["phases"].values())
        with say.waiting("node A: the background push"):
            end = time.monotonic() + WAIT_PUSH_S
            while not (line := a.fleet_line(r.checkpoint_id, "pushed", "push")) and time.monotonic() < end:
                time.sleep(0.2)
        if not line or not line["msg"].startswith("pushed"):
            raise RuntimeError(f"node A's push: {line['msg'] if line else 'no outcome logged'}")
        r.push_s, r.blobs_sent = float(line["seconds"]), int(line["blobs_sent"])
        from ..fleet import tag_for  # noqa: PLC0415
        m = self.registry.manifest(tag_for(NAMESPACE, r.checkpoint_id))
        r.registry_bytes = m["config"]["size"] + sum(x["size"] for x in m["layers"])
        say(f"node A: checkpoint {r.checkpoint_bytes / 2**20:.0f} MiB in {r.dump_s:.2f}s; pushed by itself in "
            f"{r.push_s:.2f}s ({r.blobs_sent} blobs, {r.registry_bytes / 2**20:.0f} MiB in the registry)")

        (cri_b, sb), c, ip, r.pull_restore_s = start(b, "worker-b")
        _, after = http_get(ip, PORT, "/infer")
        pulled = b.fleet_line(r.checkpoint_id, "pulled", "pull")
        restored = [x for x in b.log(container=c) if str(x.get("msg", "")).startswith("restored from")]
        r.restored = bool(restored) and bool(pulled) and pulled["msg"].startswith("pulled")
        r.pull_s = float(pulled.get("seconds", 0.0)) if r.restored and pulled else 0.0
        r.restore_s = r.pull_restore_s - r.pull_s
        r.restore_phases = restored[-1].get("phases", {}) if restored else {}
        r.state_preserved = r.restored and all(after.get(k) == before.get(k) for k in ("checksum", "random_value")) \
            and after.get("counter") == before.get("counter") + 1
        if r.restored:
            say(f"node B: pulled on the miss in {r.pull_s:.2f}s, restored; ready {r.pull_restore_s:.2f}s after "
                f"StartContainer ({r.cold_start_s / r.pull_restore_s:.1f}x faster than A's cold start)")
        else:
            say(f"node B started cold: {pulled['msg'] if pulled else 'no pull logged'}")
        cri_b.stop_container(c, timeout=5)  # its checkpoint is in B's store now: no second dump
        cri_b.stop_pod(sb.id)
        cri_b.remove_pod(sb.id)
        cri_b.close()
        return r

    def raw_round_trip(self, cid: str) -> RoundTrip:
        """The registry's own rate for this checkpoint's bytes: its largest file as one blob, up and down."""
        ck = self.a.store(cid)
        biggest = max((p for p in ck.iterdir() if p.is_file()), key=lambda p: p.stat().st_size)
        rt = blob_round_trip(self.registry.addr, "warmstart/raw", biggest)
        self.say(f"registry, one blob of {rt.bytes / 2**20:.0f} MiB: up {rt.upload_bps / 1e6:.0f} MB/s, "
                 f"down {rt.download_bps / 1e6:.0f} MB/s")
        return rt

    def compare_pull(self, cid: str) -> dict[str, Any]:
        """Node B pulls `cid` again, once with skopeo (warmstart's path) and once through its containerd's
        content store; each: download seconds, unpack seconds (the same import_layout), disk peak."""
        from .. import config as wconfig, oci  # noqa: PLC0415
        from ..fleet import ref_for  # noqa: PLC0415
        from ..transfer import Remote, check_remote, skopeo_copy  # noqa: PLC0415
        settings = wconfig.load(self.b.config)
        ref = ref_for(settings, NAMESPACE, cid)
        work = self.b.base / "store" / NAMESPACE / ".tmp" / f"compare-{secrets.token_hex(3)}"
        out: dict[str, Any] = {}
        for how in ("skopeo", "containerd"):
            d = work / how
            layout, dest = d / "layout", d / "checkpoint"
            dest.mkdir(parents=True)
            content = self.b.ctrd.root / "io.containerd.content.v1.content"
            with DiskPeak([d] + ([content] if how == "containerd" else [])) as peak:
                t0 = time.monotonic()
                if how == "skopeo":
                    checked = check_remote(ref, Remote(tls_verify=False), 1 << 40, cid, NAMESPACE)
                    pinned, max_file = checked.ref, checked.max_file_bytes
                    skopeo_copy(f"docker://{pinned}", f"oci:{layout}:checkpoint", Remote(tls_verify=False).flags("src"),
                                max_file)
                else:
                    digests = ctr_fetch(self.b.ctrd, ref, layout)
                download_s = time.monotonic() - t0
                t0 = time.monotonic()
                oci.import_layout(layout, dest, 1 << 40, cid, NAMESPACE)
                unpack_s = time.monotonic() - t0
            if how == "containerd":
                self.b.ctrd.ctr("content", "rm", *digests, check=False)
            shutil.rmtree(d)
            out[how] = {"download_s": download_s, "unpack_s": unpack_s, "total_s": download_s + unpack_s,
                        "disk_peak_bytes": peak.peak}
            self.say(f"pull through {how}: download {download_s:.2f}s, unpack {unpack_s:.2f}s, "
                     f"disk peak {peak.peak / 2**20:.0f} MiB")
        shutil.rmtree(work, ignore_errors=True)
        return out


def ctr_fetch(ctrd: Any, ref: str, layout: Path) -> list[str]:
    """`ctr content fetch` the image into containerd's content store, then lay its blobs out as an OCI
    layout (hard links into the content store: the same files, no copy) for oci.import_layout."""
    ctrd.ctr("content", "fetch", "--plain-http", ref, timeout=3600)
    blobs = ctrd.root / "io.containerd.content.v1.content" / "blobs" / "sha256"
    p = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
                       capture_output=True, check=True, timeout=60)
    mdigest = "sha256:" + hashlib.sha256(p.stdout).hexdigest()
    manifest = json.loads(p.stdout)
    (layout / "blobs" / "sha256").mkdir(parents=True)
    digests = [mdigest, manifest["config"]["digest"], *{x["digest"] for x in manifest["layers"]}]
    for dg in digests:
        hexd = dg.split(":", 1)[1]
        src = blobs / hexd
        if not src.is_file():
            raise RuntimeError(f"ctr content fetch left no blob {dg} in {blobs}")
        os.link(src, layout / "blobs" / "sha256" / hexd)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": manifest.get("mediaType", "application/vnd.oci.image.manifest.v1+json"),
         "digest": mdigest, "size": len(p.stdout)}]}))
    return digests


class DiskPeak:
    """The most bytes (allocated blocks) the given trees held at once, sampled every 50 ms."""

    def __init__(self, roots: list[Path]) -> None:
        self.roots, self.peak = roots, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        """Allocated bytes, each inode once (the containerd path's layout hard-links the content store)."""
        seen: dict[tuple[int, int], int] = {}
        for root in self.roots:
            for dirpath, _dirs, files in os.walk(root):
                for f in files:
                    try:
                        st = os.lstat(os.path.join(dirpath, f))
                    except OSError:
                        continue
                    seen[st.st_dev, st.st_ino] = st.st_blocks * 512
        return sum(seen.values())

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._sample())

    def __enter__(self) -> DiskPeak:
        self.base = self._sample()
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._sample()) - self.base


# -- the run ---------------------------------------------------------------------------------------

def sizes_of(args: argparse.Namespace) -> list[int]:
    try:
        sizes = [int(x) for x in (args.sizes or str(args.state_mb)).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--sizes {args.sizes!r}: give MiB as integers, comma-separated (e.g. 1024,4096)") from None
    if not sizes or min(sizes) < 1 or args.reps < 1:
        raise ValueError("--sizes and --reps must be positive")
    return sizes


def run(args: argparse.Namespace) -> int:
    from .cri.containerd import Containerd  # noqa: PLC0415

    sizes = sizes_of(args)
    missing = [t for t in ("skopeo", "docker-registry") if not shutil.which(t)]
    if missing:
        print(f"warmstart demo --fleet: {', '.join(missing)} not installed; install.sh installs them")
        return 2
    if not ready_to_run("demo", args.runtime, "it starts containerd, runc and CRIU"):
        return 2
    say = Progress()
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ws-fleet-", dir=args.workdir))
    work.chmod(0o700)
    demo: FleetDemo | None = None
    problems: list[str] = []
    results: list[SizeResult] = []
    try:
        demo = FleetDemo(args, say, work)
        say(f"work dir {work}; registry on {demo.registry.addr}; two nodes, each its own containerd")
        image = demo.start_nodes(lambda n: Containerd(
            n.base / "ctrd", warmstart_binary=args.runtime, env={"WARMSTART_CONFIG": str(n.config)},
            progress=say))
        for rep in range(args.reps):  # sizes interleaved within each repetition
            for mb in sizes:
                res = next((x for x in results if x.state_mb == mb), None) or SizeResult(mb)
                if res not in results:
                    results.append(res)
                say(f"-- {mb} MiB, repetition {rep + 1} of {args.reps}")
                r = demo.trip(image, mb, rep)
                res.reps.append(r)
                res.raw.append(asdict(demo.raw_round_trip(r.checkpoint_id)))
                if args.compare_pull and rep == args.reps - 1:
                    res.pull_compare = demo.compare_pull(r.checkpoint_id)
                for n in (demo.a, demo.b):
                    n.remove(r.checkpoint_id)
                demo.registry.wipe()
        print_table(results)
        if args.json_out:
            args.json_out.write_text(json.dumps(report(results, args), indent=1))
            say(f"results written to {args.json_out}")
        return 0 if results and all(r.state_preserved for x in results for r in x.reps) else 1
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    finally:
        if demo:
            for n in (demo.a, demo.b):
                if n.ctrd:
                    problems += n.ctrd.stop()
            demo.registry.stop()
        clean_up(say, work, args.keep, problems, "both containerds, pods, mounts, networks, the registry, temp dirs")


# -- the report ------------------------------------------------------------------------------------

def stats(xs: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "samples": xs} \
        if xs else {"median": None, "n": 0, "samples": []}


def summarize(res: SizeResult) -> dict[str, Any]:
    reps = res.reps
    col: Callable[[str], list[float]] = lambda k: [float(getattr(r, k)) for r in reps]  # noqa: E731
    up = [x["bytes"] / x["upload_s"] for x in res.raw]
    down = [x["bytes"] / x["download_s"] for x in res.raw]
    reg_bytes = statistics.median(col("registry_bytes")) if reps else 0
    s = {k: stats(col(k)) for k in ("cold_start_s", "dump_s", "push_s", "pull_s", "restore_s", "pull_restore_s",
                                    "checkpoint_bytes", "registry_bytes")}
    s["pull_restore_vs_cold"] = stats([r.cold_start_s / r.pull_restore_s for r in reps if r.pull_restore_s])
    s["registry_upload_Bps"], s["registry_download_Bps"] = stats(up), stats(down)
    s["push_floor_s"] = reg_bytes / statistics.median(up) if up else None
    s["pull_floor_s"] = reg_bytes / statistics.median(down) if down else None
    s["all_restored_with_state"] = all(r.state_preserved for r in reps)
    return s


def report(results: list[SizeResult], args: argparse.Namespace) -> dict[str, Any]:
    import platform  # noqa: PLC0415
    return {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                        "skopeo": _version(["skopeo", "--version"]),
                        "containerd": _version(["containerd", "--version"])},
            "settings": {"rounds": args.rounds, "reps": args.reps, "pull_deadline_s": args.pull_deadline,
                         "chunk_bytes": 128 << 20, "compress": "zstd", "compress_level": 1},
            "sizes": {str(x.state_mb): {"summary": summarize(x), "reps": [asdict(r) for r in x.reps],
                                        "raw_round_trips": x.raw, "pull_compare": x.pull_compare}
                      for x in results}}


def _version(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return ""


def _rows(results: list[SizeResult]) -> Iterator[tuple[str, list[str]]]:
    def med(d: dict[str, Any], unit: str = "s", scale: float = 1.0) -> str:
        if not d or d.get("median") is None:
            return "-"
        m, lo, hi = d["median"] / scale, d["min"] / scale, d["max"] / scale
        spread = f" [{lo:.2f}–{hi:.2f}]" if d["n"] > 1 else ""
        return f"{m:.2f}{unit}{spread}"
    ss = [summarize(x) for x in results]
    yield "Cold start on A (StartContainer to /ready)", [med(s["cold_start_s"]) for s in ss]
    yield "Checkpoint on A (dump at StopContainer)", [med(s["dump_s"]) for s in ss]
    yield "Push (background, after the dump)", [med(s["push_s"]) for s in ss]
    yield "Pull on B (on the miss, in create)", [med(s["pull_s"]) for s in ss]
    yield "Restore on B (the rest, to /ready)", [med(s["restore_s"]) for s in ss]
    yield "Pull + restore on B (StartContainer to /ready)", [med(s["pull_restore_s"]) for s in ss]
    yield "Pull + restore vs cold", [med(s["pull_restore_vs_cold"], "x") for s in ss]
    yield "Checkpoint / in the registry (MiB)", [
        f"{s['checkpoint_bytes']['median'] / 2**20:.0f} / {s['registry_bytes']['median'] / 2**20:.0f}" for s in ss]
    yield "Registry, one blob up / down (MB/s)", [
        f"{s['registry_upload_Bps']['median'] / 1e6:.0f} / {s['registry_download_Bps']['median'] / 1e6:.0f}"
        for s in ss]
    yield "Floor: push / pull (registry bytes / rate)", [
        f"{s['push_floor_s']:.2f}s / {s['pull_floor_s']:.2f}s" for s in ss]
    yield "State preserved on B (checksum, counter+1)", ["yes" if s["all_restored_with_state"] else "NO" for s in ss]


def print_table(results: list[SizeResult]) -> None:
    if not results:
        return
    head = [f"{x.state_mb} MiB ({len(x.reps)} rep{'s' if len(x.reps) > 1 else ''})" for x in results]
    rows = list(_rows(results))
    w0 = max(len(a) for a, _ in rows) + 2
    ws = [max(len(h), *(len(r[1][i]) for r in rows)) for i, h in enumerate(head)]
    print()
    print("| " + " | ".join([f"{'Fleet: node A -> registry -> node B':<{w0}}",
                            *(f"{h:>{w}}" for h, w in zip(head, ws))]) + " |")
    print("|" + "|".join(["-" * (w0 + 2), *("-" * (w + 2) for w in ws)]) + "|")
    for a, vals in rows:
        print("| " + " | ".join([f"{a:<{w0}}", *(f"{v:>{w}}" for v, w in zip(vals, ws))]) + " |")
    print("(median [min–max] over the repetitions)\n")
