"""The argv shapes we read from the shim and send to runc, in one place."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass
class CreateArgs:
    """`runc create` options (the shim: --bundle B --pid-file P [--console-socket S] ... ID)."""
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
        value_opts = {"bundle", "b", "pid-file", "console-socket", "preserve-fds"}
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


def _s(v: str | bool | None) -> str | None:
    return v if isinstance(v, str) and v else None


def positional(args: list[str]) -> list[str]:
    return [a for a in args if not a.startswith("-")]


def restore_argv(g: GlobalOpts, criu: Path, c: CreateArgs, image: Path, work: Path,
                 extra: list[str] | None = None) -> list[str]:
    """`runc restore --detach` in place of `runc create`; restore rejects --no-new-keyring and --preserve-fds."""
    argv = g.with_criu(criu) + ["restore", "--detach", "--bundle", str(c.bundle),
                                "--image-path", str(image), "--work-path", str(work)]
    if c.pid_file:
        argv += ["--pid-file", c.pid_file]
    if c.console_socket:
        argv += ["--console-socket", c.console_socket]
    if c.no_pivot:
        argv += ["--no-pivot"]
    return argv + (extra or []) + [c.id]


def checkpoint_argv(g: GlobalOpts, criu: Path, cid: str, image: Path, work: Path,
                    leave_running: bool = False, extra: list[str] | None = None) -> list[str]:
    argv = g.with_criu(criu) + ["checkpoint", "--image-path", str(image), "--work-path", str(work),
                                "--file-locks", "--tcp-established"]
    if leave_running:
        argv.append("--leave-running")
    return argv + (extra or []) + [cid]


def run(runc: Path, argv: list[str], timeout: float | None = None,
        capture: bool = True) -> subprocess.CompletedProcess:
    """Run runc; stdin is inherited only when we replace create (the container's stdio)."""
    return subprocess.run([str(runc)] + argv, capture_output=capture, text=True, timeout=timeout)


class Timeout(Exception):
    """runc (and the CRIU it started) ran past its deadline and was killed."""


def run_bounded(runc: Path, argv: list[str], timeout: float,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run runc with inherited stdio in its own process group; past the deadline, kill the whole group.

    `runc restore` waits on CRIU's forked restore worker and the two can wait on
    each other forever when CRIU dies half-way; killing runc alone leaves CRIU
    behind.  The restored tasks are not in this group (CRIU gives them their
    dumped session and group), so only runc and CRIU die here.
    """
    p = subprocess.Popen([str(runc)] + argv, process_group=0, env=env)
    try:
        return subprocess.CompletedProcess(p.args, wait_exit(p, timeout))
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
        raise Timeout(f"runc {argv[len(argv) - 1] if argv else ''}: killed after {timeout:.0f}s "
                      "(restore_timeout_s in the config)") from None


def wait_exit(p: subprocess.Popen, timeout: float) -> int:
    """Popen.wait(timeout) without its polling: that sleeps in steps growing to 50 ms, which
    made a 0.12 s restore look like 0.17 s.  A pidfd becomes readable the moment the child exits."""
    fd = os.pidfd_open(p.pid)
    try:
        if not select.select([fd], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired(p.args, timeout)
    finally:
        os.close(fd)
    return p.wait()


def read_pid(pid_file: str | None) -> int | None:
    """The pid runc wrote to --pid-file (None when absent or unreadable)."""
    try:
        return int(Path(pid_file).read_text().strip()) if pid_file else None
    except (OSError, ValueError):
        return None


def state(runc: Path, g: GlobalOpts, cid: str) -> dict | None:
    p = run(runc, g.argv + ["state", cid])
    if p.returncode != 0:
        return None
    try:
        return json.loads(p.stdout)
    except ValueError:
        return None
