"""The container's writable-layer diff: capture at dump, validate and apply (with undo) at restore.

Capture reads an overlay upper dir when the rootfs is an overlay mount (kernel
overlayfs records a deletion as a 0/0 character device, an opaque dir as the
xattr trusted.overlay.opaque=y), else compares against a baseline listing taken
when the container was created.  Apply treats the archive as hostile: every
entry is checked before the rootfs is touched, paths are walked with
O_NOFOLLOW so nothing outside the rootfs is ever written, and each change is
journaled so a failed restore leaves the rootfs as it was.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import stat
import tarfile
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from . import procfs

MAX_ENTRIES = 200_000


class RootfsError(Exception):
    """A diff entry that must not be applied; the message names it."""


@dataclass
class DiffSummary:
    files: int = 0
    deleted: int = 0
    bytes: int = 0


# -- where the rootfs lives ----------------------------------------------------

def rootfs_path(bundle: Path, spec: dict) -> Path:
    p = Path((spec.get("root") or {}).get("path") or "rootfs")
    return p if p.is_absolute() else bundle / p


def overlay_upperdir(rootfs: Path) -> Path | None:
    """The upper dir of the overlay mounted at rootfs, from our mountinfo."""
    upper = procfs.overlay_option(procfs.mount_at(rootfs), "upperdir")
    return Path(upper) if upper else None


# -- opening beneath a dir fd --------------------------------------------------

_NOFOLLOW = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def open_regular(dir_fd: int, name: str, flags: int, *, create_mode: int | None = None,
                 same_as: os.stat_result | None = None) -> tuple[int, os.stat_result]:
    """(fd, fstat) of the regular file `name` in dir_fd, for files a container can swap under us.

    No symlink is followed, a FIFO never blocks the open (O_NONBLOCK) and a device is refused by its
    lstat before it is opened and by the fd's fstat before any byte is read, written or truncated.
    With create_mode an absent file is created (O_EXCL, so nothing planted meanwhile is reused); with
    same_as it must still be that inode (what a walk listed).  Anything else: RootfsError.
    """
    if create_mode is not None:
        try:
            fd = os.open(name, flags | _NOFOLLOW | os.O_CREAT | os.O_EXCL, create_mode, dir_fd=dir_fd)
            return fd, os.fstat(fd)
        except FileExistsError:
            pass
    want = same_as or os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISREG(want.st_mode):
        raise RootfsError(f"{name!r}: not a regular file (mode {stat.S_IFMT(want.st_mode):o})")
    try:
        fd = os.open(name, flags | _NOFOLLOW, dir_fd=dir_fd)
    except OSError as e:
        raise RootfsError(f"{name!r}: changed while being opened ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (want.st_dev, want.st_ino):
        os.close(fd)
        raise RootfsError(f"{name!r}: replaced while being opened")
    return fd, st


def _open_dir(dir_fd: int, name: str, same_as: os.stat_result | None = None) -> int:
    """An fd of the directory `name` in dir_fd, never through a symlink; with same_as, still that inode."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        raise RootfsError(f"{name!r}: not a plain directory ({e.strerror})") from None
    if same_as is not None and (os.fstat(fd).st_dev, os.fstat(fd).st_ino) != (same_as.st_dev, same_as.st_ino):
        os.close(fd)
        raise RootfsError(f"{name!r}: replaced while being walked")
    return fd


def _listing(dir_fd: int) -> Iterator[tuple[str, os.stat_result]]:
    """(name, lstat) of a directory's entries, names sorted, all stat'ed now (what a walk then checks)."""
    out = []
    for name in sorted(os.listdir(dir_fd)):
        try:
            out.append((name, os.stat(name, dir_fd=dir_fd, follow_symlinks=False)))
        except FileNotFoundError:
            pass  # gone since the listing: as if deleted
    return iter(out)


def _scan(root_fd: int) -> Iterator[tuple[str, os.stat_result, int, str]]:
    """(relpath, lstat, parent dir fd, name) of everything under root_fd, parents first, names sorted.

    Walks through directory fds only: never follows a symlink, never crosses into another
    filesystem, and a directory replaced between its listing and its opening (a container swapping
    it for a symlink) is a RootfsError naming it.  The parent fd is valid until the next item.
    """
    dev = os.fstat(root_fd).st_dev
    stack = [(_listing(root_fd), os.dup(root_fd), "")]
    try:
        while stack:
            entries, dfd, prefix = stack[-1]
            name, st = next(entries, ("", None))
            if st is None:
                stack.pop()
                os.close(dfd)
                continue
            rel = prefix + name
            yield rel, st, dfd, name
            if stat.S_ISDIR(st.st_mode) and st.st_dev == dev:
                try:
                    sub = _open_dir(dfd, name, same_as=st)
                except RootfsError as e:
                    raise RootfsError(f"{rel}: changed while the rootfs was walked ({e})") from None
                try:
                    stack.append((_listing(sub), sub, rel + "/"))
                except BaseException:
                    os.close(sub)
                    raise
    finally:
        for _, fd, _ in stack:
            os.close(fd)


