"""warmstart-hook: the OCI poststop hook, which releases what warmstart holds for a container.

runc runs poststop hooks when it destroys a container, and only then: inside
`runc delete` (whoever calls it), inside `runc checkpoint` (the container ends
with the dump) and in the cleanup of a failed `runc create` or `restore`; a
stopped container that nobody deletes runs none.  warmstart-runtime's `delete`
releases the container's state itself; this hook does it when runc destroys the
container without warmstart-runtime around (a shim's cleanup or a tool calling
runc directly, warmstart-runtime falling back to plain runc on an internal
error): it stops the container's on-ready supervisor and removes
<state_dir>/containers/<id>.  Either may come first, or alone.

It leaves the dir to warmstart-runtime when runc ran the hook from `checkpoint`
or `restore` (a dump or a restore in flight) and while a `create` or a `delete`
holds StateDir.busy_lock.  It trusts nothing it is handed: the dir must be the
one the launcher finds for `delete <the OCI state's id>`, under the configured
state_dir, a plain directory in a plain directory.  A failing hook fails the
container's stop, so this exits 0 always; what it refused goes to the runtime log.
It imports only the stdlib and the launcher until there is something to release.

`createRuntime` and `prestart` do nothing and exit 0: specs and hooks.d files
of earlier versions name them.
"""
from __future__ import annotations

import fcntl
import json
import os
import stat
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python -IS .../warmstart/hooks/main.py`: no site-packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from warmstart.launch import container_state_dir, fast_settings, split_argv  # noqa: E402 - after the path fix

IN_FLIGHT = ("checkpoint", "restore")  # runc subcommands that destroy a container warmstart is still working on
BUSY_LOCK = "busy.lock"  # StateDir.busy_lock, read here without importing state.py (see there)


class Refused(Exception):
    """The hook was handed something that is not a container's state dir of this node; nothing was touched."""


def parse(argv: list[str]) -> tuple[str, Path | None]:
    """(stage, --state-dir): two arguments do not need argparse, which costs more than the whole hook's work."""
    stage, given = (argv[0] if argv else ""), None
    for i, a in enumerate(argv[1:], 1):
        if a == "--state-dir" and i + 1 < len(argv):
            given = Path(argv[i + 1])
        elif a.startswith("--state-dir="):
            given = Path(a.partition("=")[2])
    return stage, given


def state_dir_of(state: object, given: Path | None) -> Path | None:
    """The container's state dir, checked; None when it does not exist (delete came first).

    The same dir the launcher finds for `delete ID`; it and its parent must be plain directories."""
    cid = state.get("id") if isinstance(state, dict) else None
    found = container_state_dir(["delete", cid], 0, fast_settings()) if isinstance(cid, str) else None
    path = Path(found) if found else None
    if path is None or not path.is_absolute():
        raise Refused(f"no usable container id in the OCI state ({cid!r}), or state_dir is not absolute")
    if given is not None and given != path:
        raise Refused(f"--state-dir {given} is not {path}, the state dir of container {cid!r}")
    for p in (path.parent, path):
        try:
            mode = p.lstat().st_mode
        except FileNotFoundError:
            return None
        if not stat.S_ISDIR(mode):
            raise Refused(f"{p} is not a plain directory; left alone")
    return path


def busy(path: Path) -> bool:
    """Whether warmstart-runtime holds the dir's busy lock (a create or a delete in flight); never blocks."""
    try:
        fd = os.open(path / BUSY_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def subcommand(cmdline: bytes) -> str | None:
    """The subcommand in a runtime's /proc/PID/cmdline (runc and crun run hooks as their own children)."""
    argv = [a.decode(errors="replace") for a in cmdline.rstrip(b"\0").split(b"\0")][1:]
    i = split_argv(argv)
    return argv[i] if i >= 0 else None


def poststop(state: object, given: Path | None, caller: bytes) -> str:
    """Release the container's state unless warmstart still uses it (caller: the cmdline of the
    process that ran the hook); says what it did.  Imports more than the launcher only to release."""
    path = state_dir_of(state, given)
    if path is None:
        return "absent"
    sub = subcommand(caller)
    if sub in IN_FLIGHT:
        return f"kept: run by `{sub}`"
    if busy(path):
        return "kept: warmstart-runtime is working on it"
    from warmstart.procfs import remove_tree  # noqa: PLC0415
    from warmstart.state import StateDir  # noqa: PLC0415

    sd = StateDir(path.parent.parent, path.name)
    if sd.supervisor_pid.exists():  # on-ready only: spare everyone else supervisor.py's imports
        from warmstart import supervisor  # noqa: PLC0415
        supervisor.stop(sd)
    remove_tree(sd.path)  # never through a mount below it, never following a symlink
    return "removed"


def _log(level: str, msg: str, state: object) -> None:
    """Into the runtime log (imports config only on this rare path), else onto stderr."""
    cid = state.get("id") if isinstance(state, dict) else None
    try:
        from warmstart import config  # noqa: PLC0415
        from warmstart.log import Logger  # noqa: PLC0415
        Logger(config.load().log_dir, None, {"component": "poststop-hook", "container": cid}).event(level, msg)
    except Exception:  # noqa: BLE001
        print(f"warmstart-hook: {level}: {msg}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    stage, given = parse(sys.argv[1:] if argv is None else argv)
    if stage != "poststop":
        return 0
    state: object = None
    try:
        state = json.loads(sys.stdin.read() or "{}")
        try:
            caller = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
        except OSError:
            caller = b""
        poststop(state, given, caller)
    except Refused as e:
        _log("warning", f"poststop: {e}", state)
    except Exception as e:  # noqa: BLE001 - never fail the container's stop from a hook
        _log("error", f"poststop: {type(e).__name__}: {e}", state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
