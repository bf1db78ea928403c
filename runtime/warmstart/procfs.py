"""What /proc says about processes and mounts, read in one place.

Everything here reads the host's procfs as root: values that a container controls
(a process name, a mount point's path) are compared, never followed.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

MNT_DETACH = 2


def alive(pid: int) -> bool:
    """Running: a zombie (exited, not yet reaped by its parent) counts as dead."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def children(pid: int) -> list[int]:
    """The pids of a process's children, over all its threads."""
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    out += [int(x) for x in f.read().split()]
            except OSError:
                continue
    except OSError:
        pass
    return out


def comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


def exe_name(pid: int) -> str | None:
    """The basename of the process's executable (None for a zombie or a vanished process)."""
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return None


def pid_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _unescape(s: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040 ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s) if "\\" in s else s


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str
    source: str
    super_options: str


def mounts(pid: str | int = "self") -> list[Mount]:
    """The mount table as `pid` sees it (our own by default)."""
    out = []
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for ln in lines:
        left, sep, right = ln.partition(" - ")
        fields, rfields = left.split(), right.split()
        if not sep or len(fields) < 5 or len(rfields) < 3:
            continue
        out.append(Mount(_unescape(fields[4]), rfields[0], _unescape(rfields[1]), rfields[2]))
    return out


def mount_at(path: Path | str) -> Mount | None:
    """The mount on top at `path` (resolved): a later mount on the same point hides earlier ones."""
    target = os.path.realpath(path)
    found = None
    for m in mounts():
        if m.mount_point == target:
            found = m
    return found


def overlay_option(m: Mount | None, key: str) -> str | None:
    """An overlay mount's super option (upperdir, lowerdir), unescaped; None for anything else."""
    if m is None or m.fstype != "overlay":
        return None
    for opt in m.super_options.split(","):
        if opt.startswith(key + "="):
            return _unescape(opt[len(key) + 1:])
    return None


def mounts_under(path: Path | str) -> list[str]:
    """Mount points at or below `path` (resolved), deepest first."""
    top = os.path.realpath(path)
    prefix = top.rstrip("/") + "/"
    found = {m.mount_point for m in mounts() if m.mount_point == top or m.mount_point.startswith(prefix)}
    return sorted(found, key=len, reverse=True)


def umount_under(path: Path | str) -> list[str]:
    """Detach every mount at or below `path`, deepest first; returns those that stay mounted."""
    import ctypes  # noqa: PLC0415 - only a cleanup unmounts

    libc = ctypes.CDLL(None, use_errno=True)
    for mp in mounts_under(path):
        libc.umount2(mp.encode(), MNT_DETACH)
    return mounts_under(path)


class CrossesMount(OSError):
    """A tree to remove holds a mount point: removing through it would delete another filesystem's files."""


def remove_tree(path: Path | str) -> None:
    """Remove a directory tree without ever crossing into a mount below it.

    `shutil.rmtree` (and Go's `os.RemoveAll`, which `runc delete` uses) walk
    through bind mounts: a rootfs bind-mounted below the tree would be emptied.
    This refuses when the mount table shows a mount inside, and checks each
    directory's device while walking, by fds and without following symlinks.
    """
    path = Path(path)
    left = mounts_under(path)
    if left:
        raise CrossesMount(f"{path}: refusing to remove a tree with mounts inside: {', '.join(left[:3])}")
    try:
        top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        _empty_dir(top, os.fstat(top).st_dev, str(path))
    finally:
        os.close(top)
    os.rmdir(path)


def _empty_dir(dfd: int, dev: int, where: str) -> None:
    for name in os.listdir(dfd):
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            if st.st_dev != dev:
                raise CrossesMount(f"{where}/{name}: another filesystem; refusing to remove through it")
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                _empty_dir(sub, dev, f"{where}/{name}")
            finally:
                os.close(sub)
            os.rmdir(name, dir_fd=dfd)
        else:
            os.unlink(name, dir_fd=dfd)
