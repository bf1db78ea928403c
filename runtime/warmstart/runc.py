"""runc, both ways: the argv shapes the shim sends us, and `Runc`, the only builder of the runc calls we make."""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, NoReturn

from . import procfs
from .budget import CreateBudget, Limit
from .launch import VALUE_FLAGS


@dataclass
class GlobalOpts:
    """runc's global flags as the shim gave them; replayed on every runc call we make."""
    argv: list[str] = field(default_factory=list)
    root: str | None = None
    log: str | None = None
    log_format: str | None = None
    criu: str | None = None
    systemd_cgroup: bool = False

    @classmethod
    def parse(cls, argv: list[str]) -> "GlobalOpts":
        g = cls(argv=list(argv))
        i = 0
        while i < len(argv):
            name, eq, val = argv[i].lstrip("-").partition("=")
            if name in VALUE_FLAGS and not eq:
                val = argv[i + 1] if i + 1 < len(argv) else ""
                i += 1
            if name == "root":
                g.root = val
            elif name == "log":
                g.log = val
            elif name == "log-format":
                g.log_format = val
            elif name == "criu":
                g.criu = val
            elif name == "systemd-cgroup":
                g.systemd_cgroup = True
            i += 1
        return g

    def with_criu(self, criu: Path) -> list[str]:
        """Global argv for calls that run CRIU: ours unless the caller named one."""
        return self.argv if self.criu else self.argv + ["--criu", str(criu)]

    def logging_to(self, log: Path) -> "GlobalOpts":
        """The same flags with runc's log (JSON) in a file of ours: for the calls whose output is
        warmstart's business (a restore, its cleanup), not the caller's."""
        argv, i = [], 0
        while i < len(self.argv):
            name, eq, _ = self.argv[i].lstrip("-").partition("=")
            if name in ("log", "log-format"):
                i += 1 if eq else 2
                continue
            argv.append(self.argv[i])
            i += 1
        return GlobalOpts.parse(argv + ["--log", str(log), "--log-format", "json"])


@dataclass
class CreateArgs:
    """`runc create` options (the shim: --bundle B --pid-file P [--console-socket S] ... ID); also
    parses a client's own `runc restore` (its image and work paths are read past, not kept)."""
    id: str
    bundle: Path
    pid_file: str | None = None
    console_socket: str | None = None
    no_pivot: bool = False
    no_new_keyring: bool = False
    preserve_fds: str | None = None

    @classmethod
    def parse(cls, args: list[str]) -> "CreateArgs":
        vals: dict[str, str | bool] = {}
        positional: list[str] = []
        i = 0
        value_opts = {"bundle", "b", "pid-file", "console-socket", "preserve-fds",
                      "image-path", "work-path", "parent-path", "manage-cgroups-mode", "empty-ns",
                      "lsm-profile", "lsm-mount-context"}
        while i < len(args):
            a = args[i]
            if a.startswith("-") and a != "-":
                name, eq, val = a.lstrip("-").partition("=")
                if name in value_opts and not eq:
                    i += 1
                    val = args[i] if i < len(args) else ""
                vals[name] = val if name in value_opts else True
            else:
                positional.append(a)
            i += 1
        if len(positional) != 1:
            raise ValueError(f"create: expected one container id, got {positional!r}")
        bundle = vals.get("bundle") or vals.get("b") or "."
        return cls(id=positional[0], bundle=Path(str(bundle)).absolute(),
                   pid_file=_s(vals.get("pid-file")), console_socket=_s(vals.get("console-socket")),
                   no_pivot=bool(vals.get("no-pivot")), no_new_keyring=bool(vals.get("no-new-keyring")),
                   preserve_fds=_s(vals.get("preserve-fds")))


_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+-.")


def valid_container_id(cid: str) -> bool:
    """runc's own rule for a container id (libcontainer: `^[\\w+-\\.]+$`, not "." or ".."), checked
    before warmstart makes anything for the id: what runc refuses it refuses untouched."""
    return bool(cid) and cid not in (".", "..") and set(cid) <= _ID_CHARS


