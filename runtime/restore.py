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

from . import annotations, criu, cuda, gpu, lazy, mounts, rootfs, runc, versions
from .config import Settings
from .log import Logger, keep_criu_log
from .phases import Phases
from .state import ContainerState, StateDir
from .store import DELETED, ROOTFS_DIFF, CheckpointError, Store


@dataclass
class RestoreResult:
    ok: bool
    reason: str
    phases: dict[str, float] = field(default_factory=dict)
    pid: int | None = None


def incompatibility(meta: dict[str, Any], spec: dict[str, Any], node: dict[str, str]) -> str | None:
    """Why this checkpoint cannot run here, checked before CRIU sees it; None when it can."""
    v = meta["versions"]
    if v.get("arch") != node["arch"]:
        return f"checkpoint arch {v.get('arch')} differs from node arch {node['arch']}"
    dumped, here = criu.parse_version(v.get("criu", "")), criu.parse_version(node["criu"])
    if dumped is None or here is None or here[:2] < dumped[:2]:
        return f"checkpoint made with CRIU {v.get('criu')}; this node has CRIU {node['criu']} (needs >= the dump's)"
    c = meta["container"]
    args = [str(a) for a in (spec.get("process") or {}).get("args") or []]
    if c["args"] != args:
        return f"container args {args!r} differ from the checkpoint's {c['args']!r}"
    ann = spec.get("annotations") or {}
    image = ann.get("io.kubernetes.cri.image-name") or ann.get("io.containerd.image.name") or ""
    if c.get("image") and image and c["image"] != image:
        return f"container image {image} differs from the checkpoint's {c['image']}"
    if c.get("cgroup", {}).get("version") not in (None, versions.cgroup_version()):
        return f"checkpoint taken on cgroup v{c['cgroup']['version']}, node runs v{versions.cgroup_version()}"
    return None


def cgroup_path(spec: dict[str, Any], container_id: str, systemd: bool) -> str:
    """The cgroup runc gives the new container (cgroupfs path, or systemd slice:prefix:name expanded)."""
    raw = str((spec.get("linux") or {}).get("cgroupsPath") or "")
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


def join_namespaces(spec: dict[str, Any]) -> list[str]:
    """Namespaces the new container joins by path (a CRI pod's UTS and IPC) for CRIU's join-ns.

    runc 1.1 hands CRIU only net and pid as external; without this the restored
    container would sit in private copies of the *old* pod's UTS and IPC namespaces.
    """
    out = []
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if ns.get("type") in ("uts", "ipc") and ns.get("path"):
            out.append(f"join-ns {ns['type']}:{ns['path']}")
    return out


def restore(settings: Settings, g: runc.GlobalOpts, c: runc.CreateArgs, spec: dict[str, Any],
            st: ContainerState, sd: StateDir, log: Logger) -> RestoreResult:
    store = Store(settings)
    ph = Phases()
    cid = st.checkpoint_id
    q = store.quarantine_state(cid)
    if q.get("quarantined"):
        return RestoreResult(False, f"checkpoint {cid} is quarantined after {q.get('failures')} failed restores "
                                    f"(last: {q.get('last_error')}); clear with `warmstart verify --clear {cid}`")
    journal = rootfs.Journal(sd.path / "rootfs-backup")
    rootfs_dir = Path(st.rootfs)
    work = sd.work / "restore"
    applied = False
    with store.lock(cid, exclusive=False, blocking=True):  # gc/remove wait; other restores share
        try:
            with ph("verify"):
                ckpt = store.open_verified(cid)
            with ph("compatible"):
                why = incompatibility(ckpt.metadata, spec, versions.node_versions(settings.runc, settings.criu,
                                                                                    cache_dir=settings.state_dir))
                mplan = mounts.plan(ckpt.path, spec, cache=store.derived_cache(ckpt, "mounts"),
                                    key=ckpt.metadata_sha256)  # mounts the new container lacks: refused here
                here_gpu = gpu.for_container(gpu.node_inventory(), spec) if ckpt.metadata.get("gpu") else None
                why = why or mplan.reason or gpu.incompatibility(ckpt.metadata.get("gpu"), here_gpu)
            if why:
                return RestoreResult(False, f"checkpoint {cid} is incompatible: {why}", ph.timings)
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
                argv = runc.restore_argv(g, settings.criu, c, ckpt.path, work, extra=["--no-subreaper"])
                # stdio inherited: runc hands our fds 0-2 (the shim's pipes) to the restored process
                p, how = lazy.run_restore(settings.runc, settings.criu, argv, ckpt.path, work, spec, c.id,
                                          g.argv, c.pid_file, log, timeout=settings.restore_timeout_s,
                                          eager_env=criu.restore_env(settings.restore_read_threads))
            log.context["restore_mode"] = how
            if p.returncode != 0:
                raise RestoreFailed(f"runc restore failed (exit {p.returncode}): {_reason(g.log, work)}")
            pid = runc.read_pid(c.pid_file)
            with ph("hostname"):
                _fix_hostname(pid, hostname)
            if (ckpt.metadata.get("dump") or {}).get("cuda"):
                with ph("cuda_restore"):
                    cs = cuda.restore_container(settings.runc, g, c.id, ckpt.metadata,
                                                gpu.gpu_pairs(ckpt.metadata.get("gpu"), here_gpu))
                ph.timings.update(cs.timings if cs else {})
            hooks = annotations.worker_hooks(spec.get("annotations") or {})
            if hooks.post_restore is not None:  # e.g. vLLM wake_up; a failure is a failed restore (cold start)
                with ph("post_restore_hook"):
                    from . import hooks_exec  # noqa: PLC0415 - http.client and friends: only when used
                    hooks_exec.run(hooks.post_restore, settings.runc, g, c.id, spec, hooks.timeout_s, pid=pid)
            ph.timings.update({f"criu_{k}": v for k, v in criu.restore_stats(work).items() if k.endswith("_time")})
            store.record_restore(cid, True)
            _keep_logs(settings, c.id, work)
            sd.restored_marker.touch()  # launch.py: `start` is then a no-op without imports
            journal.commit()  # restored: drop what the diff set aside (never raises)
            return RestoreResult(True, f"restored from {cid} (verified by {ckpt.verified_by})", ph.timings, pid)
        except (CheckpointError, rootfs.RootfsError) as e:
            _cleanup(settings, g, c, rootfs_dir, journal if applied else None, log, st.cgroup_path, work)
            return RestoreResult(False, f"checkpoint {cid} refused: {e}", ph.timings)
        except Exception as e:  # noqa: BLE001 - any failure: undo and start cold
            _cleanup(settings, g, c, rootfs_dir, journal if applied else None, log, st.cgroup_path, work)
            _keep_logs(settings, c.id, work)
            q = store.record_restore(cid, False, str(e)[:300])
            extra = " (now quarantined)" if q.get("quarantined") else ""
            if q.get("not_recorded"):
                extra += f" (the failure count could not be stored: {q['not_recorded']})"
            return RestoreResult(False, f"restore from {cid} failed{extra}: {e}", ph.timings)


