"""A small typed CRI client: this is how tests and `warmstart demo` play kubelet.

There is no crictl or kubelet on these machines (no Debian package, no Go
toolchain), so we call containerd's CRI gRPC service directly with the stubs
from PyPI's `container-runtime-interface-api`. The defaults copy what kubelet
sends, because the runtime handler must be exercised the way a real node
exercises it: one pod sandbox per pod, pid namespace per container
(kubelet's default, and the only mode in which a restored process can move to
a new pod), a pod log directory, a cgroup parent.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import grpc
from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as pbg

NS_POD = pb.POD
NS_CONTAINER = pb.CONTAINER
NS_NODE = pb.NODE


class CriError(RuntimeError):
    """A CRI call failed; the message names the call and the gRPC status."""


@dataclass(frozen=True)
class MountSpec:
    """A host path bind-mounted into a container (CRI `Mount`)."""

    host_path: Path
    container_path: str
    readonly: bool = False


@dataclass(frozen=True)
class PodSpec:
    """What RunPodSandbox got, kept because CreateContainer needs it again (as kubelet does)."""

    id: str
    name: str
    namespace: str
    uid: str
    runtime_handler: str
    config: pb.PodSandboxConfig


@dataclass(frozen=True)
class ContainerInfo:
    """The parts of ContainerStatus that tests assert on."""

    id: str
    name: str
    state: str  # CONTAINER_CREATED / _RUNNING / _EXITED / _UNKNOWN
    exit_code: int
    reason: str
    message: str
    pod_id: str = ""
    started_at: int = 0
    finished_at: int = 0
    log_path: str = ""
    annotations: Mapping[str, str] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)  # verbose info (pid, runtimeSpec, ...)

    @property
    def running(self) -> bool:
        return self.state == "CONTAINER_RUNNING"

    @property
    def exited(self) -> bool:
        return self.state == "CONTAINER_EXITED"


@dataclass(frozen=True)
class PodInfo:
    id: str
    name: str
    namespace: str
    state: str  # SANDBOX_READY / SANDBOX_NOTREADY
    ip: str
    runtime_handler: str
    annotations: Mapping[str, str] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)


class CriClient:
    """One gRPC channel to containerd's CRI runtime and image services.

    `timeout` bounds every call: a hung runtime handler must fail a test, not
    hang it (kubelet's own runtimeRequestTimeout is 2 minutes; StartContainer
    of a restored container runs inside that budget).
    """

    def __init__(self, address: Path | str, *, timeout: float = 120.0,
                 cgroup_parent: str = "", log_root: Path | None = None) -> None:
        self.address = str(address)
        self.timeout = timeout
        self.cgroup_parent = cgroup_parent
        self.log_root = log_root
        self._channel = grpc.insecure_channel(f"unix://{self.address}")
        self.runtime = pbg.RuntimeServiceStub(self._channel)
        self.images = pbg.ImageServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "CriClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, stub: Any, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            code = e.code().name if hasattr(e, "code") else "?"
            detail = e.details() if hasattr(e, "details") else str(e)
            raise CriError(f"CRI {method} failed: {code}: {detail}") from None

    # -- runtime info ---------------------------------------------------------

    def version(self, timeout: float | None = None) -> pb.VersionResponse:
        return self._call(self.runtime, "Version", pb.VersionRequest(), timeout)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until the CRI plugin answers and reports RuntimeReady and NetworkReady."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                st = self._call(self.runtime, "Status", pb.StatusRequest(), 2.0)
                conds = {c.type: c for c in st.status.conditions}
                if all(conds.get(t) and conds[t].status for t in ("RuntimeReady", "NetworkReady")):
                    return
                last = "; ".join(f"{c.type}={c.status} {c.reason} {c.message}" for c in conds.values())
            except CriError as e:
                last = str(e)
            time.sleep(0.1)
        raise CriError(f"CRI not ready after {timeout:.0f}s: {last}")

    # -- pods -----------------------------------------------------------------

    def run_pod_sandbox(self, name: str, *, namespace: str = "default", uid: str | None = None,
                        runtime_handler: str = "", annotations: Mapping[str, str] | None = None,
                        labels: Mapping[str, str] | None = None, hostname: str | None = None,
                        pid_mode: int = NS_CONTAINER, log_directory: Path | None = None,
                        attempt: int = 0) -> PodSpec:
        """Start a pod sandbox the way kubelet does and return what CreateContainer needs.

        The hostname defaults to the pod name (kubelet's behaviour), which lets a
        test see whether a restored process took the new pod's UTS namespace.
        """
        uid = uid or str(uuid.uuid4())
        if log_directory is None and self.log_root is not None:
            log_directory = self.log_root / f"{namespace}_{name}_{uid}"
        if log_directory is not None:
            Path(log_directory).mkdir(parents=True, exist_ok=True)
        ns_opts = pb.NamespaceOption(network=NS_POD, pid=pid_mode, ipc=NS_POD)
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=attempt),
            hostname=hostname if hostname is not None else name,
            log_directory=str(log_directory or ""),
            labels={"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": namespace,
                    "io.kubernetes.pod.uid": uid, **(labels or {})},
            annotations=dict(annotations or {}),
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=self.cgroup_parent,
                security_context=pb.LinuxSandboxSecurityContext(namespace_options=ns_opts),
            ),
        )
        resp = self._call(self.runtime, "RunPodSandbox",
                          pb.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler))
        return PodSpec(resp.pod_sandbox_id, name, namespace, uid, runtime_handler, config)

    def stop_pod(self, pod_id: str) -> None:
        self._call(self.runtime, "StopPodSandbox", pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))

    def remove_pod(self, pod_id: str) -> None:
        self._call(self.runtime, "RemovePodSandbox", pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    def pod_status(self, pod_id: str, verbose: bool = False) -> PodInfo:
        resp = self._call(self.runtime, "PodSandboxStatus",
                          pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose))
        s = resp.status
        info = {k: _maybe_json(v) for k, v in resp.info.items()}
        return PodInfo(s.id, s.metadata.name, s.metadata.namespace, pb.PodSandboxState.Name(s.state),
                       s.network.ip, s.runtime_handler, dict(s.annotations), info)

    def pod_ip(self, pod_id: str) -> str:
        ip = self.pod_status(pod_id).ip
        if not ip:
            raise CriError(f"pod {pod_id} has no IP (host network or CNI failure)")
        return ip

    def list_pods(self) -> list[PodInfo]:
        resp = self._call(self.runtime, "ListPodSandbox", pb.ListPodSandboxRequest())
        return [PodInfo(p.id, p.metadata.name, p.metadata.namespace, pb.PodSandboxState.Name(p.state),
                        "", p.runtime_handler, dict(p.annotations)) for p in resp.items]

    # -- containers -----------------------------------------------------------

    def create_container(self, pod: PodSpec, name: str, image: str, *,
                         command: Sequence[str] = (), args: Sequence[str] = (),
                         env: Mapping[str, str] | None = None,
                         annotations: Mapping[str, str] | None = None,
                         labels: Mapping[str, str] | None = None,
                         mounts: Iterable[MountSpec] = (), working_dir: str = "",
                         log_path: str | None = None, attempt: int = 0) -> str:
        """Create (not start) a container; returns its id.

        containerd never calls the runtime here: `runc create` (and so a
        warmstart restore) happens inside StartContainer. `log_path` is
        relative to the pod's log directory, as with kubelet (`name/0.log`).
        """
        ns = pod.config.linux.security_context.namespace_options
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name, attempt=attempt),
            image=pb.ImageSpec(image=image),
            command=list(command), args=list(args), working_dir=working_dir,
            envs=[pb.KeyValue(key=k, value=v) for k, v in (env or {}).items()],
            mounts=[pb.Mount(container_path=m.container_path, host_path=str(m.host_path),
                             readonly=m.readonly) for m in mounts],
            labels={"io.kubernetes.container.name": name, **(labels or {})},
            annotations=dict(annotations or {}),
            log_path=log_path if log_path is not None else f"{name}/{attempt}.log",
            linux=pb.LinuxContainerConfig(
                security_context=pb.LinuxContainerSecurityContext(
                    namespace_options=pb.NamespaceOption(network=ns.network, pid=ns.pid, ipc=ns.ipc)),
            ),
        )
        resp = self._call(self.runtime, "CreateContainer", pb.CreateContainerRequest(
            pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config))
        return resp.container_id

    def start_container(self, container_id: str) -> None:
        self._call(self.runtime, "StartContainer", pb.StartContainerRequest(container_id=container_id))

    def stop_container(self, container_id: str, timeout: int = 10) -> None:
        """SIGTERM (via the runtime's `kill ID 15`), then `kill --all ID 9` after `timeout` s."""
        self._call(self.runtime, "StopContainer",
                   pb.StopContainerRequest(container_id=container_id, timeout=timeout),
                   timeout=self.timeout + timeout)

    def remove_container(self, container_id: str) -> None:
        self._call(self.runtime, "RemoveContainer", pb.RemoveContainerRequest(container_id=container_id))

    def container_status(self, container_id: str, verbose: bool = False) -> ContainerInfo:
        resp = self._call(self.runtime, "ContainerStatus",
                          pb.ContainerStatusRequest(container_id=container_id, verbose=verbose))
        s = resp.status
        info = {k: _maybe_json(v) for k, v in resp.info.items()}
        return ContainerInfo(s.id, s.metadata.name, pb.ContainerState.Name(s.state), s.exit_code,
                             s.reason, s.message, "", s.started_at, s.finished_at, s.log_path,
                             dict(s.annotations), info)

    def list_containers(self, pod_id: str = "") -> list[ContainerInfo]:
        flt = pb.ContainerFilter(pod_sandbox_id=pod_id) if pod_id else None
        resp = self._call(self.runtime, "ListContainers", pb.ListContainersRequest(filter=flt))
        return [ContainerInfo(c.id, c.metadata.name, pb.ContainerState.Name(c.state), 0, "", "",
                              c.pod_sandbox_id, annotations=dict(c.annotations)) for c in resp.containers]

    def wait_container(self, container_id: str, state: str = "CONTAINER_EXITED",
                       timeout: float = 30.0) -> ContainerInfo:
        deadline = time.monotonic() + timeout
        while True:
            st = self.container_status(container_id)
            if st.state == state or time.monotonic() > deadline:
                return st
            time.sleep(0.1)

    def run_container(self, pod: PodSpec, name: str, image: str, **kw: Any) -> str:
        """Create and start; returns the id (the common path in tests)."""
        cid = self.create_container(pod, name, image, **kw)
        self.start_container(cid)
        return cid

    def remove_all(self) -> None:
        """Stop and remove every pod (and so every container): teardown, idempotent."""
        for p in self.list_pods():
            try:
                self.stop_pod(p.id)
            except CriError:
                pass
            self.remove_pod(p.id)

    # -- images ---------------------------------------------------------------

    def image_present(self, ref: str) -> bool:
        resp = self._call(self.images, "ImageStatus", pb.ImageStatusRequest(image=pb.ImageSpec(image=ref)))
        return resp.HasField("image") and bool(resp.image.id)


def http_get(ip: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    """GET http://ip:port/path from the host (which routes to the pod bridge); (status, JSON or text)."""
    url = f"http://{ip}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    text = body.decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def wait_http(ip: str, port: int, path: str = "/ready", timeout: float = 60.0,
              interval: float = 0.05) -> tuple[float, Any]:
    """Poll until `path` answers 200; returns (seconds waited, body).

    Connection refused and 503 both mean "not yet": the worker binds its port
    before it is ready, a restored one answers at once.
    """
    t0 = time.monotonic()
    last: object = None
    while time.monotonic() - t0 < timeout:
        try:
            status, body = http_get(ip, port, path, timeout=min(5.0, timeout))
            if status == 200:
                return time.monotonic() - t0, body
            last = (status, body)
        except OSError as e:
            last = e
        time.sleep(interval)
    raise TimeoutError(f"http://{ip}:{port}{path} not ready after {timeout:.0f}s (last: {last!r})")


def _maybe_json(v: str) -> Any:
    try:
        return json.loads(v)
    except ValueError:
        return v