def _s(v: str | bool | None) -> str | None:
    return v if isinstance(v, str) and v else None


def positional(args: list[str]) -> list[str]:
    return [a for a in args if not a.startswith("-")]


class Timeout(Exception):
    """runc (and the CRIU it started) ran past its deadline and was killed."""


DEFAULT_ROOT = "/run/runc"  # runc's --root when the caller gives none (as root)
DESCRIPTORS = "descriptors.json"  # runc's record of the dumped init's fds 0-2, in the image dir
HANDOFF_FD_MIN = 100


@dataclass
class StdioHandOff:
    """The container's stdio reaches the restored process on fds of its own, not as runc's fds 0-2.

    `runc restore` gives CRIU its own fd i for each dumped stdio pipe (descriptors.json index i) and
    prints its own errors on that same stderr: a failed restore left `criu failed: type NOTIFY
    errno 0` (and, without --log, its whole log) in the new container's stderr.  So runc reads an
    image dir of links to the checkpoint whose descriptors.json puts each pipe at index base+i, the
    caller's fd i is duplicated onto fd base+i for runc, and through it CRIU, to inherit, and runc's
    own stdio goes to `out`, a file of warmstart's.  (CRIU's own config file cannot do it: CRIU
    parses that file twice, and a second `inherit-fd` of one fd fails the restore.)
    """
    images: Path
    fds: tuple[int, ...]
    out: Path

    @classmethod
    def prepare(cls, checkpoint: Path, images: Path, out: Path) -> "StdioHandOff | None":
        """None when the checkpoint's stdio holds no pipe: then runc's stdio is the container's, as before."""
        try:
            fds = json.loads((checkpoint / DESCRIPTORS).read_text())
        except (OSError, ValueError):
            return None
        pipes = [i for i, d in enumerate(fds[:3] if isinstance(fds, list) else []) if isinstance(d, str) and "pipe:" in d]
        if not pipes or not all(_is_open(i) for i in pipes):
            return None
        base = _free_fds(3)
        moved = [""] * (base + 3)
        for i in pipes:
            moved[base + i] = fds[i]
        shutil.rmtree(images, ignore_errors=True)
        images.mkdir(mode=0o700, parents=True)
        # Relative links: the restored task reads its pages after it entered the container's mount
        # namespace, through CRIU's fd of this dir; an absolute target would resolve in the container.
        up = os.path.relpath(checkpoint, images)
        for f in checkpoint.iterdir():
            if f.name != DESCRIPTORS:
                (images / f.name).symlink_to(f"{up}/{f.name}")
        (images / DESCRIPTORS).write_text(json.dumps(moved))
        for i in pipes:
            os.dup2(i, base + i, inheritable=False)  # Popen's pass_fds makes it inheritable in runc only
        return cls(images, tuple(base + i for i in pipes), out)

    def record(self, root: Path, container_id: str) -> None:
        """Tell runc which stdio the restored process has: the caller's fds 0-2, as without the hand-off.

        runc records its CRIU's fds 0-2 as the container's "external descriptors" and writes them into
        descriptors.json at the next checkpoint (its own or a client's); here those were /dev/null and
        `out`, so the restore after that gave the process /dev/null for stdin and a log file for stdout.
        """
        state = root / container_id / "state.json"
        data = json.loads(state.read_text())
        if not isinstance(data.get("external_descriptors"), list):
            raise ValueError(f"{state}: no external_descriptors list (not runc 1.1's state format)")
        data["external_descriptors"] = [os.readlink(f"/proc/self/fd/{i}") for i in range(3)]
        tmp = state.with_name(f".{state.name}.warmstart")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, state)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _free_fds(n: int) -> int:
    """The lowest fd >= HANDOFF_FD_MIN that starts n free fds."""
    base = HANDOFF_FD_MIN
    while busy := [k for k in range(n) if _is_open(base + k)]:
        base += busy[-1] + 1
    return base