def _uts_path(spec: dict[str, Any]) -> str | None:
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if ns.get("type") == "uts":
            return ns.get("path") or None
    return None


def _in_uts(ns_file: str, hostname: str | None = None) -> str:
    """Read (or set) the hostname of the UTS namespace at ns_file, from a throwaway child.

    setns would move this process into the namespace, so a forked child does it.
    """
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.close(r)
            import ctypes
            import socket
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(ns_file, os.O_RDONLY)
            if libc.setns(fd, 0x04000000) == 0:  # CLONE_NEWUTS
                if hostname is not None:
                    socket.sethostname(hostname)
                os.write(w, socket.gethostname().encode())
                code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode(errors="replace")
    _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RestoreFailed(f"could not {'set' if hostname else 'read'} the hostname in {ns_file}")
    return out


def expected_hostname(spec: dict[str, Any]) -> str | None:
    """The hostname the new container must have: its pod's (read before CRIU touches it) or the spec's."""
    path = _uts_path(spec)
    if path:
        return _in_uts(path)
    return spec.get("hostname") or None


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


def _reason(runc_log: str | None, work: Path) -> str:
    """CRIU's first Error line, else runc's last error in the shim's log file."""
    try:
        for line in (work / "restore.log").read_text(errors="replace").splitlines():
            if "Error" in line and "RLIMIT_NOFILE" not in line:
                return line.strip()[:300]
    except OSError:
        pass
    try:
        for line in reversed(Path(runc_log).read_text(errors="replace").splitlines() if runc_log else []):
            rec = json.loads(line)
            if rec.get("level") == "error":
                return str(rec.get("msg"))[:300]
    except (OSError, ValueError):
        pass
    return "no error output"


def _keep_logs(settings: Settings, container_id: str, work: Path) -> None:
    """CRIU's restore.log outlives the work dir under log_dir (the operator's first question)."""
    keep_criu_log(settings.log_dir, "restore", container_id, work / "restore.log")


def _cleanup(settings: Settings, g: runc.GlobalOpts, c: runc.CreateArgs, rootfs_dir: Path,
             journal: rootfs.Journal | None, log: Logger, cgroup: str | None = None,
             work: Path | None = None) -> None:
    """Leave nothing of a failed attempt: runc state (and its cgroup), the pid file, rootfs changes."""
    p = runc.run(settings.runc, g.argv + ["delete", "--force", c.id], timeout=60)
    if p.returncode != 0 and "does not exist" not in (p.stderr or "") and "not exist" not in (p.stderr or ""):
        log.warning("cleanup: runc delete --force after failed restore", stderr=(p.stderr or "")[-300:])
    leftover = Path(g.root or "/run/runc") / c.id
    if leftover.is_dir() and not leftover.is_symlink():
        # a runc restore killed half-way leaves a state dir (with the rootfs bind-mounted at criu-root)
        # that `delete --force` cannot parse; the cold `runc create` that follows would fail on it
        # ("container with given ID already exists")
        _umount_under(leftover, log)
        shutil.rmtree(leftover, ignore_errors=True)
        log.warning(f"cleanup: removed runc state {leftover} left by the killed restore")
    if cgroup:
        _kill_cgroup(cgroup, log)  # a killed CRIU leaves restored tasks runc never recorded (reliability suite)
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
    """Lazily unmount what a killed restore left mounted below `work` (CRIU's cgroup yard, runc's criu-root)."""
    import subprocess  # noqa: PLC0415
    prefix = os.path.realpath(work) + "/"
    try:
        with open("/proc/self/mountinfo") as f:
            points = [rootfs._unescape(ln.split()[4]) for ln in f if len(ln.split()) > 4]
    except OSError:
        return
    for mp in sorted({m for m in points if m.startswith(prefix)}, key=len, reverse=True):
        p = subprocess.run(["umount", "-l", mp], capture_output=True, text=True)
        if p.returncode != 0:
            log.warning(f"cleanup: could not unmount {mp}", stderr=p.stderr[-200:])
