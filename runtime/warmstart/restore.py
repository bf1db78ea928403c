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
from typing import TYPE_CHECKING

from . import annotations, criu, cuda, gpu, lazy, mounts, nsrun, procfs, rootfs, runc, trust, versions
from .budget import KEY as BUDGET_KEY, BudgetSpent, CreateBudget
from .config import Settings
from .log import Logger, keep_criu_log
from .phases import Phases
from .state import ContainerState
from .metadata import CheckpointMetadata, Compat
from .spec import Spec
from .store import DELETED, ROOTFS_DIFF, Checkpoint, CheckpointError, Store

if TYPE_CHECKING:
    from .container import Container


@dataclass
class RestoreResult:
    ok: bool
    reason: str
    phases: dict[str, float] = field(default_factory=dict)
    pid: int | None = None
    id_taken: bool = False  # runc already had the id: nothing of the restore reached runc (IdTaken)


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


def restore(ct: Container, store: Store) -> RestoreResult:
    """Restore ct's checkpoint from `store` (the container's scope's, or one shared with it)."""
    cid = ct.st.checkpoint_id
    owner = None if store.scope == ct.st.scope else store.scope  # quarantine counts per restoring scope
    quarantine = Store(ct.settings, ct.st.scope)
    q = quarantine.quarantine_state(cid, owner)
    if q.get("quarantined"):
        return RestoreResult(False, f"checkpoint {cid} is quarantined after {q.get('failures')} failed restores "
                                    f"(last: {q.get('last_error')}); clear with `warmstart verify --clear {cid}`")
    budget = ct.budget
    assert budget is not None
    with store.lock(cid, exclusive=False, blocking=True, timeout_s=budget.left()) as held:  # gc/remove wait
        if not held:
            return RestoreResult(False, f"checkpoint {cid} still locked by gc or remove after {budget.elapsed():.0f}s "
                                        f"of the create ({BUDGET_KEY} = {budget.total_s:g} in the config)")
        return _Attempt(ct, store, quarantine, owner, budget).run()  # other restores share the lock


