"""The helpers that keep a container's files from redirecting root (issue 11, item 6).

rootfs.open_regular (no symlink, no FIFO wait, no device, same inode as listed), the capture's fd walk
under a racing swap, the rename journal (no copy, bounded, dropped on commit, undone exactly, also on an
overlay that cannot rename a lower dir), and seed.write_in_container (the container's own rights, only a
regular file, bounded in time).
"""
from __future__ import annotations

import errno
import os
import signal
import stat
import tarfile
import time
from pathlib import Path

import pytest

from warmstart import rootfs as R
from warmstart import dynamo_protocol as seed
from warmstart.rootfs import Journal, RootfsError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot, mknod, setuid, mounts)")


def tree(root: Path) -> dict[str, tuple]:
    """Everything under root, never following symlinks: type, mode, owner, inode, content or target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            what = os.readlink(p) if p.is_symlink() else p.read_bytes() if stat.S_ISREG(st.st_mode) else None
            out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, what)
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
    return out


# -- open_regular ---------------------------------------------------------------------------------

@pytest.fixture
def dirfd(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    yield d, fd
    os.close(fd)


def test_open_regular_reads_and_creates(dirfd):
    d, fd = dirfd
    (d / "f").write_text("hello")
    f, st = R.open_regular(fd, "f", os.O_RDONLY)
    assert os.read(f, 10) == b"hello" and stat.S_ISREG(st.st_mode)
    os.close(f)
    f, st = R.open_regular(fd, "new", os.O_WRONLY, create_mode=0o600)
    os.close(f)
    assert stat.S_IMODE((d / "new").stat().st_mode) == 0o600


@pytest.mark.parametrize("kind", ["symlink", "fifo", "chardev", "dir"])
def test_open_regular_refuses_what_is_not_a_regular_file(dirfd, kind):
    d, fd = dirfd
    (d / "target").write_text("not this")
    if kind == "symlink":
        (d / "x").symlink_to(d / "target")
    elif kind == "fifo":
        os.mkfifo(d / "x")
    elif kind == "chardev":
        os.mknod(d / "x", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null
    else:
        (d / "x").mkdir()
    t0 = time.monotonic()
    for create in (None, 0o644):
        with pytest.raises(RootfsError):
            R.open_regular(fd, "x", os.O_WRONLY, create_mode=create)
    assert time.monotonic() - t0 < 2, "waited on the FIFO"
    assert (d / "target").read_text() == "not this"


def test_open_regular_refuses_a_file_replaced_since_it_was_listed(dirfd):
    d, fd = dirfd
    (d / "f").write_text("listed")
    listed = os.stat("f", dir_fd=fd, follow_symlinks=False)
    (d / "f").rename(d / "f.old")  # kept: its inode number cannot be reused for the new file
    (d / "f").write_text("another inode")
    with pytest.raises(RootfsError, match="replaced"):
        R.open_regular(fd, "f", os.O_RDONLY, same_as=listed)


# -- capture under a racing container ---------------------------------------------------------------

def _racy_rootfs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A plain rootfs with a baseline, then the container's files: a.bin (read first), d/secret; a host secret."""
    root = tmp_path / "rootfs"
    (root / "data").mkdir(parents=True)
    baseline = tmp_path / "baseline.json"
    R.take_baseline(root, baseline)
    (root / "data" / "a.bin").write_bytes(b"a" * 1000)
    (root / "data" / "d").mkdir()
    (root / "data" / "d" / "secret").write_text("the container's own\n")
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret").write_text("HOST SECRET\n")
    return root, baseline, host


def _swap_when_opening(monkeypatch, name: str, swap) -> None:
    real = R.open_regular

    def racing(dir_fd, n, flags, **kw):
        if n == name:
            swap()
        return real(dir_fd, n, flags, **kw)
    monkeypatch.setattr(R, "open_regular", racing)


def test_capture_refuses_a_dir_swapped_for_a_symlink_after_its_listing(tmp_path, monkeypatch):
    root, baseline, host = _racy_rootfs(tmp_path)

    def swap():  # while a.bin is read, data/d (listed as a dir) becomes a symlink to the host
        (root / "data" / "d").rename(root / "data" / "d.real")
        (root / "data" / "d").symlink_to(host)
    _swap_when_opening(monkeypatch, "a.bin", swap)
    with pytest.raises(RootfsError, match="data/d"):
        R.capture(root, baseline, tmp_path / "diff.tar", tmp_path / "deleted")
    assert b"HOST SECRET" not in (tmp_path / "diff.tar").read_bytes()


def test_capture_swap_after_the_dir_was_opened_reads_the_container_s_own_file(tmp_path, monkeypatch):
    root, baseline, host = _racy_rootfs(tmp_path)

    def swap():
        (root / "data" / "d").rename(root / "data" / "d.real")
        (root / "data" / "d").symlink_to(host)
    _swap_when_opening(monkeypatch, "secret", swap)
    R.capture(root, baseline, tmp_path / "diff.tar", tmp_path / "deleted")
    with tarfile.open(tmp_path / "diff.tar") as t:
        assert t.extractfile("data/d/secret").read() == b"the container's own\n"


