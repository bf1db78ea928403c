"""Play containerd's runc-v2 shim against `warmstart-runtime`: same argv, stdio pipes, subreaper.

Used by the end-to-end tests; nothing here is faked — it runs the installed
runtime, real runc and real CRIU.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import prctl
import pytest

RUNTIME = os.environ.get("WARMSTART_RUNTIME", "/usr/local/bin/warmstart-runtime")
# The CRIU every test node's config names: a private build is tested without replacing the node's.
CRIU = Path(os.environ.get("WARMSTART_CRIU", "/usr/local/sbin/criu"))


def parallel_reads_marks(*tools: str) -> list[pytest.MarkDecorator]:
    """Marks of an e2e module that needs root, these tools on PATH and a CRIU with warmstart's parallel-reads patch."""
    from warmstart import criu  # noqa: PLC0415 - the tests' conftest puts the repo's package first

    return [pytest.mark.e2e, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CRIU)"),
            *(pytest.mark.skipif(not shutil.which(t), reason=f"needs {t} (install.sh)") for t in tools),
            pytest.mark.skipif(not criu.has_parallel_reads(CRIU),
                               reason=f"{CRIU} lacks warmstart's parallel-reads patch (install.sh)")]

# A Python workload with state in memory: a random value drawn at start, a counter,
# a large buffer.  It answers one JSON line on stdout per line read on stdin.
WORKLOAD = r'''
import hashlib, json, os, random, socket, sys
size = int(sys.argv[1]) if len(sys.argv) > 1 else 8 << 20
rnd = random.SystemRandom().getrandbits(64)
buf = bytearray(os.urandom(size))
digest = hashlib.sha256(buf).hexdigest()
counter = 0
with open("/data/written.txt", "w") as f:
    f.write(f"written-{rnd}\n")
try:
    os.unlink("/etc/todelete")
except FileNotFoundError:
    pass
print(json.dumps({"event": "ready", "random": rnd}), flush=True)
for line in sys.stdin:
    counter += 1
    cmd = line.strip()
    out = {"random": rnd, "counter": counter, "pid": os.getpid(), "hostname": socket.gethostname()}
    if cmd == "check":
        out["intact"] = hashlib.sha256(buf).hexdigest() == digest
    print(json.dumps(out), flush=True)
'''


