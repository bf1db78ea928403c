"""A typed, read-only view of an OCI runtime spec (a bundle's config.json).

Everything warmstart reads from a spec is read here, once, with the defaults
runc applies: the process (args, env, cwd, user, capabilities, rlimits,
no_new_privs, LSM labels), the Linux section (namespaces, ID mappings,
seccomp, devices, cgroup path), the image and the tenant as CRI records them.
The raw dict stays available for what goes back to runc unchanged.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

# CRI's annotations (containerd sets them itself; only warmstart.dev/* pass through from a pod).
K8S_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
CRI_IMAGE_NAME = "io.kubernetes.cri.image-name"
CONTAINERD_IMAGE_NAME = "io.containerd.image.name"
CONTAINER_TYPE = "io.kubernetes.cri.container-type"
CAP_SETS = ("bounding", "effective", "permitted", "inheritable", "ambient")


def _obj(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


@dataclass(frozen=True)
class Namespace:
    type: str
    path: str | None = None  # joined by path (a CRI pod's), else a new one


@dataclass(frozen=True)
class Rlimit:
    type: str  # RLIMIT_NOFILE ...
    hard: int
    soft: int


@dataclass(frozen=True)
class Spec:
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def load(cls, bundle: Path) -> "Spec":
        return cls(json.loads((bundle / "config.json").read_text()))

    # -- sections ---------------------------------------------------------------
    @property
    def process(self) -> dict[str, Any]:
        return _obj(self.raw.get("process"))

    @property
    def linux(self) -> dict[str, Any]:
        return _obj(self.raw.get("linux"))

    @cached_property
    def annotations(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in _obj(self.raw.get("annotations")).items()}

    # -- process ------------------------------------------------------------------
    @cached_property
    def args(self) -> list[str]:
        return [str(a) for a in _list(self.process.get("args"))]

    @cached_property
    def env_list(self) -> list[str]:
        return [str(e) for e in _list(self.process.get("env"))]

    @cached_property
    def env(self) -> dict[str, str]:
        out = {}
        for e in self.env_list:
            k, _, v = e.partition("=")
            out[k] = v
        return out

    @property
    def cwd(self) -> str:
        return str(self.process.get("cwd") or "/")

    @property
    def hostname(self) -> str:
        return str(self.raw.get("hostname") or "")

    @property
    def uid(self) -> int:
        return int(_obj(self.process.get("user")).get("uid") or 0)

    @property
    def gid(self) -> int:
        return int(_obj(self.process.get("user")).get("gid") or 0)

    @cached_property
    def additional_gids(self) -> tuple[int, ...]:
        return tuple(sorted({int(g) for g in _list(_obj(self.process.get("user")).get("additionalGids"))}))

    @cached_property
    def capabilities(self) -> dict[str, frozenset[str]]:
        """Each of the five sets by name (runc: a set the spec omits is empty)."""
        caps = _obj(self.process.get("capabilities"))
        return {s: frozenset(str(c) for c in _list(caps.get(s))) for s in CAP_SETS}

    @property
    def no_new_privileges(self) -> bool:
        return bool(self.process.get("noNewPrivileges"))

    @cached_property
    def rlimits(self) -> tuple[Rlimit, ...]:
        out = []
        for r in _list(self.process.get("rlimits")):
            r = _obj(r)
            if r.get("type"):
                out.append(Rlimit(str(r["type"]), int(r.get("hard", 0)), int(r.get("soft", 0))))
        return tuple(out)

    @property
    def apparmor_profile(self) -> str:
        return str(self.process.get("apparmorProfile") or "")

    @property
    def selinux_label(self) -> str:
        return str(self.process.get("selinuxLabel") or "")

    # -- linux --------------------------------------------------------------------
    @cached_property
    def namespaces(self) -> tuple[Namespace, ...]:
        return tuple(Namespace(str(n.get("type")), str(n["path"]) if n.get("path") else None)
                     for n in map(_obj, _list(self.linux.get("namespaces"))) if n.get("type"))

    def namespace(self, kind: str) -> Namespace | None:
        return next((n for n in self.namespaces if n.type == kind), None)

    @property
    def shares_pid_ns(self) -> bool:
        """Joins an existing PID namespace (the pod's, shareProcessNamespace): CRIU cannot dump it alone."""
        ns = self.namespace("pid")
        return bool(ns and ns.path)

    @cached_property
    def id_mappings(self) -> dict[str, list[list[int]]]:
        """uid/gid mappings of a user namespace, normalized [[container, host, size], ...]."""
        out = {}
        for key in ("uidMappings", "gidMappings"):
            out[key] = sorted([int(m.get("containerID", 0)), int(m.get("hostID", 0)), int(m.get("size", 0))]
                              for m in map(_obj, _list(self.linux.get(key))))
        return out

    @cached_property
    def seccomp_sha256(self) -> str:
        """Hash of the seccomp profile runc installs ("" when the spec has none)."""
        sc = self.linux.get("seccomp")
        if not sc:
            return ""
        return hashlib.sha256(json.dumps(sc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    @property
    def cgroups_path(self) -> str:
        return str(self.linux.get("cgroupsPath") or "")

    @cached_property
    def device_paths(self) -> tuple[str, ...]:
        return tuple(str(d.get("path", "")) for d in map(_obj, _list(self.linux.get("devices"))))

    @cached_property
    def mounts(self) -> list[dict[str, Any]]:
        return [m for m in map(_obj, _list(self.raw.get("mounts")))]

    @property
    def has_gpu(self) -> bool:
        """NVIDIA devices or their mounts (device plugins and the toolkit use either)."""
        paths = list(self.device_paths) + [str(m.get("destination", "")) for m in self.mounts]
        return any(p.startswith("/dev/nvidia") for p in paths)

    # -- root, image, tenant ------------------------------------------------------
    @property
    def root_path(self) -> str:
        return str(_obj(self.raw.get("root")).get("path") or "rootfs")

    @property
    def root_readonly(self) -> bool:
        return bool(_obj(self.raw.get("root")).get("readonly"))

    @property
    def image_name(self) -> str:
        """The image reference CRI (or containerd) records; "" outside them (podman, ctr, runc)."""
        return self.annotations.get(CRI_IMAGE_NAME) or self.annotations.get(CONTAINERD_IMAGE_NAME) or ""

    @property
    def k8s_namespace(self) -> str | None:
        """The pod's Kubernetes namespace, as containerd's CRI sets it (a pod cannot forge it)."""
        return self.annotations.get(K8S_NAMESPACE) or None

    @property
    def is_sandbox(self) -> bool:
        return self.annotations.get(CONTAINER_TYPE) == "sandbox"