def test_capture_refuses_a_file_swapped_for_a_symlink(tmp_path, monkeypatch):
    root, baseline, host = _racy_rootfs(tmp_path)

    def swap():
        (root / "data" / "d" / "secret").unlink()
        (root / "data" / "d" / "secret").symlink_to(host / "secret")
    _swap_when_opening(monkeypatch, "secret", swap)
    with pytest.raises(RootfsError, match="data/d/secret"):
        R.capture(root, baseline, tmp_path / "diff.tar", tmp_path / "deleted")
    assert b"HOST SECRET" not in (tmp_path / "diff.tar").read_bytes()


def test_capture_records_a_symlink_to_the_host_never_its_target(tmp_path):
    root, baseline, host = _racy_rootfs(tmp_path)
    (root / "data" / "escape").symlink_to(host)
    R.capture(root, baseline, tmp_path / "diff.tar", tmp_path / "deleted")
    with tarfile.open(tmp_path / "diff.tar") as t:
        assert t.getmember("data/escape").issym() and "data/escape/secret" not in t.getnames()
    assert b"HOST SECRET" not in (tmp_path / "diff.tar").read_bytes()


# -- the rename journal -------------------------------------------------------------------------

def _deleting(tmp_path: Path, *rels: str) -> Path:
    p = tmp_path / "deleted.files"
    p.write_text("".join(r + "\n" for r in rels))
    return p


def _rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "bundle" / "rootfs"
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "big").write_bytes(b"x" * 4096)
    (root / "dir" / "a").write_text("a")
    (root / "dir" / "sub" / "b").write_text("b")
    return root


def test_journal_renames_aside_copies_nothing_and_commit_drops_it(tmp_path):
    root = _rootfs(tmp_path)
    ino = (root / "big").stat().st_ino
    journal = Journal(tmp_path / "state" / "rootfs-backup")
    R.apply(root, tmp_path / "absent", _deleting(tmp_path, "big", "dir"), journal)
    assert not (root / "big").exists() and not (root / "dir").exists()
    parent, name = journal.aside
    assert parent == root.parent, "a plain-dir rootfs keeps its journal next to it, out of the container's sight"
    assert (parent / name / "0").stat().st_ino == ino, "set aside by a rename, not a copy"
    assert not (tmp_path / "state").exists(), "nothing written into the state dir"
    assert journal.commit() is None
    assert not (parent / name).exists() and sorted(os.listdir(root.parent)) == ["rootfs"]
    R.undo(root, journal)  # after commit: nothing left to undo
    assert not (root / "big").exists()


def test_journal_undo_renames_back_exactly(tmp_path):
    root = _rootfs(tmp_path)
    before = tree(root)
    journal = Journal()
    tar = tmp_path / "diff.tar"
    with tarfile.open(tar, "w") as t:
        info = tarfile.TarInfo("dir")
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        t.addfile(info)
    R.apply(root, tar, _deleting(tmp_path, "big", "dir"), journal)
    R.undo(root, journal)
    assert tree(root) == before
    assert sorted(os.listdir(root.parent)) == ["rootfs"], "the journal dir outlived undo"


def test_journal_is_bounded(tmp_path, monkeypatch):
    root = _rootfs(tmp_path)
    before = tree(root)
    monkeypatch.setattr(R, "JOURNAL_MAX_BYTES", 1024)
    journal = Journal()
    with pytest.raises(RootfsError, match="set aside more than"):
        R.apply(root, tmp_path / "absent", _deleting(tmp_path, "big"), journal)
    R.undo(root, journal)
    assert tree(root) == before


def test_journal_refuses_rather_than_copy_across_mounts(tmp_path, mounts):
    root = _rootfs(tmp_path)
    mounts("-t", "tmpfs", "tmpfs", target=root / "mnt")
    (root / "mnt" / "f").write_text("on another mount")
    journal = Journal()
    with pytest.raises(RootfsError, match="refusing the restore rather than copying"):
        R.apply(root, tmp_path / "absent", _deleting(tmp_path, "mnt/f"), journal)
    R.undo(root, journal)
    assert (root / "mnt" / "f").read_text() == "on another mount"


@pytest.fixture
def overlay(tmp_path, mounts):
    """An overlay rootfs whose lower dirs cannot be renamed (redirect_dir=off: EXDEV, as on most nodes)."""
    base = mounts("-t", "tmpfs", "tmpfs", target=tmp_path / "t")
    lower, upper, work = base / "lower", base / "upper", base / "work"
    (lower / "dir" / "sub").mkdir(parents=True)
    (lower / "dir" / "a").write_text("a")
    (lower / "dir" / "sub" / "b").write_text("b")
    (lower / "file").write_text("f")
    os.chmod(lower / "dir" / "sub", 0o750)
    upper.mkdir()
    work.mkdir()
    return mounts("-t", "overlay", "overlay", "-o",
                  f"lowerdir={lower},upperdir={upper},workdir={work},redirect_dir=off", target=base / "merged")