def run_bounded(runc: Path, argv: list[str], timeout: float, env: dict[str, str] | None = None,
                watch: Callable[[int], None] | None = None, stdio: StdioHandOff | None = None,
                timeout_source: str = "restore_timeout_s in the config") -> subprocess.CompletedProcess:
    """Run runc in its own process group; past the deadline, kill the whole group.

    `runc restore` waits on CRIU's forked restore worker and the two can wait on
    each other forever when CRIU dies half-way; killing runc alone leaves CRIU
    behind.  The restored tasks are not in this group (CRIU gives them their
    dumped session and group): they are killed as runc's children.  `watch` is
    called with runc's pid every WATCH_TICK_S while it runs (see CriuGoneWatch).
    stdio is inherited, or with `stdio` handed off (StdioHandOff).  `timeout_source` (what set the
    deadline) ends the Timeout's message.
    """
    if stdio is None:
        p = subprocess.Popen([str(runc)] + argv, process_group=0, env=env)
    else:
        with open(stdio.out, "ab") as out:
            p = subprocess.Popen([str(runc)] + argv, process_group=0, env=env, stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=out, pass_fds=stdio.fds)
    try:
        return subprocess.CompletedProcess(p.args, wait_exit(p, timeout, watch))
    except subprocess.TimeoutExpired:
        for pid in procfs.children(p.pid):
            _kill(pid)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
        raise Timeout(f"runc {argv[len(argv) - 1] if argv else ''}: killed after {timeout:.0f}s "
                      f"({timeout_source})") from None


WATCH_TICK_S = 0.05


def wait_exit(p: subprocess.Popen, timeout: float, watch: Callable[[int], None] | None = None) -> int:
    """Popen.wait(timeout) without its polling: that sleeps in steps growing to 50 ms, which
    made a 0.12 s restore look like 0.17 s.  A pidfd becomes readable the moment the child exits;
    with a `watch`, the wait wakes every WATCH_TICK_S to call it (the exit still ends it at once)."""
    fd = os.pidfd_open(p.pid)
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(p.args, timeout)
            if select.select([fd], [], [], min(left, WATCH_TICK_S) if watch else left)[0]:
                break
            if watch:
                watch(p.pid)
    finally:
        os.close(fd)
    return p.wait()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class CriuGoneWatch:
    """Fails a `runc restore` fast when its CRIU died and a half-restored task keeps runc waiting.

    runc 1.1 waits for CRIU only by reading the swrk socket until EOF.  With
    `RstSibling`, CRIU clones the restored root task as *runc's* child; until
    CRIU moves the restore on, that task is a copy of CRIU (comm "criu", in the
    container's new PID namespace) holding CRIU's end of the socket.  If CRIU
    dies then, runc never sees EOF.  Once every child of runc in runc's own PID
    namespace (CRIU) is gone for two ticks in a row while such a task lives,
    the task is killed: the socket closes and runc fails at once.  A restored
    task is never taken for one: CRIU gives each task its own comm before it
    finishes, and while CRIU lives nothing is touched.
    """

    def __init__(self) -> None:
        self.strikes = 0
        self.released: list[int] = []

    def __call__(self, runc_pid: int) -> None:
        own = procfs.pid_ns(runc_pid)
        kids = procfs.children(runc_pid)
        criu_alive = any(procfs.pid_ns(k) == own and procfs.alive(k) for k in kids)
        held = [k for k in kids if procfs.pid_ns(k) not in (None, own)
                and procfs.comm(k) == "criu" and procfs.alive(k)]
        if criu_alive or not held:
            self.strikes = 0
            return
        self.strikes += 1
        if self.strikes >= 2:
            for pid in held:
                _kill(pid)
            self.released += held


def read_pid(pid_file: str | None) -> int | None:
    """The pid runc wrote to --pid-file (None when absent or unreadable)."""
    try:
        return int(Path(pid_file).read_text().strip()) if pid_file else None
    except (OSError, ValueError):
        return None


# -- the typed client -----------------------------------------------------------