class _Attempt:
    """One restore attempt, and what it did so far: a failure undoes exactly that."""

    def __init__(self, ct: Container, store: Store, quarantine: Store, owner: str | None,
                 budget: CreateBudget) -> None:
        assert ct.bundle is not None
        self.ct, self.store, self.quarantine, self.owner, self.budget = ct, store, quarantine, owner, budget
        self.c, self.spec, self.log = ct.bundle.c, ct.bundle.view, ct.log
        self.cid = ct.st.checkpoint_id
        self.ph = Phases()
        self.journal = rootfs.Journal(ct.sd.path / "rootfs-backup")
        self.rootfs_dir = Path(ct.st.rootfs)
        self.work = ct.sd.work / "restore"
        # runc's own output (its log, its stdout/stderr, its cleanup's) is warmstart's, never the container's
        self.runc_out = ct.sd.path / "runc-restore.log"
        self.rc = ct.runc.logging_to(self.runc_out)
        self.stdio: runc.StdioHandOff | None = None
        self.applied = False

    def run(self) -> RestoreResult:
        ct, cid, ph = self.ct, self.cid, self.ph
        try:
            why = self._check()
            if why:
                return RestoreResult(False, f"checkpoint {cid} refused: {why}", ph.timings)
            self.budget.check("the rootfs diff")
            self._prepare()
            pid = self._restore()
            self._revive(pid)
            ph.timings.update({f"criu_{k}": v for k, v in criu.restore_stats(self.work).items() if k.endswith("_time")})
            self.quarantine.record_restore(cid, True, owner=self.owner)
            self.store.mark_used(cid)  # gc --budget evicts the least recently used
            _keep_logs(ct.settings, self.c.id, self.work)
            ct.mark_restored()  # launch.py: `start` is then a no-op without imports
            self.journal.commit()  # restored: drop what the diff set aside (never raises)
            return RestoreResult(True, f"restored from {cid} (verified by {self.ckpt.verified_by})", ph.timings, pid)
        except IdTaken as e:
            # runc made nothing: its state, the cgroup's processes and the pid file are the other create's
            self._undo_rootfs()
            return RestoreResult(False, f"restore from {cid} not attempted: {e}", ph.timings, id_taken=True)
        except BudgetSpent as e:  # the create's deadline, not the checkpoint's fault: no quarantine count
            self._cleanup()
            return RestoreResult(False, f"restore from {cid} abandoned: {e}", ph.timings)
        except (CheckpointError, rootfs.RootfsError, WorkerHookFailed) as e:
            self._cleanup()
            what = "restore from" if isinstance(e, WorkerHookFailed) else "checkpoint"
            return RestoreResult(False, f"{what} {cid} refused: {e}", ph.timings)
        except Exception as e:  # noqa: BLE001 - any failure: undo and start cold
            self._cleanup()
            _keep_logs(ct.settings, self.c.id, self.work)
            kept = keep_criu_log(ct.settings.log_dir, "runc-restore", self.c.id, self.runc_out)
            q = self.quarantine.record_restore(cid, False, str(e)[:300], owner=self.owner)
            extra = " (now quarantined)" if q.get("quarantined") else ""
            if q.get("not_recorded"):
                extra += f" (the failure count could not be stored: {q['not_recorded']})"
            return RestoreResult(False, f"restore from {cid} failed{extra}: {e}"
                                        + (f" (runc's output: {kept})" if kept else ""), ph.timings)
        finally:
            if self.stdio is not None:
                self.stdio.close()  # the restored process holds its own copies
            # Its options were for this restore only: a client's own `runc checkpoint` of the container
            # reads the same file (org.criu.config), and tcp-close or cgroup-root would change its dump.
            ct.sd.criu_conf.unlink(missing_ok=True)

    def _check(self) -> str | None:
        """verify, compatible: the checkpoint is sound and fits this container and node, or why not."""
        store, spec = self.store, self.spec
        with self.ph("verify"):
            self.ckpt = ckpt = store.open_verified(self.cid)
        with self.ph("compatible"):
            why = refusal(self.ct.settings, store, ckpt, spec, self.ct.st)
            self.mplan = mounts.plan(ckpt.path, spec.raw, cache=store.derived_cache(ckpt, "mounts"),
                                     key=ckpt.metadata_sha256)  # mounts the new container lacks: refused here
            self.here_gpu = gpu.for_container(gpu.node_inventory(), spec.raw) if ckpt.metadata.get("gpu") else None
            return why or self.mplan.reason or gpu.incompatibility(ckpt.metadata.get("gpu"), self.here_gpu)

    def _prepare(self) -> None:
        """prepare (work dir, CRIU config), rootfs (the diff and missing mount points, journaled)."""
        ct, spec, mplan = self.ct, self.spec, self.mplan
        with self.ph("prepare"):
            shutil.rmtree(self.work, ignore_errors=True)
            self.work.mkdir(mode=0o700, parents=True)
            ct.st.cgroup_path = cgroup_path(spec, self.c.id, self.rc.g.systemd_cgroup)
            conf = criu.restore_config(ct.st.cgroup_path, ext_mount_maps=mplan.ext_mount_maps,
                                      network_lock=ct.settings.network_lock)
            conf.options += join_namespaces(spec)
            conf.write(ct.sd.criu_conf)
            self.hostname = expected_hostname(spec)
        with self.ph("rootfs"):
            self.applied = True
            rootfs.apply(self.rootfs_dir, self.ckpt.path / ROOTFS_DIFF, self.ckpt.path / DELETED, self.journal)
            made = mounts.apply(self.rootfs_dir, mplan.mkdirs, self.journal)  # e.g. the old nvidia-ctk-hook path
        for note in mplan.notes:
            self.log.info(f"mounts: {note}", created=",".join(made))

    def _restore(self) -> int | None:
        """restore: `runc restore --detach` in place of create (lazy.run_restore); the restored pid."""
        ct, ckpt = self.ct, self.ckpt
        with self.ph("restore"):
            # Images are read in place: CRIU writes only to the work dir (stats, logs),
            # so the sealed checkpoint stays untouched and may sit on a read-only store.
            self.stdio = runc.StdioHandOff.prepare(ckpt.path, ct.sd.work / "restore-images", self.runc_out)
            opts = runc.RestoreOpts(self.stdio.images if self.stdio else ckpt.path, self.work, self.c,
                                   no_subreaper=True, lsm_profile=trust.lsm_profile(self.spec))
            watch = runc.CriuGoneWatch()
            run = runc.RestoreRun(ct.settings.restore_timeout_s, criu.restore_env(ct.settings.restore_read_threads),
                                  watch, self.stdio, self.budget)
            p, how = lazy.run_restore(self.rc, self.c.id, opts, run, ckpt.path, self.spec.raw, self.log)
        self.log.context["restore_mode"] = how
        # runc's own refusal, before it ran CRIU: CRIU's log may quote the container's own file names
        if p.returncode != 0 and not (self.work / "restore.log").exists() \
                and ID_TAKEN in (_runc_error(self.runc_out) or ""):
            raise IdTaken(f"runc already has a container {self.c.id} (a create that did not wait for this "
                          "one's lock: a plain one, or runc called directly)")
        if p.returncode != 0:
            died = (f"CRIU died mid-restore (killed the half-restored task {watch.released} that kept runc "
                    "waiting on the swrk socket); " if watch.released else "")
            raise RestoreFailed(f"runc restore failed (exit {p.returncode}): {died}{_reason(self.runc_out, self.work)}")
        if self.stdio is not None:
            try:
                self.stdio.record(self.rc.root, self.c.id)
            except (OSError, ValueError) as e:  # the next checkpoint would restore without its stdio
                raise RestoreFailed(f"cannot record the container's stdio in runc's state: {e}") from e
        return runc.read_pid(self.c.pid_file)

    def _revive(self, pid: int | None) -> None:
        """hostname, CUDA, the worker's post-restore hook: the restored process made whole."""
        ph, meta = self.ph, self.ckpt.metadata
        with ph("hostname"):
            _fix_hostname(pid, self.hostname)
        if (meta.get("dump") or {}).get("cuda"):
            self.budget.check("the CUDA restore")  # the driver's calls take no deadline: none starts past it
            with ph("cuda_restore"):
                cs = cuda.restore_container(self.rc, self.c.id, meta, gpu.gpu_pairs(meta.get("gpu"), self.here_gpu),
                                            self.budget.limit(30, "runc ps").seconds, self.budget.check)
            ph.timings.update(cs.timings if cs else {})
        hooks = annotations.worker_hooks(self.spec.annotations)
        if hooks.post_restore is not None:  # e.g. vLLM wake_up; a failure is a failed restore (cold start)
            self.budget.check("the post-restore hook")
            wait = self.budget.limit(hooks.timeout_s, annotations.HOOK_TIMEOUT)
            with ph("post_restore_hook"):
                from . import hooks_exec  # noqa: PLC0415 - http.client and friends: only when used
                try:
                    hooks_exec.run(hooks.post_restore, self.rc, self.c.id, self.spec.raw, wait.seconds, pid=pid,
                                   timeout_source=wait.source)
                except Exception as e:  # noqa: BLE001 - the worker's own hook: not the checkpoint's fault
                    raise WorkerHookFailed(f"post-restore hook failed: {e}") from e

    def _cleanup(self) -> None:
        """Leave nothing of a failed attempt: restored tasks, runc state (and its cgroup), the pid file, rootfs changes.

        Nothing is deleted while a mount under runc's state dir is live (Runc.discard_failed_restore).
        """
        log, cgroup = self.log, self.ct.st.cgroup_path
        if cgroup:
            _kill_cgroup(cgroup, log)  # a killed CRIU leaves restored tasks runc never recorded (reliability suite)
        for note in self.rc.discard_failed_restore(self.c.id):
            log.warning(note)
        _umount_under(self.work, log)  # ... and its cgroup yard mounted under the work dir
        if self.c.pid_file:
            Path(self.c.pid_file).unlink(missing_ok=True)
        self._undo_rootfs()

    def _undo_rootfs(self) -> None:
        if self.applied:
            try:
                rootfs.undo(self.rootfs_dir, self.journal)
            except Exception as e:  # noqa: BLE001
                self.log.error("cleanup: could not undo the rootfs diff", error=str(e))


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


# runc's error when its create (or restore) finds the id taken (libcontainer's ErrExist)
ID_TAKEN = "container with given ID already exists"


class IdTaken(RestoreFailed):
    """runc refused the restore before doing anything: another container holds the id."""


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
    return _runc_error(runc_log) or "no error output"


def _runc_error(runc_log: Path) -> str | None:
    """runc's own last error message in its JSON log (text from the checkpoint never gets there)."""
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
    return None


def _keep_logs(settings: Settings, container_id: str, work: Path) -> None:
    """CRIU's restore.log outlives the work dir under log_dir (the operator's first question)."""
    keep_criu_log(settings.log_dir, "restore", container_id, work / "restore.log")


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
