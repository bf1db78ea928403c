"""A private containerd 1.6 with the CRI plugin, for e2e tests and `warmstart demo`.

Why a private instance: the runtime handler must be driven the way a node
drives it (containerd -> runc-v2 shim -> BinaryName), but a test must not
touch, or depend on, the machine's own containerd. Everything this instance
makes lives under its workdir (root, state, sockets, runc roots, CNI config
and IPAM state, logs) or is named with its tag (bridge `wsbr<tag>`, CNI
network `warmstart-<tag>`, cgroup parent `/warmstart-<tag>`), so `stop()` can
find and remove exactly what it made.

What cannot be made private, and is cleaned up explicitly:
* shims outlive containerd: pods are stopped/removed through the CRI first,
  then leftovers are swept with `runc delete --force` and shims killed;
* containerd 1.6 creates `/run/containerd/s` and `/run/containerd/fifo`
  whatever its state path; libcni caches results in `/var/lib/cni/results`.
  Each is removed if we created it. (Pod netns files would go to
  `/run/netns`, shared with every other containerd; `netns_mounts_under_state_dir`
  keeps them in our state dir, where the unmount step finds them.)
* the bridge is created here, not by the CNI bridge plugin: with
  `isGateway` the plugin would also turn on `net.ipv4.ip_forward`, a
  host-wide setting that several concurrent instances cannot restore safely.
"""
from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from ...config import DEFAULT_PATH, INSTALLED_RUNTIME
from .client import CriClient, CriError
from .images import PAUSE_REF as PAUSE_IMAGE  # the sandbox image the harness builds

DEFAULT_WARMSTART_BINARY = INSTALLED_RUNTIME
DEFAULT_RUNC_BINARY = Path("/usr/sbin/runc")
CNI_BIN_DIR = Path("/usr/lib/cni")
K8S_NAMESPACE = "k8s.io"

MARKER = "instance.json"

Progress = Callable[[str], None]


def _noop(_msg: str) -> None:
    pass


@dataclass
class _HostState:
    """What the host looked like before start, so stop() undoes only our changes."""

    run_containerd_existed: bool = True
    run_containerd_children: set[str] = field(default_factory=set)
    var_lib_cni_existed: bool = True
    var_lib_cni_results_existed: bool = True


class ContainerdError(RuntimeError):
    pass