class RuncError(RuntimeError):
    """A runc call whose output warmstart needed failed; the message names the verb and runc's error."""


@dataclass(frozen=True)
class CheckpointOpts:
    """`runc checkpoint`'s options (in the spirit of go-runc's CheckpointOpts)."""
    image_path: Path
    work_path: Path
    leave_running: bool = False
    file_locks: bool = True
    tcp_established: bool = True

    def args(self) -> list[str]:
        a = ["--image-path", str(self.image_path), "--work-path", str(self.work_path)]
        a += ["--file-locks"] * self.file_locks + ["--tcp-established"] * self.tcp_established
        return a + ["--leave-running"] * self.leave_running


@dataclass(frozen=True)
class RestoreOpts:
    """`runc restore --detach` options (in the spirit of go-runc's RestoreOpts), in place of the
    `runc create` `of`: its bundle, pid file, console socket and --no-pivot (restore rejects
    create's --no-new-keyring and --preserve-fds)."""
    image_path: Path
    work_path: Path
    of: CreateArgs
    no_subreaper: bool = False
    lsm_profile: str | None = None
    lazy_pages: bool = False

    def args(self) -> list[str]:
        c = self.of
        a = ["--detach", "--bundle", str(c.bundle), "--image-path", str(self.image_path),
             "--work-path", str(self.work_path)]
        a += ["--pid-file", c.pid_file] if c.pid_file else []
        a += ["--console-socket", c.console_socket] if c.console_socket else []
        a += ["--no-pivot"] * c.no_pivot + ["--no-subreaper"] * self.no_subreaper
        a += ["--lsm-profile", self.lsm_profile] if self.lsm_profile else []
        return a + ["--lazy-pages"] * self.lazy_pages


@dataclass(frozen=True)
class RestoreRun:
    """How a `runc restore` runs (run_bounded): its deadline (cut to what is left of the create's `budget`
    at each attempt: a lazy one, then an eager one), environment, CRIU watch and stdio hand-off."""
    timeout_s: float
    env: dict[str, str] | None = None
    watch: CriuGoneWatch | None = None
    stdio: StdioHandOff | None = None
    budget: CreateBudget | None = None

    def limit(self) -> Limit:
        """This attempt's deadline; budget.BudgetSpent when nothing is left of the create's budget to start it."""
        own = "restore_timeout_s in the config"
        if self.budget is None:
            return Limit(self.timeout_s, own)
        self.budget.check("runc restore")
        return self.budget.limit(self.timeout_s, own)


def exec_unchanged(path: Path | str, argv: list[str]) -> NoReturn:
    """Become runc with the caller's argv, unchanged: same flags, exit code and stdio (inherited fds too)."""
    os.execv(str(path), [str(path)] + argv)