def make_rootfs(base: Path) -> Path:
    """A tiny rootfs that borrows the host's /usr read-only (merged-usr: /bin etc. are symlinks)."""
    root = base / "rootfs-template"
    if root.exists():
        return root
    for d in ("proc", "sys", "dev", "tmp", "etc", "data", "usr", "run", "root"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        if Path("/" + link).is_symlink():
            (root / link).symlink_to(os.readlink("/" + link))
    (root / "etc" / "todelete").write_text("delete me\n")
    (root / "etc" / "hostname").write_text("template\n")
    (root / "workload.py").write_text(WORKLOAD)
    (root / "family.py").write_text(FAMILY)
    pin_mtimes(root)
    return root


IMAGE_MTIME = 1_700_000_000


def pin_mtimes(root: Path) -> None:
    """Give every file the same mtime, as an image layer's tar does: the same image on two nodes (or
    written twice by a test) then has the same fingerprint (runtime/warmstart/image_id.py)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            os.utime(Path(dirpath) / name, (IMAGE_MTIME, IMAGE_MTIME), follow_symlinks=False)


def spec(args: list[str], annotations: dict[str, str], hostname: str, cgroups_path: str) -> dict:
    caps = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_KILL", "CAP_SETGID", "CAP_SETUID",
            "CAP_NET_BIND_SERVICE"]
    return {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": args,
                    "env": ["PATH=/usr/local/bin:/usr/bin:/bin", "PYTHONUNBUFFERED=1", "HOSTNAME=" + hostname],
                    "cwd": "/", "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
                    "noNewPrivileges": True},
        "root": {"path": "rootfs", "readonly": False},
        "hostname": hostname,
        "annotations": annotations,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
        ],
        "linux": {
            "cgroupsPath": cgroups_path,
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"],
        },
    }


# A process family for restores that read a lot of pages: the root holds a large
# buffer and two threads, and forked two children (before the buffer) that hold
# their own.  `check` reports whether every buffer is intact and the threads tick.
FAMILY = r'''
import hashlib, json, os, sys, threading, time
size = int(sys.argv[1])
kids = []
for _ in range(2):
    cmd_r, cmd_w = os.pipe()
    out_r, out_w = os.pipe()
    if os.fork() == 0:
        os.close(cmd_w); os.close(out_r)
        mine = bytearray(os.urandom(16 << 20))
        want = hashlib.sha256(mine).hexdigest()
        with os.fdopen(cmd_r) as cmd, os.fdopen(out_w, "w") as out:
            for _line in cmd:
                out.write(json.dumps({"intact": hashlib.sha256(mine).hexdigest() == want}) + "\n")
                out.flush()
        os._exit(0)
    os.close(cmd_r); os.close(out_w)
    kids.append((os.fdopen(cmd_w, "w"), os.fdopen(out_r)))
buf = bytearray(os.urandom(size))
digest = hashlib.sha256(buf).hexdigest()
ticks = [0, 0]
def tick(i):
    while True:
        ticks[i] += 1
        time.sleep(0.01)
threads = [threading.Thread(target=tick, args=(i,), daemon=True) for i in range(2)]
for t in threads:
    t.start()
print(json.dumps({"event": "ready", "token": os.urandom(8).hex()}), flush=True)
for line in sys.stdin:
    kids_ok = []
    for w, r in kids:
        w.write("check\n"); w.flush()
        kids_ok.append(json.loads(r.readline())["intact"])
    seen = list(ticks)
    time.sleep(0.1)
    print(json.dumps({"intact": hashlib.sha256(buf).hexdigest() == digest, "kids": kids_ok,
                      "ticking": all(a != b for a, b in zip(seen, ticks))}), flush=True)
'''


@dataclass
class Container:
    """One container driven through the runtime as the shim would drive it."""
    id: str
    bundle: Path
    root: Path
    proc_stdin: int = -1
    proc_stdout: int = -1
    stderr_r: int = -1
    buf: bytes = b""
    create_rc: int | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def argv(self, *args: str) -> list[str]:
        """The runtime's argv for one call, with the global flags the shim gives every call."""
        return [RUNTIME, "--root", str(self.root), "--log", str(self.bundle / "log.json"), "--log-format", "json",
                *args]

    def runtime(self, *args: str, check: bool = True, timeout: float = 120,
                **kw) -> subprocess.CompletedProcess:
        p = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **self.extra_env}, **kw)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({p.returncode}): {p.stderr}\nlog: {self.log_text()}")
        return p

    def create(self) -> None:
        """`create --bundle B --pid-file B/init.pid ID` with pipes as stdio, like the shim."""
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        argv = [RUNTIME, "--root", str(self.root), "--log", str(self.bundle / "log.json"), "--log-format", "json",
                "create", "--bundle", str(self.bundle), "--pid-file", str(self.bundle / "init.pid"), self.id]
        p = subprocess.Popen(argv, stdin=in_r, stdout=out_w, stderr=err_w, env={**os.environ, **self.extra_env})
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        self.proc_stdin, self.proc_stdout, self.stderr_r = in_w, out_r, err_r
        self.create_rc = p.wait(timeout=300)
        if self.create_rc != 0:
            raise AssertionError(f"create failed ({self.create_rc}): log: {self.log_text()}")

    def start(self) -> None:
        self.runtime("start", self.id)

    def pid(self) -> int:
        return int((self.bundle / "init.pid").read_text())

    def state(self) -> dict | None:
        p = self.runtime("state", self.id, check=False)
        return json.loads(p.stdout) if p.returncode == 0 else None

    def readline(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc_stdout], [], [], left)[0]:
                raise AssertionError(f"no output from container within {timeout}s; log: {self.log_text()}")
            chunk = os.read(self.proc_stdout, 65536)
            if not chunk:
                raise AssertionError(f"container stdout closed; log: {self.log_text()}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def ask(self, cmd: str = "get") -> dict:
        os.write(self.proc_stdin, (cmd + "\n").encode())
        return self.readline()

    def stop(self) -> subprocess.CompletedProcess:
        """StopContainer: `kill ID 15`, then after a grace period `kill --all ID 9`."""
        p = self.runtime("kill", self.id, "15", check=False, timeout=600)
        for _ in range(100):
            st = self.state()
            if st is None or st.get("status") == "stopped":
                break
            time.sleep(0.1)
        else:
            self.runtime("kill", "--all", self.id, "9", check=False)
        reap()
        return p

    def delete(self) -> None:
        self.runtime("delete", self.id, check=False)
        self.runtime("delete", "--force", self.id, check=False)
        for fd in (self.proc_stdin, self.proc_stdout, self.stderr_r):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.proc_stdin = self.proc_stdout = self.stderr_r = -1

    def log_text(self) -> str:
        try:
            return (self.bundle / "log.json").read_text()[-4000:]
        except OSError:
            return ""

    def log_records(self) -> list[dict]:
        out = []
        for line in (self.bundle / "log.json").read_text().splitlines() if (self.bundle / "log.json").exists() else []:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out


def become_subreaper() -> None:
    """The shim is a child subreaper: container inits are re-parented to it when runc exits."""
    prctl.set_child_subreaper(True)


@pytest.fixture(scope="module", autouse=True)
def subreaper() -> None:
    """For a test module that plays the shim: `from shim import subreaper` makes it autouse there."""
    become_subreaper()


def reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


@dataclass
class Node:
    """A private warmstart node: config, store, state, logs and runc root under one temp dir."""
    base: Path
    overlay: bool = False
    containers: list[Container] = field(default_factory=list)
    mounts: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o700)
        self.store_root = self.base / "store"
        self.store = self.store_root / "_local"  # the scope of containers outside Kubernetes (trust.LOCAL_SCOPE)
        self.seals = self.base / "seals" / "_local"
        self.config = self.base / "config.toml"
        self.config.write_text(
            f'store = "{self.store_root}"\nseal_dir = "{self.base}/seals"\nstate_dir = "{self.base}/state"\n'
            f'log_dir = "{self.base}/logs"\ncriu = "{CRIU}"\n')
        self.root = self.base / "runc-root"
        self.template = make_rootfs(self.base)

    def env(self) -> dict[str, str]:
        return {"WARMSTART_CONFIG": str(self.config)}

    def container(self, name: str, annotations: dict[str, str], args: list[str] | None = None,
                  hostname: str | None = None) -> Container:
        bundle = self.base / "bundles" / name
        bundle.mkdir(parents=True)
        rootfs = bundle / "rootfs"
        if self.overlay:
            upper, work = bundle / "upper", bundle / "work"
            for d in (rootfs, upper, work):
                d.mkdir()
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            f"lowerdir={self.template},upperdir={upper},workdir={work}", str(rootfs)], check=True)
            self.mounts.append(rootfs)
        else:
            shutil.copytree(self.template, rootfs, symlinks=True)
        cfg = spec(args or ["python3", "/workload.py"], annotations, hostname or name, f"/warmstart-test/{name}")
        (bundle / "config.json").write_text(json.dumps(cfg))
        c = Container(name, bundle, self.root, extra_env=self.env())
        self.containers.append(c)
        return c

    def cleanup(self) -> None:
        for c in self.containers:
            c.runtime("kill", "--all", c.id, "9", check=False)
            c.delete()
        reap()
        for m in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)

    def runtime_log(self) -> list[dict]:
        p = self.base / "logs" / "runtime.log"
        return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def reseal(node: Node, cid: str) -> None:
    """After a test edited a checkpoint's files: make its manifest and seal match them, so that
    verification passes and what meets the damage is the check under test (or CRIU itself)."""
    from warmstart import config, store
    path = node.store / cid
    meta = json.loads((path / "metadata.json").read_text())
    for name in meta["manifest"]:
        meta["manifest"][name] = store.manifest_entry(path / name, (path / name).stat().st_size)
    (path / "metadata.json").write_text(json.dumps(meta))
    store.Store(config.load(node.config)).seal(cid, path, meta)  # the _local scope, as node.store


def wait_exit(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        reap()
        time.sleep(0.05)
    return False


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
