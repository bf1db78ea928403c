"""The dump flow: on an opted-in container's first SIGTERM, checkpoint it into the store.

Phases: lock → criu-config → checkpoint (runc/CRIU; the container stops here) →
rootfs-diff → metadata → publish (hash, fsync, marker, rename, seal).  Any
failure discards the temp dir, so no `checkpoint.done` ever marks a partial
dump, and the caller lets the stop go on as plain runc.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import annotations, criu, cuda, gpu, rootfs, runc, versions
from .config import Settings
from .fileutil import WriteBehind
from .log import keep_criu_log
from .phases import Phases
from .state import ContainerState
from .metadata import SCHEMA_VERSION, Compat
from .spec import Spec
from .store import DELETED, DUMP_LOG, ROOTFS_DIFF, Store

if TYPE_CHECKING:
    from .container import Container


class DumpOutcome(Enum):
    PUBLISHED = "published"        # the checkpoint is in the store
    SKIPPED = "skipped"            # not attempted: a checkpoint exists, or another dump holds the id
    FAILED = "failed"              # no checkpoint; the container is as it was
    FAILED_STOPPED = "failed-stopped"  # no checkpoint, and CRIU had stopped the container (not --leave-running)


@dataclass
class DumpResult:
    outcome: DumpOutcome
    reason: str
    path: Path | None = None
    phases: dict[str, float] | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is DumpOutcome.PUBLISHED

    @property
    def skipped(self) -> bool:
        return self.outcome is DumpOutcome.SKIPPED


def redact_env(env: list[str], patterns: tuple[str, ...]) -> list[str]:
    """Values of keys that look like secrets are replaced by a hash: comparable, not readable."""
    out = []
    for item in env:
        key, sep, val = item.partition("=")
        if any(fnmatch.fnmatchcase(key.upper(), p.upper()) for p in patterns):
            val = "sha256:" + hashlib.sha256(val.encode()).hexdigest()[:16]
        out.append(f"{key}{sep}{val}")
    return out


def build_metadata(settings: Settings, st: ContainerState, spec: Spec, phases: dict[str, float],
                   stats: dict[str, Any], diff: rootfs.DiffSummary, rootfs_kind: str) -> dict[str, Any]:
    node = versions.node_versions(settings.runc, settings.criu)
    return {
        "schema_version": SCHEMA_VERSION,
        "id": st.checkpoint_id,
        "id_source": st.id_source,
        "identity": st.identity,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "container": {
            "id": st.container_id,
            "args": spec.args,
            "env": redact_env(spec.env_list, settings.secret_env_patterns),
            "cwd": spec.cwd,
            "image": spec.image_name,
            "hostname": spec.hostname,
            "rootfs": {"kind": rootfs_kind, "readonly": spec.root_readonly},
            "mounts": [{k: m[k] for k in ("destination", "type", "source", "options") if k in m}
                       for m in spec.mounts],
            "cgroup": {"version": versions.cgroup_version(), "path": st.cgroup_path or ""},
            "namespaces": sorted({n.type for n in spec.namespaces}),
        },
        "compat": Compat.of(spec, st.scope, st.image_fingerprint, node, versions.cgroup_version()).to_json(),
        "versions": node,
        "dump": {"phases": phases, "criu_stats": stats},
        "rootfs_diff": {"files": diff.files, "deleted": diff.deleted, "bytes": diff.bytes},
        "sizes": {"total_bytes": 0, "files": 0,
                  "pages_bytes": int(stats.get("pages_written", 0)) * 4096 if isinstance(stats, dict) else 0},
        "manifest": {},
    }


def dump(ct: Container, leave_running: bool = False, frozen: bool = False) -> DumpResult:
    """Checkpoint the container into the store.  With `frozen`, it is paused (cgroup freezer) from
    before CRIU until its rootfs diff is captured and the checkpoint published, dumped with
    --leave-running and resumed: memory and rootfs are of one instant, and the process lives on to
    get the client's stop signal as under runc (its own exit status, not CRIU's SIGKILL)."""
    leave_running = leave_running or frozen
    settings, st, rc, log = ct.settings, ct.st, ct.runc, ct.log
    store = Store(settings, st.scope)
    cid = st.checkpoint_id
    ph = Phases()
    with store.lock(cid) as held:
        if not held:
            return DumpResult(DumpOutcome.SKIPPED, f"another dump of checkpoint {cid} is in progress; skipping this one")
        if store.exists(cid):
            return DumpResult(DumpOutcome.SKIPPED, f"checkpoint {cid} already exists; not dumping again")
        tmp = store.new_tmp(cid)
        stopped = paused = False
        drv, cuda_s = None, None  # CUDA processes moved out of the GPU (undone unless the dump stopped them)
        work = ct.sd.work / f"dump-{int(time.time() * 1000)}"
        try:
            spec = json.loads((Path(st.bundle) / "config.json").read_text())
            hooks = annotations.worker_hooks(spec.get("annotations") or {})
            if hooks.pre_dump is not None:  # e.g. vLLM sleep: a failure means no checkpoint, a plain stop
                with ph("pre_dump_hook"):
                    from . import hooks_exec  # noqa: PLC0415 - http.client and friends: only when used
                    hooks_exec.run(hooks.pre_dump, rc, st.container_id, spec, hooks.timeout_s)
            if Spec(spec).has_gpu:
                with ph("cuda_checkpoint"):
                    drv, cuda_s = cuda.checkpoint_container(rc, st.container_id, spec,
                                                            refuse_shared=settings.cuda_ipc == "refuse")
            if frozen:
                with ph("pause"):
                    p = rc.pause(st.container_id)
                if p.returncode != 0:
                    return DumpResult(DumpOutcome.FAILED,
                                      f"runc pause failed (exit {p.returncode}): {_last_error(p.stderr, None)}")
                paused = True
            with ph("criu_config"):
                criu.dump_config(settings.dump_timeout_s, settings.network_lock).write(ct.sd.criu_conf)
                work.mkdir(mode=0o700, parents=True)
            with ph("checkpoint"), WriteBehind(tmp):  # the disk writes while CRIU does: publish's fsync waits less
                p = rc.checkpoint(st.container_id, runc.CheckpointOpts(tmp, work, leave_running=leave_running),
                                  timeout=settings.dump_timeout_s + 30)
            if (work / "dump.log").exists():
                shutil.copyfile(work / "dump.log", tmp / DUMP_LOG)
            if p.returncode != 0:
                kept = keep_criu_log(settings.log_dir, "dump", st.container_id, work / "dump.log")
                return DumpResult(DumpOutcome.FAILED, f"runc checkpoint failed (exit {p.returncode}): "
                                  f"{_last_error(p.stderr, work / 'dump.log')}" + (f" (CRIU log: {kept})" if kept else ""))
            stopped = not leave_running
            if paused:
                criu.record_thawed(tmp)  # the FROZEN CRIU found was warmstart's own pause
            final = _publish(ct, store, spec, tmp, work, cuda_s, ph)
            return DumpResult(DumpOutcome.PUBLISHED, "checkpoint published", final, dict(ph.timings))
        except Exception as e:  # noqa: BLE001 - every failure means: no checkpoint, stop as plain runc
            return DumpResult(DumpOutcome.FAILED_STOPPED if stopped else DumpOutcome.FAILED,
                              f"dump failed after phase {list(ph.timings)[-1:] or ['start']}: {type(e).__name__}: {e}")
        finally:
            if paused:  # before the GPU is given back: CUDA's restore runs inside the process
                p = rc.resume(st.container_id)
                if p.returncode != 0:
                    log.error(f"could not resume the container after the dump: {_last_error(p.stderr, None)}")
            if cuda_s is not None and cuda_s.locked and not stopped:
                errs = cuda.undo(drv, cuda_s)  # the container keeps running: give its processes the GPU back
                if errs:
                    log.error("could not give the GPU back to the container after the dump", errors=errs)
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)


def _publish(ct: Container, store: Store, spec: dict[str, Any], tmp: Path, work: Path,
             cuda_s: cuda.CudaSession | None, ph: Phases) -> Path:
    """rootfs_diff, metadata, publish: what CRIU dumped into `tmp` becomes checkpoint st.checkpoint_id."""
    st = ct.st
    rootfs_dir = Path(st.rootfs)
    kind = "overlay" if rootfs.overlay_upperdir(rootfs_dir) is not None else "dir"
    with ph("rootfs_diff"):
        diff = rootfs.capture(rootfs_dir, ct.sd.baseline, tmp / ROOTFS_DIFF, tmp / DELETED)
    with ph("metadata"):
        stats = criu.dump_stats(work)
        meta = build_metadata(ct.settings, st, Spec(spec), {}, stats, diff, kind)
        if cuda_s is not None:
            meta["dump"]["cuda"] = cuda_s.metadata()
            gpus = gpu.for_container(gpu.node_inventory(), spec)
            if gpus:
                meta["gpu"] = gpus
    with ph("publish"):
        meta["dump"]["phases"] = dict(ph.timings)
        return store.publish(st.checkpoint_id, tmp, meta)


def _last_error(stderr: str, criu_log: Path | None) -> str:
    """The most telling lines: CRIU's first Error line, else runc's own error lines."""
    try:
        for line in criu_log.read_text(errors="replace").splitlines() if criu_log else []:
            if "Error" in line and "RLIMIT_NOFILE" not in line:
                return line.strip()[:300]
    except OSError:
        pass
    lines = [ln.strip() for ln in (stderr or "").splitlines() if ln.strip() and not ln.startswith("log file:")]
    return " | ".join(lines)[-400:] if lines else "no error output"