class Containerd:
    """A private containerd with the CRI plugin and two runtime handlers.

    Handlers: `runc` (default; plain runc) and `warmstart` (runc-v2 shim with
    BinaryName = `warmstart_binary`, `warmstart.dev/*` annotations passed into
    the OCI spec). `env` is added to containerd's environment, which the
    shims and runtimes inherit: that is how a test hands WARMSTART_CONFIG to
    the runtime handler.

    Use as a context manager. SIGTERM is turned into KeyboardInterrupt while
    the instance runs (in the main thread), so `with`/`finally` cleanup also
    runs when a test run is terminated; stop() blocks SIGINT/SIGTERM while it
    cleans so a second Ctrl-C cannot leave half a cleanup behind.
    """

    def __init__(self, workdir: Path | str | None = None, *,
                 warmstart_binary: Path | str = DEFAULT_WARMSTART_BINARY,
                 runc_binary: Path | str = DEFAULT_RUNC_BINARY,
                 env: Mapping[str, str] | None = None,
                 sandbox_image: str = PAUSE_IMAGE,
                 subnet: str | None = None,
                 log_level: str = "info",
                 keep_logs: bool | None = None,
                 progress: Progress | None = None) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="warmstart-ctrd-"))
        self.workdir = self.workdir.resolve()
        self._set_tag(secrets.token_hex(3))
        self.warmstart_binary = Path(warmstart_binary)
        self.runc_binary = Path(runc_binary)
        self.extra_env = dict(env or {})
        self.sandbox_image = sandbox_image
        self.log_level = log_level
        # A caller-given workdir keeps logs/ for post-mortems; our own temp dir goes entirely.
        self.keep_logs = (not self._own_workdir) if keep_logs is None else keep_logs
        self.progress = progress or _noop
        # Paths (all inside workdir).
        w = self.workdir
        self.root = w / "root"
        self.state = w / "state"
        self.opt = w / "opt"
        self.address = w / "run" / "containerd.sock"
        self.ttrpc_address = w / "run" / "containerd.sock.ttrpc"
        self.config_path = w / "config.toml"
        self.runc_root = w / "runc-root"            # runc --root for the `runc` handler
        self.warmstart_root = w / "warmstart-root"  # runc --root for the `warmstart` handler
        self.cni_conf_dir = w / "cni" / "net.d"
        self.cni_ipam_dir = w / "cni" / "ipam"
        self.log_dir = w / "logs"
        self.pod_log_root = self.log_dir / "pods"
        self.log_path = self.log_dir / "containerd.log"
        self.subnet = subnet or _free_subnet()
        self.gateway = self.subnet.rsplit(".", 1)[0] + ".1"
        self.proc: subprocess.Popen[bytes] | None = None
        self._host = _HostState()
        self._old_handlers: dict[int, object] = {}
        self._stopped = True
        self._log_file = None

    def _set_tag(self, tag: str) -> None:
        """Host-visible names derive from the tag, so cleanup can find exactly ours."""
        self.tag = tag
        self.bridge = f"wsbr{tag}"  # <= 15 chars (IFNAMSIZ)
        self.network_name = f"warmstart-{tag}"
        self.cgroup_parent = f"/warmstart-{tag}"

    # -- lifecycle ------------------------------------------------------------

    def __enter__(self) -> "Containerd":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> "Containerd":
        """Write the config, start containerd, wait until CRI reports runtime and network ready."""
        if self.proc is not None:
            return self
        self._stopped = False
        self._install_signal_handlers()
        try:
            self._record_host_state()
            for d in (self.root, self.state, self.opt, self.address.parent, self.runc_root,
                      self.warmstart_root, self.cni_conf_dir, self.cni_ipam_dir, self.pod_log_root):
                d.mkdir(parents=True, exist_ok=True)
            os.chmod(self.workdir, 0o711)
            self.config_path.write_text(self.render_config())
            (self.cni_conf_dir / "10-warmstart.conflist").write_text(json.dumps(self.cni_config(), indent=2))
            self._write_marker()  # before the first host change, so reap() can find it
            self._create_bridge()
            # A clean PATH for containerd, its shims and runtimes: kubelet nodes run
            # containerd from systemd, not from a developer's shell (pyenv shims, venvs).
            env = {"PATH": DEFAULT_PATH, "HOME": "/root", **self.extra_env}
            self._log_file = open(self.log_path, "ab")
            t0 = time.monotonic()
            self.proc = subprocess.Popen(
                ["containerd", "--config", str(self.config_path), "--log-level", self.log_level],
                stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,  # a terminal Ctrl-C must reach us, not containerd
            )
            self._write_marker()
            deadline = time.monotonic() + timeout
            while not self.address.exists():
                if self.proc.poll() is not None:
                    raise ContainerdError(f"containerd exited with {self.proc.returncode}:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise ContainerdError(f"containerd socket not up after {timeout}s:\n{self.log_tail()}")
                time.sleep(0.02)
            with self.client() as c:
                try:
                    c.wait_ready(timeout=max(1.0, deadline - time.monotonic()))
                except CriError as e:
                    raise ContainerdError(f"{e}\n{self.log_tail()}") from None
            self.progress(f"containerd up in {time.monotonic() - t0:.2f}s at {self.address} "
                          f"(bridge {self.bridge}, subnet {self.subnet})")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> list[str]:
        """Remove every pod, stop containerd, and remove all traces; returns the problems met.

        Idempotent and best-effort: each step runs even if an earlier one
        failed, because a half-cleaned node (a mount, a shim, a veth) breaks
        the next run in ways that are hard to trace back.
        """
        if self._stopped:
            return []
        problems: list[str] = []
        blocked = _block_signals()
        try:
            def step(name: str, fn: Callable[[], None]) -> None:
                try:
                    fn()
                except Exception as e:  # noqa: BLE001 - keep cleaning, report at the end
                    problems.append(f"{name}: {e}")

            step("remove pods via CRI", self._remove_pods)
            step("stop containerd", self._stop_containerd)
            step("sweep runc containers", self._sweep_runc)
            step("kill shims", self._kill_shims)
            step("kill cgroup leftovers", self._kill_cgroup_procs)
            step("unmount", self._unmount_all)
            step("network", self._cleanup_network)
            step("cgroups", self._remove_cgroups)
            step("host dirs", self._cleanup_host_dirs)
            step("workdir", self._cleanup_workdir)
            if self._log_file:
                self._log_file.close()
                self._log_file = None
            if not problems:
                _mark_stopped(self.workdir / MARKER)
            self._stopped = True
            self.proc = None
        finally:
            _unblock_signals(blocked)
            self._restore_signal_handlers()
        for p in problems:
            self.progress(f"cleanup problem: {p}")
        return problems

    # -- helpers for users ----------------------------------------------------

    def client(self, timeout: float = 120.0) -> CriClient:
        """A CRI client preset with this instance's cgroup parent and pod log root."""
        return CriClient(self.address, timeout=timeout, cgroup_parent=self.cgroup_parent,
                         log_root=self.pod_log_root)

    def ctr(self, *args: str, check: bool = True, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
        """Run `ctr` against this instance in the CRI namespace (k8s.io)."""
        return subprocess.run(["ctr", "-a", str(self.address), "-n", K8S_NAMESPACE, *args],
                              check=check, capture_output=True, text=True, timeout=timeout)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def leftovers(self) -> dict[str, object]:
        """What this instance still has on the host; empty after a clean stop().

        Tests assert on it, and `warmstart demo` can print it: a leaked mount
        or veth otherwise surfaces much later as an unrelated failure.
        """
        found: dict[str, object] = {}
        if self.running:
            found["containerd"] = self.proc.pid if self.proc else True
        if self.mounts():
            found["mounts"] = [str(m) for m in self.mounts()]
        if self.shim_pids():
            found["shims"] = self.shim_pids()
        if self.bridge_exists():
            found["bridge"] = self.bridge
        net = Path("/sys/class/net")
        veths = [n.name for n in net.iterdir()
                 if (n / "master").exists() and os.path.basename(os.readlink(n / "master")) == self.bridge]
        if veths:
            found["veths"] = veths
        if self.cgroup_dirs():
            found["cgroups"] = [str(d) for d in self.cgroup_dirs()]
        dirs = [str(p) for p in (self.root, self.state, self.opt, self.address.parent, self.runc_root,
                                 self.warmstart_root) if p.exists()]
        if dirs:
            found["dirs"] = dirs
        return found

    # -- config ---------------------------------------------------------------

    def render_config(self) -> str:
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        rt = f"{cri}.containerd.runtimes"
        ann = '["warmstart.dev/*"]'
        return f"""\
# Generated by warmstart.testing.cri.containerd for a private test instance.
version = 2
root = "{self.root}"
state = "{self.state}"
oom_score = 0
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
]

[grpc]
  address = "{self.address}"

[ttrpc]
  address = "{self.ttrpc_address}"

[debug]
  address = ""
  level = "{self.log_level}"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{self.opt}"

[{cri}]
  sandbox_image = "{self.sandbox_image}"
  # This VM lacks CAP_SYS_RESOURCE: the sandbox's oomScoreAdj -998 fails otherwise.
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  # Port 0: several private instances must not fight over 10010.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_tls_streaming = false
  # Pod netns files under our state dir, not the host's /run/netns.
  netns_mounts_under_state_dir = true

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{rt}.runc]
  runtime_type = "io.containerd.runc.v2"
[{rt}.runc.options]
  BinaryName = "{self.runc_binary}"
  Root = "{self.runc_root}"

[{rt}.warmstart]
  runtime_type = "io.containerd.runc.v2"
  pod_annotations = {ann}
  container_annotations = {ann}
[{rt}.warmstart.options]
  BinaryName = "{self.warmstart_binary}"
  Root = "{self.warmstart_root}"

[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{self.cni_conf_dir}"
  max_conf_num = 1
"""

    def cni_config(self) -> dict:
        # The bridge (made by _create_bridge) holds the gateway address, so the
        # host routes to pod IPs directly (tests reach the worker over HTTP).
        # No isGateway (it sets ip_forward), no ipMasq (iptables rules).
        return {
            "cniVersion": "0.4.0",
            "name": self.network_name,
            "plugins": [{
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": False,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": self.subnet, "gateway": self.gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(self.cni_ipam_dir),
                },
            }],
        }

    # -- start internals ------------------------------------------------------

    def _record_host_state(self) -> None:
        h = self._host
        rc = Path("/run/containerd")
        h.run_containerd_existed = rc.exists()
        h.run_containerd_children = {p.name for p in rc.iterdir()} if rc.exists() else set()
        h.var_lib_cni_existed = Path("/var/lib/cni").exists()
        h.var_lib_cni_results_existed = Path("/var/lib/cni/results").exists()

    def _create_bridge(self) -> None:
        """Our bridge with the gateway address; the CNI bridge plugin attaches veths to it."""
        prefix = self.subnet.split("/")[1]
        for argv in (["ip", "link", "add", "name", self.bridge, "type", "bridge"],
                     ["ip", "addr", "add", f"{self.gateway}/{prefix}", "dev", self.bridge],
                     ["ip", "link", "set", self.bridge, "up"]):
            res = subprocess.run(argv, capture_output=True, text=True)
            if res.returncode != 0:
                raise ContainerdError(f"{' '.join(argv)}: {res.stderr.strip()}")

    def _write_marker(self) -> None:
        """Record names, pid and the host's prior state in the workdir, for `reap()` after a SIGKILL."""
        h = self._host
        marker = {"pid": self.proc.pid if self.proc else None, "owner": _proc_identity(os.getpid()),
                  "tag": self.tag, "subnet": self.subnet,
                  "runc_binary": str(self.runc_binary), "warmstart_binary": str(self.warmstart_binary),
                  "own_workdir": self._own_workdir, "keep_logs": self.keep_logs,
                  "host": {**asdict(h), "run_containerd_children": sorted(h.run_containerd_children)}}
        (self.workdir / MARKER).write_text(json.dumps(marker, indent=2) + "\n")

    @classmethod
    def reap_stale(cls, *patterns: str, progress: Progress | None = None) -> list[Path]:
        """Reap every instance under the glob patterns whose owner is dead; returns their workdirs.

        Default pattern: instances with a temp workdir. Tests add pytest's
        basetemp (`/tmp/pytest-of-root/pytest-*/*`) so a killed run is cleaned
        by the next one.
        """
        pats = patterns or (str(Path(tempfile.gettempdir()) / "warmstart-ctrd-*"),)
        reaped: list[Path] = []
        markers = {m.resolve() for pat in pats for m in Path("/").glob(pat.lstrip("/") + "/" + MARKER)}
        for marker in sorted(markers):
            try:
                m = json.loads(_read(marker) or "{}")
            except ValueError:
                continue
            owner = m.get("owner")
            # No owner recorded: not ours to judge (an older marker format).
            if m.get("stopped") or not owner or _proc_identity(owner[0]) == owner:
                continue
            if progress:
                progress(f"reaping stale containerd instance in {marker.parent}")
            try:
                problems = cls.reap(marker.parent, progress=progress)
            except Exception as e:  # noqa: BLE001 - one bad marker must not block the others
                problems = [str(e)]
            if progress and problems:
                progress(f"reaping {marker.parent}: {problems}")
            reaped.append(marker.parent)
        return reaped

    @classmethod
    def reap(cls, workdir: Path | str, progress: Progress | None = None, force: bool = False) -> list[str]:
        """Clean up after an instance whose owner died without stop() (SIGKILL, OOM, power cut).

        containerd runs in its own session, so it (and the shims, pods,
        mounts, bridge) survive the owner; the marker file says what is ours.
        Returns stop()'s problems. Left alone: a workdir without a marker, one
        already cleaned, and (unless `force`) one whose owner process lives.
        """
        workdir = Path(workdir).resolve()
        try:
            m = json.loads((workdir / MARKER).read_text())
        except (OSError, ValueError):
            return []
        if m.get("stopped") or "tag" not in m or "subnet" not in m:
            return []
        owner = m.get("owner")
        if not force and (not owner or _proc_identity(owner[0]) == owner):
            return []
        self = cls(workdir, runc_binary=m.get("runc_binary", str(DEFAULT_RUNC_BINARY)),
                   warmstart_binary=m.get("warmstart_binary", str(DEFAULT_WARMSTART_BINARY)),
                   subnet=m["subnet"], keep_logs=m.get("keep_logs", True), progress=progress)
        self._own_workdir = bool(m.get("own_workdir"))
        self._set_tag(m["tag"])
        h = m.get("host", {})
        self._host = _HostState(run_containerd_existed=h.get("run_containerd_existed", True),
                                run_containerd_children=set(h.get("run_containerd_children", [])),
                                var_lib_cni_existed=h.get("var_lib_cni_existed", True),
                                var_lib_cni_results_existed=h.get("var_lib_cni_results_existed", True))
        pid = m.get("pid")
        if pid and _cmdline(pid)[:1] == [b"containerd"] and str(self.config_path).encode() in _cmdline(pid):
            self.proc = _Adopted(pid)  # type: ignore[assignment]
        self._stopped = False
        return self.stop()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def _term(signum: int, _frame: object) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                self._old_handlers[sig] = signal.signal(sig, _term)

    def _restore_signal_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._old_handlers.clear()

    # -- stop internals -------------------------------------------------------

    def _remove_pods(self) -> None:
        if not self.running:
            return
        with self.client(timeout=60.0) as c:
            for p in c.list_pods():
                try:
                    c.stop_pod(p.id)
                except CriError as e:
                    self.progress(f"stop pod {p.id[:12]}: {e}")
                c.remove_pod(p.id)

    def _stop_containerd(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def _runc_roots(self) -> list[tuple[Path, Path]]:
        """(binary, --root) pairs: the shim passes `--root <Root>/<namespace>`."""
        out = []
        for binary, root in ((self.runc_binary, self.runc_root), (self.warmstart_binary, self.warmstart_root)):
            if root.is_dir():
                for ns in root.iterdir():
                    if ns.is_dir():
                        out.append((binary, ns))
        return out

    def _sweep_runc(self) -> None:
        # Plain runc sweeps the warmstart root too: its state.json is runc's, and
        # a broken runtime handler must not stop its own cleanup.
        exe = str(self.runc_binary)
        for _binary, root in self._runc_roots():
            res = subprocess.run([exe, "--root", str(root), "list", "-q"], capture_output=True,
                                 text=True, timeout=30)
            for cid in res.stdout.split():
                subprocess.run([exe, "--root", str(root), "delete", "--force", cid],
                               capture_output=True, timeout=30)
                self.progress(f"swept leftover container {cid[:12]}")

    def shim_pids(self) -> list[int]:
        """Shims started for this instance (their argv names our socket)."""
        pids = []
        needle = str(self.address).encode()
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and b"containerd-shim" in argv[0] and needle in argv:
                pids.append(int(d.name))
        return pids

    def _kill_shims(self) -> None:
        deadline = time.monotonic() + 5
        while self.shim_pids() and time.monotonic() < deadline:
            time.sleep(0.1)  # shims exit by themselves once their tasks are gone
        for pid in self.shim_pids():
            try:
                os.kill(pid, signal.SIGKILL)
                self.progress(f"killed leftover shim {pid}")
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while self.shim_pids() and time.monotonic() < deadline:
            time.sleep(0.05)

    def cgroup_dirs(self) -> list[Path]:
        """Our cgroup parent in every mounted hierarchy (v1 controllers, name=systemd, unified)."""
        base = Path("/sys/fs/cgroup")
        rel = self.cgroup_parent.lstrip("/")
        dirs = [base / rel] if (base / "cgroup.procs").exists() else []
        if base.is_dir():
            dirs += [h / rel for h in base.iterdir() if h.is_dir() and not h.is_symlink()]
        return [d for d in dirs if d.is_dir()]

    def _kill_cgroup_procs(self) -> None:
        for d in self.cgroup_dirs():
            for procs in d.rglob("cgroup.procs"):
                for pid in _read(procs).split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                        self.progress(f"killed leftover process {pid} in {procs.parent}")
                    except (ProcessLookupError, ValueError):
                        pass

    def _remove_cgroups(self) -> None:
        for d in self.cgroup_dirs():
            subs = sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
            for p in [*subs, d]:
                for _ in range(50):  # a killed task leaves its cgroup a moment later
                    try:
                        p.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.02)
                else:
                    raise ContainerdError(f"cannot remove cgroup {p}")

    def mounts(self) -> list[Path]:
        """Mount points under our workdir (snapshots, rootfs, shm, ...), innermost last."""
        return [m for m in _mountpoints() if _is_under(m, self.workdir)]

    def _unmount_all(self) -> None:
        for _ in range(3):
            ms = self.mounts()
            if not ms:
                return
            for m in reversed(ms):
                _umount(m)
        left = self.mounts()
        if left:
            raise ContainerdError(f"still mounted: {', '.join(map(str, left))}")

    def veths(self) -> list[str]:
        res = subprocess.run(["ip", "-o", "link", "show", "master", self.bridge],
                             capture_output=True, text=True)
        return [line.split(":")[1].strip().split("@")[0] for line in res.stdout.splitlines() if ":" in line]

    def bridge_exists(self) -> bool:
        return Path(f"/sys/class/net/{self.bridge}").exists()

    def _cleanup_network(self) -> None:
        if self.bridge_exists():
            for v in self.veths():
                subprocess.run(["ip", "link", "del", v], capture_output=True)
            subprocess.run(["ip", "link", "del", self.bridge], check=True, capture_output=True)
        results = Path("/var/lib/cni/results")
        if results.is_dir():
            for f in results.glob(f"{self.network_name}-*"):
                f.unlink(missing_ok=True)
        for d, existed in ((results, self._host.var_lib_cni_results_existed),
                           (Path("/var/lib/cni"), self._host.var_lib_cni_existed)):
            if not existed:
                _rmdir_tree_if_empty(d)

    def _cleanup_host_dirs(self) -> None:
        rc = Path("/run/containerd")
        if not rc.is_dir():
            return
        for name in ("s", "fifo", "runc"):
            if name not in self._host.run_containerd_children:
                _rmdir_tree_if_empty(rc / name)
        if not self._host.run_containerd_existed:
            _rmdir_tree_if_empty(rc)

    def _cleanup_workdir(self) -> None:
        if self.mounts():
            raise ContainerdError("not removing workdir: mounts remain")
        if self._own_workdir and not self.keep_logs:
            shutil.rmtree(self.workdir, ignore_errors=False)
            return
        for p in (self.root, self.state, self.opt, self.address.parent, self.runc_root,
                  self.warmstart_root, self.cni_conf_dir.parent):
            shutil.rmtree(p, ignore_errors=True)
        if self._own_workdir and self.keep_logs:
            self.progress(f"containerd logs kept in {self.log_dir}")


# -- module helpers -----------------------------------------------------------

class _Adopted:
    """The Popen subset stop() uses, for a containerd we did not start (reap)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not Path(f"/proc/{self.pid}").exists():
            self.returncode = 0
        return self.returncode

    def terminate(self) -> None:
        _kill(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        _kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(["containerd"], timeout or 0)
            time.sleep(0.05)
        return self.returncode or 0


def _proc_identity(pid: int) -> list[int]:
    """[pid, start time in ticks]: tells a live owner from a reused pid."""
    stat = _read(f"/proc/{pid}/stat")
    try:
        return [pid, int(stat.rsplit(")", 1)[1].split()[19])]
    except (IndexError, ValueError):
        return [pid, -1]


def _mark_stopped(marker: Path) -> None:
    try:
        m = json.loads(marker.read_text())
    except (OSError, ValueError):
        return
    m["stopped"] = True
    marker.write_text(json.dumps(m, indent=2) + "\n")


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _unescape_mount(s: str) -> str:
    return s.encode().decode("unicode_escape") if "\\" in s else s


def _mountpoints() -> list[Path]:
    out = []
    for line in _read("/proc/self/mountinfo").splitlines():
        parts = line.split(" ")
        if len(parts) > 4:
            out.append(Path(_unescape_mount(parts[4])))
    return out


def _is_under(p: Path, base: Path) -> bool:
    return p == base or base in p.parents


_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2


def _umount(p: Path) -> None:
    if _libc.umount2(str(p).encode(), 0) != 0:
        if _libc.umount2(str(p).encode(), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err not in (22, 2):  # EINVAL (not a mount any more), ENOENT
                raise OSError(err, f"umount {p}: {os.strerror(err)}")


def _rmdir_tree_if_empty(d: Path) -> None:
    """Remove d if it holds only empty directories (never a file someone else owns)."""
    if not d.is_dir():
        return
    for sub in sorted((p for p in d.rglob("*")), key=lambda p: len(p.parts), reverse=True):
        if sub.is_dir() and not sub.is_symlink():
            try:
                sub.rmdir()
            except OSError:
                pass
    try:
        d.rmdir()
    except OSError:
        pass


def _free_subnet() -> str:
    """A 10.88.X.0/24 no route on this host uses (several instances may coexist)."""
    res = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True)
    used = res.stdout
    start = secrets.randbelow(200) + 20
    for i in range(230):
        x = (start + i) % 250 + 2
        if f"10.88.{x}." not in used:
            return f"10.88.{x}.0/24"
    raise ContainerdError("no free 10.88.X.0/24 subnet on this host")


def _block_signals() -> set[int]:
    if threading.current_thread() is not threading.main_thread():
        return set()
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    return sigs


def _unblock_signals(sigs: set[int]) -> None:
    if sigs:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)