@dataclass(frozen=True)
class Runc:
    """runc with the shim's global flags: every runc call warmstart makes itself is built here.

    `criu` is the CRIU that checkpoint and restore run, unless the caller's global flags name one.
    """
    path: Path
    g: GlobalOpts = field(default_factory=GlobalOpts)
    criu: Path | None = None

    @property
    def root(self) -> Path:
        """runc's state root (its --root, or runc's default as root)."""
        return Path(self.g.root or DEFAULT_ROOT)

    def logging_to(self, log: Path) -> "Runc":
        """The same runc with its log in a file of ours (GlobalOpts.logging_to)."""
        return replace(self, g=self.g.logging_to(log))

    def command(self, *args: str) -> list[str]:
        return [str(self.path), *self.g.argv, *args]

    def _criu_command(self, *args: str) -> list[str]:
        return [str(self.path), *(self.g.with_criu(self.criu) if self.criu else self.g.argv), *args]

    def _run(self, cmd: list[str], timeout: float | None, stdin: int | None = None) -> subprocess.CompletedProcess:
        """Output captured; stdin inherited unless given (as before the client: runc's own calls never read it)."""
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=stdin)

    def state(self, container_id: str) -> dict | None:
        """`runc state`: None when runc does not know the container (or answers nonsense)."""
        p = self._run(self.command("state", container_id), None)
        if p.returncode != 0:
            return None
        try:
            return json.loads(p.stdout)
        except ValueError:
            return None

    def ps(self, container_id: str, timeout: float = 30) -> list[int]:
        """Host PIDs of every process of the container (`runc ps --format json`), sorted."""
        p = self._run(self.command("ps", "--format", "json", container_id), timeout)
        if p.returncode != 0:
            raise RuncError(f"runc ps {container_id} failed: {(p.stderr or '').strip()[-200:]}")
        return sorted(int(x) for x in json.loads(p.stdout or "[]") or [])

    def pause(self, container_id: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return self._run(self.command("pause", container_id), timeout)

    def resume(self, container_id: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return self._run(self.command("resume", container_id), timeout)

    def exec(self, container_id: str, process: Path, timeout: float) -> subprocess.CompletedProcess:
        """`runc exec --process FILE` (stdin /dev/null); subprocess.TimeoutExpired past `timeout`."""
        return self._run(self.command("exec", "--process", str(process), container_id), timeout, subprocess.DEVNULL)

    def delete(self, container_id: str, force: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
        return self._run(self.command("delete", *["--force"] * force, container_id), timeout)

    def checkpoint_command(self, container_id: str, opts: CheckpointOpts) -> list[str]:
        return self._criu_command("checkpoint", *opts.args(), container_id)

    def checkpoint(self, container_id: str, opts: CheckpointOpts, timeout: float) -> subprocess.CompletedProcess:
        """`runc checkpoint` (its output captured); subprocess.TimeoutExpired past `timeout`."""
        return self._run(self.checkpoint_command(container_id, opts), timeout)

    def restore_command(self, container_id: str, opts: RestoreOpts) -> list[str]:
        return self._criu_command("restore", *opts.args(), container_id)

    def restore(self, container_id: str, opts: RestoreOpts, run: RestoreRun) -> subprocess.CompletedProcess:
        """`runc restore`, bounded (run_bounded): Timeout past run.timeout_s, with runc and its CRIU killed."""
        cmd, limit = self.restore_command(container_id, opts), run.limit()
        return run_bounded(Path(cmd[0]), cmd[1:], limit.seconds, env=run.env, watch=run.watch, stdio=run.stdio,
                           timeout_source=limit.source)

    def discard_failed_restore(self, container_id: str) -> list[str]:
        """Remove what a failed `runc restore` left in runc's state dir, never through a mount; returns notes to log.

        runc bind-mounts the rootfs at <root>/<id>/criu-root for CRIU and unmounts it
        in a deferred call that a killed runc never runs.  `runc delete --force` on a
        state dir without state.json then RemoveAll()s through that bind and empties
        the rootfs.  So everything under the state dir is unmounted first, and runc
        is called only when nothing is mounted there any more.
        """
        state = self.root / container_id
        left = procfs.umount_under(state)
        if left:
            return [f"cleanup: {', '.join(left)} stays mounted; {state} left in place rather than deleted through it"]
        notes = []
        p = self.delete(container_id, force=True)
        if p.returncode != 0 and "not exist" not in (p.stderr or ""):
            notes.append(f"cleanup: runc delete --force failed: {(p.stderr or '').strip()[-300:]}")
        if state.is_dir() and not state.is_symlink():
            try:
                procfs.remove_tree(state)  # a state dir without state.json: runc's delete does not parse it
                notes.append(f"cleanup: removed runc state {state} left by the failed restore")
            except OSError as e:
                notes.append(f"cleanup: could not remove {state}: {e}")
        return notes

    def passthrough(self, argv: list[str]) -> int:
        """runc with the caller's argv unchanged (its global flags included) and stdio inherited; its exit code."""
        return subprocess.run([str(self.path)] + argv).returncode

    def exec_passthrough(self, argv: list[str]) -> NoReturn:
        exec_unchanged(self.path, argv)
