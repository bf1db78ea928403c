"""Rootfs diff: capture (overlay upper dir and plain-dir baseline), hostile-input validation, apply and undo."""
from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest

from warmstart import rootfs as R
from warmstart.rootfs import Journal, RootfsError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (overlay mounts, chown)")


# -- helpers ---------------------------------------------------------------------------

def tree(root: Path, mtimes: bool = False) -> dict[str, tuple]:
    """Everything under root, never following symlinks: type, mode, owner, content or target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p), st.st_uid, st.st_gid)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, p.read_bytes(),
                            *([st.st_mtime_ns] if mtimes else []))
            else:
                out[rel] = ("other", st.st_mode, st.st_rdev)
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
    return out


def make_lower(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "keep.txt").write_text("keep")
    (d / "mod.txt").write_text("old")
    (d / "del.txt").write_text("bye")
    (d / "deldir" / "sub").mkdir(parents=True)
    (d / "deldir" / "a").write_text("a")
    (d / "deldir" / "sub" / "b").write_text("b")
    (d / "sub").mkdir()
    (d / "sub" / "inner.txt").write_text("inner")
    (d / "lib").mkdir()
    (d / "lib" / "old.so").write_text("old lib")
    (d / "etc").mkdir()
    (d / "etc" / "passwd").write_text("root:x:0:0\n")
    return d


def mutate(m: Path) -> None:
    """The container's changes, made through the merged view (or on the plain dir)."""
    (m / "new.txt").write_text("new")
    (m / "mod.txt").write_text("modified")
    (m / "del.txt").unlink()
    shutil.rmtree(m / "deldir")
    (m / "link").symlink_to("keep.txt")
    (m / "sub" / "newinner.txt").write_text("fresh")
    shutil.rmtree(m / "lib")  # recreated: an opaque dir on overlay
    (m / "lib").mkdir()
    (m / "lib" / "new.so").write_text("new lib")
    (m / "newdir" / "deep").mkdir(parents=True)
    (m / "newdir" / "deep" / "f").write_text("deep")
    os.chmod(m / "new.txt", 0o640)


def tar_names(p: Path) -> set[str]:
    with tarfile.open(p) as t:
        return {m.name for m in t.getmembers()}


@pytest.fixture
def overlay(tmp_path, mounts):
    """(lower, upper, merged) on a private tmpfs; both mounts are undone at teardown."""
    base = mounts("-t", "tmpfs", "tmpfs", target=tmp_path / "t")
    lower = make_lower(base / "lower")
    upper, work = base / "upper", base / "work"
    upper.mkdir()
    work.mkdir()
    merged = mounts("-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}",
                    target=base / "merged")
    return lower, upper, merged


# -- capture -------------------------------------------------------------------------------

def test_overlay_upperdir_found(overlay, tmp_path):
    lower, upper, merged = overlay
    assert R.overlay_upperdir(merged) == upper
    assert R.overlay_upperdir(lower) is None


def test_capture_overlay(overlay, tmp_path):
    lower, upper, merged = overlay
    mutate(merged)
    # the kernel's whiteouts are 0/0 char devices in the upper dir
    assert stat.S_ISCHR((upper / "del.txt").lstat().st_mode) and (upper / "del.txt").lstat().st_rdev == 0
    tar, deleted = tmp_path / "diff.tar", tmp_path / "deleted.files"
    summary = R.capture(merged, None, tar, deleted)
    names = tar_names(tar)
    assert {"new.txt", "mod.txt", "link", "sub/newinner.txt", "lib", "lib/new.so",
            "newdir", "newdir/deep", "newdir/deep/f"} <= names
    assert not names & {"keep.txt", "sub/inner.txt", "del.txt", "deldir", "etc", "lib/old.so"}
    assert set(deleted.read_text().splitlines()) == {"del.txt", "deldir", "lib"}
    assert summary.deleted == 3 and summary.files == len(names)
    with tarfile.open(tar) as t:
        assert t.getmember("link").issym() and t.getmember("link").linkname == "keep.txt"
        assert t.extractfile("mod.txt").read() == b"modified"
        assert t.getmember("new.txt").mode == 0o640


def test_capture_overlay_then_apply_reproduces_merged(overlay, tmp_path):
    lower, upper, merged = overlay
    mutate(merged)
    want = tree(merged)
    tar, deleted = tmp_path / "diff.tar", tmp_path / "deleted.files"
    R.capture(merged, None, tar, deleted)
    target = tmp_path / "target"
    shutil.copytree(lower, target, symlinks=True)
    before = tree(target, mtimes=True)
    journal = Journal(backup=tmp_path / "backup")
    R.apply(target, tar, deleted, journal)
    assert tree(target) == want
    R.undo(target, journal)
    assert tree(target, mtimes=True) == before