def test_journal_on_an_overlay_moves_a_lower_dir_entry_by_entry(overlay, tmp_path):
    merged = overlay
    before = tree(merged)
    try:
        os.rename(merged / "dir", merged / "probe")
        os.rename(merged / "probe", merged / "dir")
        pytest.skip("this overlay renames lower dirs: nothing to descend")
    except OSError as e:
        assert e.errno == errno.EXDEV
    journal = Journal()
    R.apply(merged, tmp_path / "absent", _deleting(tmp_path, "dir", "file"), journal)
    assert not (merged / "dir").exists() and not (merged / "file").exists()
    assert journal.aside[0] == merged, "another mount next to it: the journal sits at the rootfs's top"
    R.undo(merged, journal)
    assert tree(merged) == before
    # and a success leaves nothing behind in the container's view
    journal = Journal()
    R.apply(merged, tmp_path / "absent", _deleting(tmp_path, "dir"), journal)
    assert journal.commit() is None
    assert sorted(os.listdir(merged)) == ["file"]


# -- seed.write_in_container ----------------------------------------------------------------------

@pytest.fixture
def container(tmp_path):
    """A process chrooted into tmp_path/root (its /proc/PID/root), as root or as nobody."""
    root = tmp_path / "root"
    (root / "tmp").mkdir(parents=True)
    os.chmod(root / "tmp", 0o1777)
    (root / "etc").mkdir()
    (root / "etc" / "shadow").write_text("root-only\n")
    os.chmod(root / "etc" / "shadow", 0o600)
    pids = []

    def start(uid: int = 0) -> int:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.chroot(root)
                os.setgid(uid)
                os.setgroups([])
                os.setuid(uid)
                os.write(w, b"x")
                signal.pause()
            finally:
                os._exit(0)
        os.close(w)
        os.read(r, 1)
        os.close(r)
        pids.append(pid)
        return pid
    yield root, start
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_write_creates_a_regular_file_as_the_container_s_user(container):
    root, start = container
    pid = start(65534)
    seed.write_in_container(pid, "/tmp/a/b/marker.json", b'{"ok":true}')
    f = root / "tmp" / "a" / "b" / "marker.json"
    assert f.read_bytes() == b'{"ok":true}' and f.stat().st_uid == 65534
    f.write_text("a much longer previous content")
    seed.write_in_container(pid, "/tmp/a/b/marker.json", b"{}")
    assert f.read_bytes() == b"{}"


def test_write_has_no_more_rights_than_the_container(container):
    root, start = container
    pid = start(65534)
    with pytest.raises(seed.WriteRefused, match="Permission denied"):
        seed.write_in_container(pid, "/etc/shadow", b"{}")
    assert (root / "etc" / "shadow").read_text() == "root-only\n"
    with pytest.raises(seed.WriteRefused):
        seed.write_in_container(pid, "/etc/new", b"{}")
    assert not (root / "etc" / "new").exists()


@pytest.mark.parametrize("kind", ["fifo", "chardev", "symlink", "symlinked-parent", "dotdot"])
def test_write_refuses_what_is_not_a_plain_file(container, tmp_path, kind):
    root, start = container
    pid = start(0)
    outside = tmp_path / "outside"
    outside.mkdir()
    path = "/tmp/x"
    if kind == "fifo":
        os.mkfifo(root / "tmp" / "x")
    elif kind == "chardev":
        os.mknod(root / "tmp" / "x", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    elif kind == "symlink":
        (root / "tmp" / "x").symlink_to("/etc/shadow")
    elif kind == "symlinked-parent":
        (root / "tmp" / "lnk").symlink_to("/etc")
        path = "/tmp/lnk/shadow"
    else:
        path = "/tmp/../etc/shadow"
    t0 = time.monotonic()
    with pytest.raises(seed.WriteRefused):
        seed.write_in_container(pid, path, b"{}")
    assert time.monotonic() - t0 < 3
    assert (root / "etc" / "shadow").read_text() == "root-only\n"


def test_a_stuck_write_is_killed_at_the_timeout(container):
    root, start = container
    pid = start(0)
    t0 = time.monotonic()
    code, why = seed.run_in_container(pid, lambda: time.sleep(30), timeout_s=0.5)
    assert code == 124 and "timed out" in why and time.monotonic() - t0 < 3


def test_mark_restored_logs_a_refusal_and_carries_on(container):
    root, start = container
    pid = start(0)
    os.mkfifo(root / "tmp" / "marker")
    seen = []

    class Log:
        def warning(self, msg, **kw):
            seen.append(msg)
    spec = {"process": {"env": ["DYN_RESTORE_MARKER_FILE=/tmp/marker"]}}
    assert seed.mark_restored(pid, spec, "ck", log=Log()) is None
    assert seen and "DYN_RESTORE_MARKER_FILE" in seen[0] and "not a regular file" in seen[0]
