"""Whether a checkpoint may restore into a container: tenancy and privileges, checked in one place.

- **Tenancy.** A checkpoint belongs to a scope: the pod's Kubernetes namespace,
  which containerd's CRI sets itself (a pod can pass through only
  `warmstart.dev/*` annotations), or `_local` for containers started outside
  Kubernetes (podman, `ctr`, runc: the node's own users).  Each scope has its own
  store directory, quarantine and locks; a checkpoint restores across scopes
  only when the node config shares it (`shared_checkpoints = ["ns/id"]`).
- **Privileges.** CRIU restores each task's credentials, capabilities,
  no_new_privs, seccomp mode and rlimits *from the images*, whatever the new
  spec says.  So before CRIU runs, every task and thread in `core-*.img` must be
  something the new container's own process could have become by itself:
  uids/gids the spec's unless it may set them, each capability set within the
  spec's, no_new_privs where the spec asks for it, a seccomp filter where the
  spec installs one, rlimits no higher than the spec's (or, for those it does not
  set, than the runtime's, which a cold start inherits), and the same namespace
  set (a user namespace in particular).
"""
from __future__ import annotations

import json
import re
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .spec import Spec

LOCAL_SCOPE = "_local"
K8S_NAMESPACE_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# linux/capability.h, in bit order (CAP_LAST_CAP = 40 on 6.x kernels)
CAPS = ("CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE "
        "NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO SYS_CHROOT "
        "SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE "
        "AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ "
        "PERFMON BPF CHECKPOINT_RESTORE").split()
RLIMITS = ("CPU FSIZE DATA STACK CORE RSS NPROC NOFILE MEMLOCK AS LOCKS SIGPENDING MSGQUEUE NICE RTPRIO "
           "RTTIME").split()
RLIM_INFINITY = (1 << 64) - 1
# CRIU's ids-*.img field for each spec namespace type that matters for what a process can reach
NS_IDS = {"user": "user_ns_id", "pid": "pid_ns_id", "network": "net_ns_id", "ipc": "ipc_ns_id",
          "uts": "uts_ns_id", "mount": "mnt_ns_id"}


class TrustError(ValueError):
    """A spec whose tenant cannot be told; the message names the field."""


def scope_of(spec: Spec) -> str:
    ns = spec.k8s_namespace
    if ns is None:
        return LOCAL_SCOPE
    if not K8S_NAMESPACE_RE.fullmatch(ns):
        raise TrustError(f"annotation io.kubernetes.cri.sandbox-namespace {ns[:80]!r} is not a namespace name")
    return ns


def shared(shared_checkpoints: tuple[str, ...], owner: str, checkpoint_id: str) -> bool:
    """The node config lets every scope restore `owner`'s checkpoint `checkpoint_id`."""
    return f"{owner}/{checkpoint_id}" in shared_checkpoints


def cap_mask(names: frozenset[str]) -> int:
    out = 0
    for n in names:
        n = n.upper().removeprefix("CAP_")
        if n in CAPS:
            out |= 1 << CAPS.index(n)
    return out


def cap_names(mask: int) -> list[str]:
    return [f"CAP_{c}" for i, c in enumerate(CAPS) if mask >> i & 1] + \
        [f"cap{i}" for i in range(len(CAPS), 64) if mask >> i & 1]


# -- what the images say --------------------------------------------------------

@dataclass(frozen=True)
class TaskSecurity:
    """One task's (or thread's) restored security state, from its core-<tid>.img."""
    tid: int
    uids: tuple[int, ...]   # uid, euid, suid, fsuid
    gids: tuple[int, ...]   # gid, egid, sgid, fsgid
    groups: tuple[int, ...]
    caps: dict[str, int]    # set name (as in the spec) -> mask
    no_new_privs: bool
    seccomp_mode: str       # "disabled", "strict" or "filter"
    rlimits: tuple[tuple[int, int], ...]  # (cur, max) by resource number
    namespaces: tuple[str, ...]  # spec namespace types in which the task is not in the dumping CRIU's


def _mask(words: list[int] | None) -> int:
    return sum(int(w) << (32 * i) for i, w in enumerate(words or []))


def read_tasks(image_dir: Path) -> list[TaskSecurity]:
    """Decode every core-*.img (each task and thread) with pycriu."""
    from . import criu  # noqa: PLC0415 - pycriu and protobuf: only when a checkpoint is checked

    inventory = (criu.load_image(image_dir / "inventory.img").get("entries") or [{}])[0]
    root_ids = inventory.get("root_ids") or {}
    ns_of: dict[int, tuple[str, ...]] = {}
    pids: dict[int, int] = {}  # tid -> the task (pid) whose ids-<pid>.img applies
    for entry in criu.load_image(image_dir / "pstree.img").get("entries") or []:
        for tid in entry.get("threads") or [entry["pid"]]:
            pids[int(tid)] = int(entry["pid"])
    for pid in set(pids.values()):
        ids = (criu.load_image(image_dir / f"ids-{pid}.img").get("entries") or [{}])[0]
        ns_of[pid] = tuple(sorted(t for t, key in NS_IDS.items() if ids.get(key) != root_ids.get(key)))
    out = []
    for tid, pid in sorted(pids.items()):
        core = (criu.load_image(image_dir / f"core-{tid}.img").get("entries") or [{}])[0]
        tc = core.get("thread_core") or {}
        cr = tc.get("creds") or {}
        rl = ((core.get("tc") or {}).get("rlimits") or {}).get("rlimits") or []
        mode = tc.get("seccomp_mode") or "disabled"
        out.append(TaskSecurity(
            tid=tid,
            uids=tuple(int(cr.get(k, 0)) for k in ("uid", "euid", "suid", "fsuid")),
            gids=tuple(int(cr.get(k, 0)) for k in ("gid", "egid", "sgid", "fsgid")),
            groups=tuple(sorted(int(g) for g in cr.get("groups") or [])),
            caps={"inheritable": _mask(cr.get("cap_inh")), "permitted": _mask(cr.get("cap_prm")),
                  "effective": _mask(cr.get("cap_eff")), "bounding": _mask(cr.get("cap_bnd")),
                  "ambient": _mask(cr.get("cap_amb"))},
            no_new_privs=bool(cr.get("no_new_privs")),
            seccomp_mode=str(mode).lower() if not isinstance(mode, int) else
            {0: "disabled", 1: "strict", 2: "filter"}.get(mode, str(mode)),
            rlimits=tuple((int(r.get("cur", 0)), int(r.get("max", 0))) for r in rl),
            namespaces=ns_of.get(pid, ())))
    if not out:
        raise ValueError("no task in pstree.img")
    return out


