"""The restore decision and flow: `runc restore` in place of `runc create`, or a reason not to.

Phases: verify (store checks: marker, seal or hashes, schema) → compatible
(node and container vs. metadata) → prepare (work dir, CRIU config:
cgroup placement, namespaces to join) → rootfs (apply the diff, journaled) →
restore (runc restore --detach).  Every failure undoes what was done and
returns a reason; the caller then runs the normal `runc create`.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import annotations, criu, cuda, gpu, lazy, mounts, nsrun, procfs, rootfs, runc, trust, versions
from .config import Settings
from .log import Logger, keep_criu_log
from .phases import Phases
from .state import ContainerState, StateDir
from .metadata import CheckpointMetadata, Compat
from .spec import Spec
from .store import DELETED, ROOTFS_DIFF, Checkpoint, CheckpointError, Store


@dataclass
class RestoreResult:
    ok: bool
    reason: str
    phases: dict[str, float] = field(default_factory=dict)
    pid: int | None = None


def cgroup_path(spec: Spec, container_id: str, systemd: bool) -> str:
    """The cgroup runc gives the new container (cgroupfs path, or systemd slice:prefix:name expanded)."""
    raw = spec.cgroups_path
    if systemd and raw.count(":") == 2:
        slice_, prefix, name = raw.split(":")
        slice_ = slice_ or "system.slice"
        parts, acc = [], ""
        for piece in slice_.removesuffix(".slice").split("-"):
            acc = f"{acc}-{piece}" if acc else piece
            parts.append(acc + ".slice")
        return "/" + "/".join(parts) + f"/{prefix}-{name}.scope"
    if not raw:
        return f"/{container_id}"
    return raw if raw.startswith("/") else f"/{raw}"


def join_namespaces(spec: Spec) -> list[str]:
    """Namespaces the new container joins by path (a CRI pod's UTS and IPC) for CRIU's join-ns.

    runc 1.1 hands CRIU only net and pid as external; without this the restored
    container would sit in private copies of the *old* pod's UTS and IPC namespaces.
    """
    return [f"join-ns {ns.type}:{ns.path}" for ns in spec.namespaces if ns.type in ("uts", "ipc") and ns.path]


def refusal(settings: Settings, store: Store, ckpt: Checkpoint, spec: Spec, st: ContainerState) -> str | None:
    """The trust and compatibility checks, before anything is touched: why not to restore, or None.

    A refusal is about this container, not the checkpoint: it never counts towards quarantine
    (RestoreFailed for a checkpoint whose task images cannot be read does).
    """
    node = versions.node_versions(settings.runc, settings.criu, cache_dir=settings.state_dir)
    here = Compat.of(spec, st.scope, st.image_fingerprint, node, versions.cgroup_version())
    why = CheckpointMetadata(ckpt.metadata).compat.refusal(here, shared=store.scope != st.scope)
    if why:
        return why
    try:
        tasks = trust.tasks_cached(ckpt.path, store.derived_cache(ckpt, "security"), ckpt.metadata_sha256)
    except Exception as e:  # noqa: BLE001 - a corrupt checkpoint: a failure that counts towards quarantine
        raise RestoreFailed(f"cannot read the checkpoint's task images: {type(e).__name__}: {e}") from None
    return trust.privilege_refusal(tasks, spec)


def restore(settings: Settings, store: Store, g: runc.GlobalOpts, c: runc.CreateArgs, spec: Spec,
            st: ContainerState, sd: StateDir, log: Logger) -> RestoreResult:
    """Restore checkpoint st.checkpoint_id from `store` (the container's scope's, or one shared with it)."""
    ph = Phases()
    cid = st.checkpoint_id
    owner = None if store.scope == st.scope else store.scope  # quarantine counts per restoring scope
    quarantine = Store(settings, st.scope)
    q = quarantine.quarantine_state(cid, owner)
    if q.get("quarantined"):
        return RestoreResult(False, f"checkpoint {cid} is quarantined after {q.get('failures')} failed restores "
                                    f"(last: {q.get('last_error')}); clear with `warmstart verify --clear {cid}`")
    journal = rootfs.Journal(sd.path / "rootfs-backup")
    rootfs_dir = Path(st.rootfs)
    work = sd.work / "restore"
    # runc's own output (its log, its stdout/stderr, its cleanup's) is warmstart's, never the container's
    runc_out = sd.path / "runc-restore.log"
    g = g.logging_to(runc_out)
    stdio: runc.StdioHandOff | None = None
    applied = False
    with store.lock(cid, exclusive=False, blocking=True):  # gc/remove wait; other restores share
        try:
            with ph("verify"):
                ckpt = store.open_verified(cid)
            with ph("compatible"):
                why = refusal(settings, store, ckpt, spec, st)
                mplan = mounts.plan(ckpt.path, spec.raw, cache=store.derived_cache(ckpt, "mounts"),
                                    key=ckpt.metadata_sha256)  # mounts the new container lacks: refused here
                here_gpu = gpu.for_container(gpu.node_inventory(), spec.raw) if ckpt.metadata.get("gpu") else None
                why = why or mplan.reason or gpu.incompatibility(ckpt.metadata.get("gpu"), here_gpu)
            if why:
                return RestoreResult(False, f"checkpoint {cid} refused: {why}", ph.timings)
            with ph("prepare"):
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir(mode=0o700, parents=True)
                cg = cgroup_path(spec, c.id, g.systemd_cgroup)
                st.cgroup_path = cg
                conf = criu.restore_config(cg, ext_mount_maps=mplan.ext_mount_maps)
                conf.options += join_namespaces(spec)
                conf.write(sd.criu_conf)
                hostname = expected_hostname(spec)
            with ph("rootfs"):
                applied = True
                rootfs.apply(rootfs_dir, ckpt.path / ROOTFS_DIFF, ckpt.path / DELETED, journal)
                made = mounts.apply(rootfs_dir, mplan.mkdirs, journal)  # e.g. the old nvidia-ctk-hook path
            for note in mplan.notes:
                log.info(f"mounts: {note}", created=",".join(made))
            with ph("restore"):
                # Images are read in place: CRIU writes only to the work dir (stats, logs),
                # so the sealed checkpoint stays untouched and may sit on a read-only store.
                lsm = trust.lsm_profile(spec)
                stdio = runc.StdioHandOff.prepare(ckpt.path, sd.work / "restore-images", runc_out)
                argv = runc.restore_argv(g, settings.criu, c, stdio.images if stdio else ckpt.path, work,
                                         extra=["--no-subreaper"] + (["--lsm-profile", lsm] if lsm else []))
                watch = runc.CriuGoneWatch()
                p, how = lazy.run_restore(settings.runc, settings.criu, argv, ckpt.path, work, spec.raw, c.id,
                                          g, c.pid_file, log, timeout=settings.restore_timeout_s,
                                          eager_env=criu.restore_env(settings.restore_read_threads),
                                          watch=watch, stdio=stdio)
            log.context["restore_mode"] = how
            if p.returncode != 0:
                died = (f"CRIU died mid-restore (killed the half-restored task {watch.released} that kept runc "
                        "waiting on the swrk socket); " if watch.released else "")
                raise RestoreFailed(f"runc restore failed (exit {p.returncode}): {died}{_reason(runc_out, work)}")
            if stdio is not None:
                try:
                    stdio.record(Path(g.root or runc.DEFAULT_ROOT), c.id)
                except (OSError, ValueError) as e:  # the next checkpoint would restore without its stdio
                    raise RestoreFailed(f"cannot record the container's stdio in runc's state: {e}") from e
            pid = runc.read_pid(c.pid_file)
            with ph("hostname"):
                _fix_hostname(pid, hostname)
            if (ckpt.metadata.get("dump") or {}).get("cuda"):
                with ph("cuda_restore"):
                    cs = cuda.restore_container(settings.runc, g, c.id, ckpt.metadata,
                                                gpu.gpu_pairs(ckpt.metadata.get("gpu"), here_gpu))
                ph.timings.update(cs.timings if cs else {})
            hooks = annotations.worker_hooks(spec.annotations)
            if hooks.post_restore is not None:  # e.g. vLLM wake_up; a failure is a failed restore (cold start)
                with ph("post_restore_hook"):
                    from . import hooks_exec  # noqa: PLC0415 - http.client and friends: only when used
                    try:
                        hooks_exec.run(hooks.post_restore, settings.runc, g, c.id, spec.raw, hooks.timeout_s, pid=pid)
                    except Exception as e:  # noqa: BLE001 - the worker's own hook: not the checkpoint's fault
                        raise WorkerHookFailed(f"post-restore hook failed: {e}") from e
            ph.timings.update({f"criu_{k}": v for k, v in criu.restore_stats(work).items() if k.endswith("_time")})
            quarantine.record_restore(cid, True, owner=owner)
            store.mark_used(cid)  # gc --budget evicts the least recently used
            _keep_logs(settings, c.id, work)
            sd.restored_marker.touch()  # launch.py: `start` is then a no-op without imports
            journal.commit()  # restored: drop what the diff set aside (never raises)
            return RestoreResult(True, f"restored from {cid} (verified by {ckpt.verified_by})", ph.timings, pid)
        except (CheckpointError, rootfs.RootfsError, WorkerHookFailed) as e:
            _cleanup(settings, g, c, rootfs_dir, journal if applied else None, log, st.cgroup_path, work)
            what = "restore from" if isinstance(e, WorkerHookFailed) else "checkpoint"
            return RestoreResult(False, f"{what} {cid} refused: {e}", ph.timings)
        except Exception as e:  # noqa: BLE001 - any failure: undo and start cold
            _cleanup(settings, g, c, rootfs_dir, journal if applied else None, log, st.cgroup_path, work)
            _keep_logs(settings, c.id, work)
            kept = keep_criu_log(settings.log_dir, "runc-restore", c.id, runc_out)
            q = quarantine.record_restore(cid, False, str(e)[:300], owner=owner)
            extra = " (now quarantined)" if q.get("quarantined") else ""
            if q.get("not_recorded"):
                extra += f" (the failure count could not be stored: {q['not_recorded']})"
            return RestoreResult(False, f"restore from {cid} failed{extra}: {e}"
                                        + (f" (runc's output: {kept})" if kept else ""), ph.timings)
        finally:
            if stdio is not None:
                stdio.close()  # the restored process holds its own copies
            # Its options were for this restore only: a client's own `runc checkpoint` of the container
            # reads the same file (org.criu.config), and tcp-close or cgroup-root would change its dump.
            sd.criu_conf.unlink(missing_ok=True)


def _in_uts(ns_file: str, hostname: str | None = None) -> str:
    """Read (or set) the hostname of the UTS namespace at ns_file (nsrun's child does the setns)."""
    def uts() -> bytes:
        if hostname is not None:
            nsrun.sethostname(hostname)
        return os.uname().nodename.encode()
    out = nsrun.run(uts, setns=((ns_file, nsrun.CLONE_NEWUTS),))
    if not out.ok:
        raise RestoreFailed(f"could not {'set' if hostname else 'read'} the hostname in {ns_file}: {out.error}")
    return out.data.decode(errors="replace")


def expected_hostname(spec: Spec) -> str | None:
    """The hostname the new container must have: its pod's (read before CRIU touches it) or the spec's."""
    uts = spec.namespace("uts")
    if uts and uts.path:
        return _in_uts(uts.path)
    return spec.hostname or None


def _fix_hostname(pid: int | None, want: str | None) -> None:
    """Give the restored container the new hostname back.

    CRIU restores the dumped UTS namespace's hostname: into a fresh namespace
    (container with its own UTS), or *into the pod's* when it joined it with
    join-ns (CRI), which would rename the whole new pod after the old one.
    """
    if want and pid:
        _in_uts(f"/proc/{pid}/ns/uts", want)


class RestoreFailed(Exception):
    pass


class WorkerHookFailed(Exception):
    """The container's own post-restore hook failed: a cold start, never counted against the checkpoint."""


def _reason(runc_log: Path, work: Path) -> str:
    """CRIU's first Error line, else runc's last error in its log (JSON lines, and its plain stderr)."""
    try:
        for line in (work / "restore.log").read_text(errors="replace").splitlines():
            if "Error" in line and "RLIMIT_NOFILE" not in line:
                return line.strip()[:300]
    except OSError:
        pass
    try:
        lines = runc_log.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("level") == "error":
            return str(rec.get("msg"))[:300]
    return "no error output"


def _keep_logs(settings: Settings, container_id: str, work: Path) -> None:
    """CRIU's restore.log outlives the work dir under log_dir (the operator's first question)."""
    keep_criu_log(settings.log_dir, "restore", container_id, work / "restore.log")


def _cleanup(settings: Settings, g: runc.GlobalOpts, c: runc.CreateArgs, rootfs_dir: Path,
             journal: rootfs.Journal | None, log: Logger, cgroup: str | None = None,
             work: Path | None = None) -> None:
    """Leave nothing of a failed attempt: restored tasks, runc state (and its cgroup), the pid file, rootfs changes.

    Nothing is deleted while a mount under runc's state dir is live (runc.discard_failed_restore).
    """
    if cgroup:
        _kill_cgroup(cgroup, log)  # a killed CRIU leaves restored tasks runc never recorded (reliability suite)
    for note in runc.discard_failed_restore(settings.runc, g, c.id):
        log.warning(note)
    if work is not None:
        _umount_under(work, log)  # ... and its cgroup yard mounted under the work dir
    if c.pid_file:
        Path(c.pid_file).unlink(missing_ok=True)
    if journal is not None:
        try:
            rootfs.undo(rootfs_dir, journal)
        except Exception as e:  # noqa: BLE001
            log.error("cleanup: could not undo the rootfs diff", error=str(e))


def _cgroup_dirs(cgroup: str) -> list[Path]:
    rel = cgroup.strip("/")
    base = Path("/sys/fs/cgroup")
    if not rel or ".." in rel.split("/"):
        return []
    if versions.cgroup_version() == 2:
        cands = [base / rel]
    else:
        cands = [d / rel for d in base.iterdir() if d.is_dir() and not d.is_symlink()]
    return [d for d in cands if (d / "cgroup.procs").is_file()]


def _kill_cgroup(cgroup: str, log: Logger) -> None:
    """SIGKILL every process in the new container's cgroup (thawed first): no container owns them yet."""
    import signal  # noqa: PLC0415
    import time  # noqa: PLC0415
    dirs = _cgroup_dirs(cgroup)
    for d in dirs:
        for name, val in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
            try:
                (d / name).write_text(val)
            except OSError:
                pass
    killed: set[int] = set()
    pids: set[int] = set()
    for _ in range(100):
        pids = set()
        for d in dirs:
            try:
                pids |= {int(x) for x in (d / "cgroup.procs").read_text().split()}
            except (OSError, ValueError):
                pass
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    if killed:
        log.warning(f"cleanup: killed {len(killed)} process(es) the failed restore left in cgroup {cgroup}",
                    still_there=len(pids))


def _umount_under(work: Path, log: Logger) -> None:
    """Detach what a killed restore left mounted below `work` (CRIU's cgroup yard)."""
    left = procfs.umount_under(work)
    if left:
        log.warning(f"cleanup: could not unmount {', '.join(left[:3])}")