def _open_root(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


# -- baseline for plain-directory rootfs ----------------------------------------

def _sig(st: os.stat_result) -> list[int]:
    return [st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def take_baseline(rootfs: Path, out: Path) -> None:
    root_fd = _open_root(rootfs)
    try:
        with closing(_scan(root_fd)) as entries:
            listing = {rel: _sig(st) for rel, st, _, _ in entries}
    finally:
        os.close(root_fd)
    out.write_text(json.dumps(listing, separators=(",", ":")))


# -- capture ------------------------------------------------------------------

def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _opaque(dir_fd: int, name: str) -> bool:
    at = f"/proc/self/fd/{dir_fd}/{name}"  # our own fd: the name is looked up in that very directory
    for key in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            if os.getxattr(at, key, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    return False


def capture(rootfs: Path, baseline: Path | None, tar_out: Path, deleted_out: Path) -> DiffSummary:
    """Write rootfs-diff.tar and deleted.files for the container's changes.

    On-ready captures while the container runs, so it may rename and swap anything meanwhile: the
    tree is walked through dir fds and every file is read from an fd checked to be the regular file
    listed (`_scan`, `open_regular`); a race fails the capture (RootfsError naming the path), so the
    dump publishes no checkpoint rather than whatever a symlink pointed at.
    """
    upper = overlay_upperdir(rootfs)
    before: dict[str, list[int]] | None = None
    if upper is None:
        if baseline is None or not baseline.exists():
            raise RootfsError("no overlay upper dir and no baseline listing: cannot tell what changed")
        before = json.loads(baseline.read_text())
    now: set[str] = set()
    deleted: list[str] = []
    summary = DiffSummary()
    root_fd = _open_root(upper if upper is not None else rootfs)
    try:
        with tarfile.open(tar_out, "w", format=tarfile.PAX_FORMAT) as tar, closing(_scan(root_fd)) as entries:
            for rel, st, dfd, name in entries:
                if before is None:
                    if _is_whiteout(st):
                        deleted.append(rel)
                        continue
                    if stat.S_ISDIR(st.st_mode) and _opaque(dfd, name):
                        deleted.append(rel)  # opaque: the lower dir's content is gone; re-created from the tar
                else:
                    now.add(rel)
                    old = before.get(rel)
                    if old == _sig(st):
                        continue
                    if stat.S_ISDIR(st.st_mode) and old is not None and old[0] == st.st_mode:
                        continue  # a dir whose entries changed: its entries carry the change
                if _add(tar, rel, st, dfd, name, summary):
                    summary.files += 1
    finally:
        os.close(root_fd)
    if before is not None:
        deleted = sorted(rel for rel in before if rel not in now)
        # a deleted dir implies its children: keep only top-most deletions
        deleted = [d for d in deleted if not any(d.startswith(p + "/") for p in deleted if p != d)]
    summary.deleted = len(deleted)
    deleted_out.write_text("".join(d + "\n" for d in deleted))
    return summary


def _add(tar: tarfile.TarFile, rel: str, st: os.stat_result, dfd: int, name: str, summary: DiffSummary) -> bool:
    """One tar member for the entry `name` of dfd, built from what an fd shows, never from a path."""
    info = tarfile.TarInfo(rel)
    if stat.S_ISREG(st.st_mode):
        try:
            fd, st = open_regular(dfd, name, os.O_RDONLY, same_as=st)
        except RootfsError as e:
            raise RootfsError(f"{rel}: changed while the rootfs was captured ({e})") from None
        with os.fdopen(fd, "rb") as f:
            info.type, info.size = tarfile.REGTYPE, st.st_size
            _meta_into(info, st)
            tar.addfile(info, f)
        summary.bytes += st.st_size
    elif stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        _meta_into(info, st)
        tar.addfile(info)
    elif stat.S_ISLNK(st.st_mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(name, dir_fd=dfd)
        _meta_into(info, st)
        tar.addfile(info)
    else:
        return False  # sockets, fifos, devices: runtime objects, not files to carry
    return True


def _meta_into(info: tarfile.TarInfo, st: os.stat_result) -> None:
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid, info.mtime = st.st_uid, st.st_gid, int(st.st_mtime)


# -- validate -----------------------------------------------------------------

def _check_rel(name: str, what: str) -> str:
    if not name or "\x00" in name or "\n" in name:
        raise RootfsError(f"{what} {name!r}: empty or contains NUL/newline")
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or name.startswith("/"):
        raise RootfsError(f"{what} {name!r}: absolute path or '..' escapes the rootfs")
    clean = "/".join(part for part in p.parts if part not in ("", "."))
    if not clean:
        raise RootfsError(f"{what} {name!r}: names the rootfs itself")
    return clean


def read_deleted(path: Path) -> list[str]:
    if not path.exists():
        return []
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise RootfsError("deleted.files: contains NUL bytes")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise RootfsError("deleted.files: not UTF-8") from None
    lines = [ln for ln in text.split("\n") if ln]
    if len(lines) > MAX_ENTRIES:
        raise RootfsError(f"deleted.files: {len(lines)} entries exceeds {MAX_ENTRIES}")
    return [_check_rel(ln, "deleted.files entry") for ln in lines]


def read_members(tar_path: Path) -> list[tarfile.TarInfo]:
    """Members of rootfs-diff.tar, refusing anything but plain files, dirs and tame symlinks."""
    if not tar_path.exists():
        return []
    try:
        with tarfile.open(tar_path, "r:") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, EOFError) as e:
        raise RootfsError(f"rootfs-diff.tar: unreadable ({e})") from None
    if len(members) > MAX_ENTRIES:
        raise RootfsError(f"rootfs-diff.tar: {len(members)} entries exceeds {MAX_ENTRIES}")
    non_dirs: set[str] = set()
    for m in members:
        m.name = _check_rel(m.name, "rootfs-diff.tar entry")
        parent = PurePosixPath(m.name).parent
        for anc in (parent, *parent.parents):
            if str(anc) in non_dirs:
                raise RootfsError(f"rootfs-diff.tar entry {m.name!r}: goes through the non-directory entry {str(anc)!r}")
        if not m.isdir():
            non_dirs.add(m.name)
        if m.issym():
            target = m.linkname
            if "\x00" in target or not target:
                raise RootfsError(f"rootfs-diff.tar entry {m.name!r}: bad symlink target")
            if not target.startswith("/"):
                depth = len(PurePosixPath(m.name).parent.parts)
                for part in PurePosixPath(target).parts:
                    depth += -1 if part == ".." else (0 if part == "." else 1)
                    if depth < 0:
                        raise RootfsError(f"rootfs-diff.tar entry {m.name!r}: symlink to {target!r} escapes the rootfs")
        elif not (m.isreg() or m.isdir()):
            raise RootfsError(f"rootfs-diff.tar entry {m.name!r}: type {m.type!r} not allowed (only files, dirs, symlinks)")
        if m.mode & (stat.S_ISUID | stat.S_ISGID):
            raise RootfsError(f"rootfs-diff.tar entry {m.name!r}: setuid/setgid bits are refused")
    return members


# -- apply with undo ----------------------------------------------------------

def _open_parent(root_fd: int, rel: str, create: bool, journal: "Journal | None" = None) -> tuple[int, str]:
    """An fd of rel's parent dir, reached without following any symlink (dirs it makes are journaled)."""
    parts = rel.split("/")
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts[:-1]):
            try:
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                if journal is not None:
                    journal.created.append("/".join(parts[: i + 1]))
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as e:
                raise RootfsError(f"{rel}: parent {part!r} is not a plain directory ({e.strerror})") from None
            os.close(fd)
            fd = nfd
        return fd, parts[-1]
    except BaseException:
        os.close(fd)
        raise


JOURNAL_MAX_BYTES = 4 << 30  # file data one restore may set aside (overlayfs copies a lower file up to rename it)


@dataclass
class Journal:
    """What apply changed, so undo can put the rootfs back and commit can drop what it set aside.

    Entries the diff deletes or replaces are *renamed* into a hidden dir on the rootfs's own
    filesystem (next to the rootfs when that is the same mount, else at its top, e.g. on an overlay),
    never copied into the state dir (tmpfs on most nodes); at most JOURNAL_MAX_BYTES of files.  An
    entry no rename can move (another mount) refuses the restore: a cold start, not a copy.
    """
    backup: Path | None = None  # unused: the copying journal's dir in the state dir, kept for callers
    created: list[str] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)  # set aside in this order: saved[i] is the journal's entry i
    removed_dirs: list[tuple[str, tuple[int, int, int, int, int]]] = field(default_factory=list)
    dir_meta: dict[str, tuple[int, int, int, int, int]] = field(default_factory=dict)  # mode, uid, gid, atime, mtime
    held_bytes: int = 0
    root: Path | None = None  # the rootfs apply worked on
    aside: tuple[Path, str] | None = None  # (dir holding the journal dir, its name)

    def _aside_fd(self, root_fd: int) -> int:
        """An fd of the journal dir, made on first use: in the rootfs, then moved next to it if it can be."""
        if self.aside is None:
            assert self.root is not None
            name = f".warmstart-journal-{secrets.token_hex(6)}"
            os.mkdir(name, 0o700, dir_fd=root_fd)
            self.aside = (self.root, name)
            try:
                out_fd = _open_root(self.root.parent)
                try:
                    os.rename(name, name, src_dir_fd=root_fd, dst_dir_fd=out_fd)
                    self.aside = (self.root.parent, name)  # out of the container's sight
                finally:
                    os.close(out_fd)
            except OSError:
                pass  # another mount (an overlay rootfs): renames must stay inside it
        parent_fd = _open_root(self.aside[0])
        try:
            return _open_dir(parent_fd, self.aside[1])
        finally:
            os.close(parent_fd)

    def commit(self) -> str | None:
        """After a successful restore: drop what was set aside; nothing is left to undo.

        Never raises (the container already runs): returns what went wrong, if anything.
        """
        aside, self.aside = self.aside, None
        self.created, self.saved, self.removed_dirs, self.dir_meta = [], [], [], {}
        if aside is None:
            return None
        try:
            parent_fd = _open_root(aside[0])
            try:
                _remove_at(parent_fd, aside[1])
            finally:
                os.close(parent_fd)
        except OSError as e:
            return f"could not remove the restore's journal {aside[0] / aside[1]}: {e}"
        return None

    def ours(self, rel: str) -> bool:
        """rel (or a dir above it) was made by this apply: removing it needs no backup."""
        return any(rel == p or rel.startswith(p + "/") for p in (*self.created, *self.saved))


def _remove_at(dfd: int, name: str) -> None:
    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            for child in os.listdir(sub):
                _remove_at(sub, child)
        finally:
            os.close(sub)
        os.rmdir(name, dir_fd=dfd)
    else:
        os.unlink(name, dir_fd=dfd)


def _meta(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns


def _bytes_in(dfd: int, name: str, st: os.stat_result) -> int:
    """Bytes of regular files at name (a whole tree for a dir), walked without following symlinks."""
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    sub = _open_dir(dfd, name)
    try:
        with closing(_scan(sub)) as entries:
            return sum(s.st_size for _, s, _, _ in entries if stat.S_ISREG(s.st_mode))
    finally:
        os.close(sub)


def _set_aside(root_fd: int, dfd: int, name: str, rel: str, journal: Journal) -> None:
    """Rename the user's entry at rel into the journal (undo renames it back; nothing is copied)."""
    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    afd = journal._aside_fd(root_fd)
    try:
        slot = str(len(journal.saved))
        try:
            os.rename(name, slot, src_dir_fd=dfd, dst_dir_fd=afd)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            if not stat.S_ISDIR(st.st_mode):
                raise RootfsError(f"{rel}: cannot be set aside by a rename ({e.strerror}); "
                                  "refusing the restore rather than copying it") from None
            # overlayfs (without redirect_dir) renames no dir that has a lower layer: move its entries, drop it
            sub = _open_dir(dfd, name, same_as=st)
            try:
                for child in sorted(os.listdir(sub)):
                    _set_aside(root_fd, sub, child, f"{rel}/{child}", journal)
            finally:
                os.close(sub)
            os.rmdir(name, dir_fd=dfd)
            journal.removed_dirs.append((rel, _meta(st)))
            return
        journal.saved.append(rel)
        journal.held_bytes += _bytes_in(afd, slot, st)
    finally:
        os.close(afd)
    if journal.held_bytes > JOURNAL_MAX_BYTES:
        raise RootfsError(f"{rel}: the restore would set aside more than {JOURNAL_MAX_BYTES >> 20} MiB "
                          "of the rootfs's files; refusing")


def _clear(root_fd: int, dfd: int, name: str, rel: str, journal: Journal) -> bool:
    """Make rel absent: the user's entry is set aside, one this apply made is removed; False if none was there."""
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if journal.ours(rel):
        _remove_at(dfd, name)
    else:
        _set_aside(root_fd, dfd, name, rel, journal)
    return True


def apply(rootfs: Path, tar_path: Path, deleted_path: Path, journal: Journal) -> DiffSummary:
    """Apply deletions then the tar; everything is validated before the first write."""
    deleted = read_deleted(deleted_path)
    members = read_members(tar_path)
    summary = DiffSummary(files=len(members), deleted=len(deleted))
    journal.root = rootfs
    root_fd = _open_root(rootfs)
    try:
        for rel in deleted:
            try:
                dfd, name = _open_parent(root_fd, rel, create=False)
            except (FileNotFoundError, NotADirectoryError):
                continue  # already gone
            try:
                _clear(root_fd, dfd, name, rel, journal)
            finally:
                os.close(dfd)
        with tarfile.open(tar_path, "r:") if tar_path.exists() else _empty() as tar:
            for m in members:
                dfd, name = _open_parent(root_fd, m.name, create=True, journal=journal)
                try:
                    if m.isdir():
                        try:
                            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                        except FileNotFoundError:
                            st = None
                        if st is not None and stat.S_ISDIR(st.st_mode):
                            journal.dir_meta.setdefault(m.name, _meta(st))
                        else:
                            if not _clear(root_fd, dfd, name, m.name, journal):
                                journal.created.append(m.name)
                            os.mkdir(name, 0o700, dir_fd=dfd)
                        os.chmod(name, m.mode & 0o7777, dir_fd=dfd)  # mkdir's mode is cut by the umask
                    else:
                        if not _clear(root_fd, dfd, name, m.name, journal) and m.name not in journal.created:
                            journal.created.append(m.name)
                        if m.issym():
                            os.symlink(m.linkname, name, dir_fd=dfd)
                        else:
                            src = tar.extractfile(m)
                            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                         m.mode & 0o777, dir_fd=dfd)
                            with os.fdopen(fd, "wb") as out:
                                shutil.copyfileobj(src, out, 1 << 20)
                                os.fchmod(out.fileno(), m.mode & 0o777)
                            summary.bytes += m.size
                    os.chown(name, m.uid, m.gid, dir_fd=dfd, follow_symlinks=False)
                    if not m.issym():
                        os.utime(name, (m.mtime, m.mtime), dir_fd=dfd, follow_symlinks=False)
                finally:
                    os.close(dfd)
    finally:
        os.close(root_fd)
    return summary


class _empty:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def undo(rootfs: Path, journal: Journal) -> None:
    """Put back what apply changed: remove what it made, rename back what it set aside, drop the journal."""
    root_fd = _open_root(rootfs)
    try:
        for rel in reversed(journal.created):
            try:
                dfd, name = _open_parent(root_fd, rel, create=False)
            except (FileNotFoundError, NotADirectoryError, RootfsError):
                continue
            try:
                _remove_at(dfd, name)
            except FileNotFoundError:
                pass
            finally:
                os.close(dfd)
        for rel, (mode, uid, gid, _, _) in reversed(journal.removed_dirs):  # parents first
            dfd, name = _open_parent(root_fd, rel, create=True)
            try:
                os.mkdir(name, 0o700, dir_fd=dfd)
                os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
                os.chmod(name, mode, dir_fd=dfd)
            finally:
                os.close(dfd)
        if journal.saved:
            afd = journal._aside_fd(root_fd)
            try:
                for slot, rel in enumerate(journal.saved):
                    dfd, name = _open_parent(root_fd, rel, create=True)
                    try:
                        try:
                            _remove_at(dfd, name)
                        except FileNotFoundError:
                            pass
                        os.rename(str(slot), name, src_dir_fd=afd, dst_dir_fd=dfd)
                    finally:
                        os.close(dfd)
            finally:
                os.close(afd)
        for rel, (mode, uid, gid, atime, mtime) in [*journal.removed_dirs, *journal.dir_meta.items()]:
            try:
                dfd, name = _open_parent(root_fd, rel, create=False)
            except (FileNotFoundError, NotADirectoryError, RootfsError):
                continue
            try:
                os.chmod(name, mode, dir_fd=dfd)
                os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
                os.utime(name, ns=(atime, mtime), dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            finally:
                os.close(dfd)
    finally:
        os.close(root_fd)
    err = journal.commit()  # the journal dir, empty by now
    if err:
        raise OSError(err)