def test_apply_reproduces_chmod_of_existing_dir(overlay, tmp_path):
    lower, upper, merged = overlay
    os.chmod(merged / "sub", 0o700)
    tar, deleted = tmp_path / "diff.tar", tmp_path / "deleted.files"
    R.capture(merged, None, tar, deleted)
    assert "sub" in tar_names(tar)
    target = tmp_path / "target"
    shutil.copytree(lower, target, symlinks=True)
    R.apply(target, tar, deleted, Journal(backup=tmp_path / "backup"))
    assert stat.S_IMODE((target / "sub").stat().st_mode) == 0o700


def test_apply_new_dir_mode_ignores_umask(tmp_path):
    target = tmp_path / "rootfs"
    target.mkdir()
    tar = make_tar(tmp_path / "d.tar", [dict(name="shared", type=tarfile.DIRTYPE, mode=0o1777)])
    old = os.umask(0o022)
    try:
        R.apply(target, tar, tmp_path / "none", Journal(backup=tmp_path / "backup"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((target / "shared").lstat().st_mode) == 0o1777


def test_capture_plain_dir_with_baseline(tmp_path):
    root = make_lower(tmp_path / "rootfs")
    pristine = tmp_path / "pristine"
    shutil.copytree(root, pristine, symlinks=True)
    baseline = tmp_path / "baseline.json"
    R.take_baseline(root, baseline)
    mutate(root)
    # a same-size rewrite with the old mtime is still seen (ctime)
    st = (root / "keep.txt").stat()
    (root / "keep.txt").write_text("KEEP")
    os.utime(root / "keep.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    want = tree(root)
    tar, deleted = tmp_path / "diff.tar", tmp_path / "deleted.files"
    R.capture(root, baseline, tar, deleted)
    names = tar_names(tar)
    assert {"new.txt", "mod.txt", "link", "keep.txt", "sub/newinner.txt", "lib/new.so", "newdir/deep/f"} <= names
    assert "sub/inner.txt" not in names and "etc/passwd" not in names
    dels = deleted.read_text().splitlines()
    assert "del.txt" in dels and "deldir" in dels
    assert not any(d.startswith("deldir/") for d in dels)  # only top-most deletions
    journal = Journal(backup=tmp_path / "backup")
    R.apply(pristine, tar, deleted, journal)
    assert tree(pristine) == want


def test_capture_plain_dir_needs_baseline(tmp_path):
    root = make_lower(tmp_path / "rootfs")
    with pytest.raises(RootfsError, match="baseline"):
        R.capture(root, None, tmp_path / "d.tar", tmp_path / "deleted")
    with pytest.raises(RootfsError, match="baseline"):
        R.capture(root, tmp_path / "missing.json", tmp_path / "d.tar", tmp_path / "deleted")


# -- hostile inputs ----------------------------------------------------------------------------

def make_tar(path: Path, members: list[dict]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for spec in members:
            spec = dict(spec)
            data = spec.pop("data", None)
            info = tarfile.TarInfo(spec.pop("name"))
            info.mode = spec.pop("mode", 0o644)
            for k, v in spec.items():
                setattr(info, k, v)
            if data is not None:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            else:
                t.addfile(info)
    return path


@pytest.fixture
def victim(tmp_path):
    """A target rootfs, an outside dir that must stay empty, and a checker."""
    root = make_lower(tmp_path / "rootfs")
    outside = tmp_path / "outside"
    outside.mkdir()
    return root, outside


def _assert_refused(root: Path, outside: Path, tmp_path: Path, tar: Path | None, deleted: Path | None,
                    needle: str | None = None) -> None:
    before = tree(root, mtimes=True)
    no = tmp_path / "absent"
    with pytest.raises(RootfsError, match=needle):
        R.apply(root, tar or no, deleted or no, Journal(backup=tmp_path / "backup"))
    assert tree(root, mtimes=True) == before
    assert list(outside.iterdir()) == []


F = tarfile.REGTYPE
HOSTILE_TARS = {
    "dotdot": [dict(name="../outside/evil", data=b"x")],
    "dotdot-inner": [dict(name="sub/../../outside/evil", data=b"x")],
    "absolute": [dict(name="/etc/evil", data=b"x")],
    "chardev": [dict(name="dev-null", type=tarfile.CHRTYPE, devmajor=1, devminor=3)],
    "blockdev": [dict(name="sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0)],
    "fifo": [dict(name="pipe", type=tarfile.FIFOTYPE)],
    "hardlink": [dict(name="hl", type=tarfile.LNKTYPE, linkname="etc/passwd")],
    "setuid": [dict(name="suid", data=b"#!/bin/sh\n", mode=0o4755)],
    "setgid": [dict(name="sgid", data=b"x", mode=0o2755)],
    "symlink-escape": [dict(name="a/b", type=tarfile.SYMTYPE, linkname="../../../etc")],
    "symlink-escape-top": [dict(name="up", type=tarfile.SYMTYPE, linkname="..")],
    "empty-name": [dict(name="", data=b"x")],
    "dot": [dict(name=".", type=tarfile.DIRTYPE, mode=0o777)],
    "newline": [dict(name="a\nb", data=b"x")],
    # a good member first: validation must refuse the whole archive before writing the first one
    "good-then-bad": [dict(name="zzz-good", data=b"x"), dict(name="../evil", data=b"x")],
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TARS))
def test_hostile_tar_refused_before_any_write(victim, tmp_path, case):
    root, outside = victim
    tar = make_tar(tmp_path / "diff.tar", HOSTILE_TARS[case])
    _assert_refused(root, outside, tmp_path, tar, None)


def test_garbage_tar_refused(victim, tmp_path):
    root, outside = victim
    (tmp_path / "diff.tar").write_bytes(b"not a tar at all" * 100)
    _assert_refused(root, outside, tmp_path, tmp_path / "diff.tar", None, "rootfs-diff.tar")


THROUGH_SYMLINK = {
    "relative": [dict(name="lnk", type=tarfile.SYMTYPE, linkname="sub"), dict(name="lnk/evil", data=b"x")],
    "absolute": [dict(name="lnk", type=tarfile.SYMTYPE, linkname="/OUTSIDE"), dict(name="lnk/evil", data=b"x")],
    "file-parent": [dict(name="plain", data=b"x"), dict(name="plain/evil", data=b"x")],
}


@pytest.mark.parametrize("case", sorted(THROUGH_SYMLINK))
def test_member_through_earlier_symlink_never_escapes(victim, tmp_path, case):
    root, outside = victim
    members = [dict(m, linkname=str(outside)) if m.get("linkname") == "/OUTSIDE" else m
               for m in THROUGH_SYMLINK[case]]
    tar = make_tar(tmp_path / "diff.tar", members)
    with pytest.raises(RootfsError):
        R.apply(root, tar, tmp_path / "absent", Journal(backup=tmp_path / "backup"))
    assert list(outside.iterdir()) == []
    assert not (root / "sub" / "evil").exists()


@pytest.mark.parametrize("case", sorted(THROUGH_SYMLINK))
def test_member_through_earlier_symlink_refused_before_any_write(victim, tmp_path, case):
    root, outside = victim
    members = [dict(m, linkname=str(outside)) if m.get("linkname") == "/OUTSIDE" else m
               for m in THROUGH_SYMLINK[case]]
    _assert_refused(root, outside, tmp_path, make_tar(tmp_path / "diff.tar", members), None)


@pytest.mark.parametrize("content", [b"../x\n", b"/etc/passwd\n", b"ok.txt\nsub/../../x\n", b"etc/pa\x00sswd\n",
                                     b"\xff\xfe\n", b".\n", b"keep.txt\n../../outside\n"])
def test_hostile_deleted_files_refused(victim, tmp_path, content):
    root, outside = victim
    (tmp_path / "deleted.files").write_bytes(content)
    (outside / "x").write_text("precious")  # must survive
    before_out = tree(outside)
    before = tree(root, mtimes=True)
    with pytest.raises(RootfsError):
        R.apply(root, tmp_path / "absent", tmp_path / "deleted.files", Journal(backup=tmp_path / "backup"))
    assert tree(root, mtimes=True) == before
    assert tree(outside) == before_out


def test_good_deletions_with_hostile_tar_do_nothing(victim, tmp_path):
    """deleted.files is valid but the tar is not: not even the deletions may happen."""
    root, outside = victim
    (tmp_path / "deleted.files").write_text("keep.txt\ndeldir\n")
    tar = make_tar(tmp_path / "diff.tar", [dict(name="../evil", data=b"x")])
    _assert_refused(root, outside, tmp_path, tar, tmp_path / "deleted.files")


def test_existing_symlink_in_rootfs_not_followed(victim, tmp_path):
    root, outside = victim
    shutil.rmtree(root / "etc")
    (root / "etc").symlink_to(outside)
    (outside / "passwd").write_text("host passwd")
    tar = make_tar(tmp_path / "diff.tar", [dict(name="etc/x", data=b"evil")])
    with pytest.raises(RootfsError, match="etc"):
        R.apply(root, tar, tmp_path / "absent", Journal(backup=tmp_path / "backup"))
    assert sorted(p.name for p in outside.iterdir()) == ["passwd"]
    # deletions through it: refused, host file kept
    (tmp_path / "deleted.files").write_text("etc/passwd\n")
    with pytest.raises(RootfsError):
        R.apply(root, tmp_path / "absent", tmp_path / "deleted.files", Journal(backup=tmp_path / "backup2"))
    assert (outside / "passwd").read_text() == "host passwd"
    # an absolute symlink in the rootfs (e.g. etc/mtab -> /proc/mounts) is replaced, not written through
    (outside / "target").write_text("host")
    (root / "abs").symlink_to(outside / "target")
    tar2 = make_tar(tmp_path / "d2.tar", [dict(name="abs", data=b"inside")])
    R.apply(root, tar2, tmp_path / "absent", Journal(backup=tmp_path / "backup3"))
    assert (outside / "target").read_text() == "host"
    assert not (root / "abs").is_symlink() and (root / "abs").read_bytes() == b"inside"


def test_tame_symlinks_allowed(victim, tmp_path):
    root, outside = victim
    tar = make_tar(tmp_path / "diff.tar", [
        dict(name="sub/up", type=tarfile.SYMTYPE, linkname="../keep.txt"),
        dict(name="abs", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
        dict(name="./dotted", data=b"d"),
    ])
    R.apply(root, tar, tmp_path / "absent", Journal(backup=tmp_path / "backup"))
    assert os.readlink(root / "sub" / "up") == "../keep.txt"
    assert os.readlink(root / "abs") == "/etc/passwd"
    assert (root / "dotted").read_bytes() == b"d"


# -- undo ---------------------------------------------------------------------------------------

def test_undo_restores_exactly(victim, tmp_path):
    root, outside = victim
    before = tree(root, mtimes=True)
    (tmp_path / "deleted.files").write_text("del.txt\ndeldir\nnot-there\n")
    tar = make_tar(tmp_path / "diff.tar", [
        dict(name="mod.txt", data=b"changed", mode=0o600, uid=1000, gid=1000),
        dict(name="keep.txt", type=tarfile.SYMTYPE, linkname="mod.txt"),
        dict(name="brand", type=tarfile.DIRTYPE, mode=0o755),
        dict(name="brand/new", data=b"n"),
        dict(name="deldir", type=tarfile.DIRTYPE, mode=0o700),
        dict(name="deldir/replaced", data=b"r"),
    ])
    journal = Journal(backup=tmp_path / "backup")
    R.apply(root, tar, tmp_path / "deleted.files", journal)
    assert (root / "mod.txt").read_bytes() == b"changed" and (root / "keep.txt").is_symlink()
    assert not (root / "del.txt").exists() and sorted(os.listdir(root / "deldir")) == ["replaced"]
    R.undo(root, journal)
    assert tree(root, mtimes=True) == before
    assert not journal.backup.exists()


def test_undo_removes_implicit_parent_dirs(victim, tmp_path):
    root, outside = victim
    before = tree(root, mtimes=True)
    tar = make_tar(tmp_path / "diff.tar", [dict(name="implicit/deeper/file", data=b"x")])
    journal = Journal(backup=tmp_path / "backup")
    R.apply(root, tar, tmp_path / "absent", journal)
    R.undo(root, journal)
    assert tree(root, mtimes=True) == before


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_undo_restores_non_dir_replaced_by_dir(victim, tmp_path, kind):
    root, outside = victim
    if kind == "file":
        (root / "thing").write_text("was a file")
    else:
        (root / "thing").symlink_to("sub")
    before = tree(root, mtimes=True)
    tar = make_tar(tmp_path / "diff.tar", [dict(name="thing", type=tarfile.DIRTYPE, mode=0o755)])
    journal = Journal(backup=tmp_path / "backup")
    R.apply(root, tar, tmp_path / "absent", journal)
    assert (root / "thing").is_dir() and not (root / "thing").is_symlink()
    R.undo(root, journal)
    assert tree(root, mtimes=True) == before


def test_undo_after_duplicate_members(victim, tmp_path):
    root, outside = victim
    before = tree(root, mtimes=True)
    tar = make_tar(tmp_path / "diff.tar", [dict(name="dup", data=b"one"), dict(name="dup", data=b"two")])
    journal = Journal(backup=tmp_path / "backup")
    R.apply(root, tar, tmp_path / "absent", journal)
    assert (root / "dup").read_bytes() == b"two"
    R.undo(root, journal)
    assert tree(root, mtimes=True) == before


def test_undo_restores_existing_dir_owner(victim, tmp_path):
    root, outside = victim
    before = tree(root)
    tar = make_tar(tmp_path / "diff.tar", [dict(name="sub", type=tarfile.DIRTYPE, mode=0o755, uid=4321, gid=4321)])
    journal = Journal(backup=tmp_path / "backup")
    R.apply(root, tar, tmp_path / "absent", journal)
    R.undo(root, journal)
    assert tree(root) == before