def tasks_cached(image_dir: Path, cache: Path | None, key: str) -> list[TaskSecurity]:
    """read_tasks, once per checkpoint: decoding costs ~4 ms per thread, a cache hit well under 1 ms."""
    if cache is not None and key:
        try:
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                return [TaskSecurity(**{**t, "uids": tuple(t["uids"]), "gids": tuple(t["gids"]),
                                        "groups": tuple(t["groups"]), "namespaces": tuple(t["namespaces"]),
                                        "rlimits": tuple(tuple(r) for r in t["rlimits"])})
                        for t in data["tasks"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    tasks = read_tasks(image_dir)
    if cache is not None and key:
        from dataclasses import asdict  # noqa: PLC0415

        from .fileutil import write_json_atomic  # noqa: PLC0415
        try:
            write_json_atomic(cache, {"key": key, "tasks": [asdict(t) for t in tasks]})
        except OSError:
            pass  # only a cache
    return tasks


# -- the rule -------------------------------------------------------------------

def _own_hard_limit(res: int) -> int:
    hard = resource.getrlimit(res)[1]
    return RLIM_INFINITY if hard == resource.RLIM_INFINITY else hard


def privilege_refusal(tasks: list[TaskSecurity], spec: Spec) -> str | None:
    """Why restoring these tasks would give the container more than its spec grants; None when it would not."""
    want = {s: cap_mask(spec.capabilities[s]) for s in spec.capabilities}
    may = want["permitted"]
    setuid, setgid = 1 << CAPS.index("SETUID"), 1 << CAPS.index("SETGID")
    setpcap, sys_resource = 1 << CAPS.index("SETPCAP"), 1 << CAPS.index("SYS_RESOURCE")
    spec_ns = tuple(sorted(n.type for n in spec.namespaces if n.type in NS_IDS))
    limits = {RLIMITS.index(r.type.removeprefix("RLIMIT_")): r.hard for r in spec.rlimits
              if r.type.removeprefix("RLIMIT_") in RLIMITS}
    for t in tasks:
        who = f"task {t.tid}"
        if not may & setuid and set(t.uids) != {spec.uid}:
            return f"process.user.uid: {who} runs as uids {list(t.uids)}, the spec's process as {spec.uid}"
        if not may & setgid:
            if set(t.gids) != {spec.gid}:
                return f"process.user.gid: {who} runs as gids {list(t.gids)}, the spec's process as {spec.gid}"
            extra = set(t.groups) - set(spec.additional_gids) - {spec.gid}
            if extra:
                return f"process.user.additionalGids: {who} has groups {sorted(extra)} the spec does not grant"
        inheritable_ok = want["inheritable"] | (want["bounding"] if may & setpcap else 0)
        allowed = {"permitted": may, "effective": may, "bounding": want["bounding"],
                   "inheritable": inheritable_ok, "ambient": want["ambient"] | (may & inheritable_ok)}
        for name, mask in allowed.items():
            over = t.caps[name] & ~mask
            if over:
                return f"process.capabilities.{name}: {who} holds {', '.join(cap_names(over)[:4])} beyond the spec"
        if spec.no_new_privileges and not t.no_new_privs:
            return f"process.noNewPrivileges: the spec sets it, {who} was dumped without it"
        if spec.seccomp_sha256 and t.seccomp_mode != "filter":
            return f"linux.seccomp: the spec installs a filter, {who} was dumped with seccomp {t.seccomp_mode}"
        if t.namespaces != spec_ns:
            return f"linux.namespaces: {who} was dumped in namespaces {list(t.namespaces)}, the spec has {list(spec_ns)}"
        if not may & sys_resource:
            for res, (_, hard) in enumerate(t.rlimits[:len(RLIMITS)]):
                cap = limits.get(res, _own_hard_limit(res))
                if hard > cap:
                    shown = "unlimited" if hard == RLIM_INFINITY else hard
                    return f"process.rlimits: {who} has RLIMIT_{RLIMITS[res]} hard {shown} above {cap}"
    return None


def lsm_profile(spec: Spec) -> str | None:
    """runc restore's --lsm-profile TYPE:NAME: the new spec's label, not the one in the images."""
    if spec.apparmor_profile:
        return f"apparmor:{spec.apparmor_profile}"
    if spec.selinux_label:
        return f"selinux:{spec.selinux_label}"
    return None


def summary(tasks: list[TaskSecurity]) -> dict[str, Any]:
    """What `warmstart inspect` shows of a checkpoint's privileges."""
    root = tasks[0]
    return {"tasks": len(tasks), "uids": sorted({u for t in tasks for u in t.uids}),
            "capabilities": cap_names(max(t.caps["effective"] for t in tasks)),
            "no_new_privs": all(t.no_new_privs for t in tasks), "seccomp": root.seccomp_mode}
