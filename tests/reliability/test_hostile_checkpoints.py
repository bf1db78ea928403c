"""Hostile or damaged checkpoints, end to end: a real checkpoint is made once, then each case damages a
fresh copy of it and creates a new container of the same id through the runtime.

Expect for every case: refused before anything touches the new rootfs or CRIU (the rootfs is byte-for-byte
as before `create`, no restore phase ran, a canary outside the rootfs is intact), a cold start that works,
and a log line naming the offending entry.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Callable

import pytest
from reliability_lib import (RNode, ann, count, drop_seal, make_checkpoint, new_node, reseal_manifest, rootfs_listing,
                      write_meta)

pytestmark = [pytest.mark.reliability]
CID = "hostile"


@pytest.fixture(scope="module")
def hnode(tmp_path_factory):
    n = new_node(tmp_path_factory, "hostile")
    n.dumped = make_checkpoint(n, CID)
    n.pristine = n.base / "pristine"
    subprocess.run(["cp", "-a", str(n.store / CID), str(n.pristine)], check=True)
    n.canary = n.base / "canary"
    n.canary.mkdir()
    (n.canary / "victim").write_text("must survive\n")
    yield n
    n.cleanup()


def reset(n: RNode) -> Path:
    path = n.store / CID
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
    subprocess.run(["cp", "-a", str(n.pristine), str(path)], check=True)
    drop_seal(n, CID)
    (n.store / ".quarantine" / f"{CID}.json").unlink(missing_ok=True)
    n.store_root.chmod(0o700)
    n.store.chmod(0o700)
    return path


def first(path: Path, glob: str) -> Path:
    return sorted(path.glob(glob))[0]


# -- damages: each returns the text the refusal must contain ----------------------

def truncate_pages(p: Path, n: RNode) -> str:
    f = first(p, "pages-*.img")
    st = f.stat()
    os.truncate(f, st.st_size // 2)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    return f.name


def bitflip_pages(p: Path, n: RNode) -> str:
    f = first(p, "pages-*.img")
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x01
    f.write_bytes(bytes(data))
    return f"{f.name}: SHA-256 mismatch"


def truncate_core(p: Path, n: RNode) -> str:
    f = first(p, "core-*.img")
    f.write_bytes(f.read_bytes()[:16])
    return f.name


def tamper_metadata(p: Path, n: RNode) -> str:
    meta = json.loads((p / "metadata.json").read_text())
    meta["container"]["args"] = ["python3", "/evil.py"]
    (p / "metadata.json").write_text(json.dumps(meta))
    return "metadata.json: SHA-256 differs"


def _meta_edit(fn: Callable[[dict], None]) -> Callable[[Path, RNode], None]:
    def damage(p: Path, n: RNode) -> None:
        meta = json.loads((p / "metadata.json").read_text())
        fn(meta)
        write_meta(p, meta)  # consistent marker hash: only the content check can refuse it
    return damage


def manifest_escape(p: Path, n: RNode) -> str:
    _meta_edit(lambda m: m["manifest"].update({"../canary/victim": {"sha256": "0" * 64, "size": 13}}))(p, n)
    return "metadata field manifest"


def manifest_dotdot(p: Path, n: RNode) -> str:
    _meta_edit(lambda m: m["manifest"].update({"..": {"sha256": "0" * 64, "size": 1}}))(p, n)
    return "metadata field manifest"


def manifest_control_file(p: Path, n: RNode) -> str:
    _meta_edit(lambda m: m["manifest"].update({"checkpoint.done": {"sha256": "0" * 64, "size": 1}}))(p, n)
    return "checkpoint.done: manifest entry is not a plain file name"


def manifest_ghost(p: Path, n: RNode) -> str:
    _meta_edit(lambda m: m["manifest"].update({"ghost.img": {"sha256": "0" * 64, "size": 1}}))(p, n)
    return "ghost.img: listed in the manifest but missing"


def metadata_other_id(p: Path, n: RNode) -> str:
    _meta_edit(lambda m: m.update(id="someone-else"))(p, n)
    return "does not match directory"


def metadata_not_schema(p: Path, n: RNode) -> str:
    _meta_edit(lambda m: m.update(schema_version=99))(p, n)
    return "metadata field schema_version"


def extra_file(p: Path, n: RNode) -> str:
    (p / "evil.img").write_bytes(b"x")
    os.chmod(p / "evil.img", 0o600)
    return "evil.img: file not in the manifest"


def marker_symlink(p: Path, n: RNode) -> str:
    real = n.base / "marker-elsewhere"
    shutil.copy(p / "checkpoint.done", real)
    (p / "checkpoint.done").unlink()
    (p / "checkpoint.done").symlink_to(real)
    return "checkpoint.done: is a symlink"


def marker_failure(p: Path, n: RNode) -> str:
    m = json.loads((p / "checkpoint.done").read_text())
    m["success"] = False
    (p / "checkpoint.done").write_text(json.dumps(m))
    return "success: true"


def dir_symlink(p: Path, n: RNode) -> str:
    elsewhere = n.base / "ckpt-elsewhere"
    shutil.rmtree(elsewhere, ignore_errors=True)
    os.rename(p, elsewhere)
    p.symlink_to(elsewhere)
    return "is a symlink; refusing to follow it"


def dir_not_root(p: Path, n: RNode) -> str:
    os.chown(p, 1000, 1000)
    return "owned by uid 1000"


def dir_world_writable(p: Path, n: RNode) -> str:
    p.chmod(0o777)
    return "writable by group/others"


def file_not_root(p: Path, n: RNode) -> str:
    f = first(p, "pages-*.img")
    os.chown(f, 1000, 1000)
    return f"{f.name}: owned by uid 1000"


def file_world_writable(p: Path, n: RNode) -> str:
    f = first(p, "core-*.img")
    f.chmod(0o666)
    return f"{f.name}: writable by group/others"


def image_symlink(p: Path, n: RNode) -> str:
    f = first(p, "pages-*.img")
    f.unlink()
    f.symlink_to("/etc/shadow")
    return f"{f.name}: not a regular file"


def metadata_fifo(p: Path, n: RNode) -> str:
    (p / "metadata.json").unlink()
    os.mkfifo(p / "metadata.json", 0o600)
    return "metadata.json: not a regular file"


def store_world_writable(p: Path, n: RNode) -> str:
    n.store_root.chmod(0o777)
    return "store root"


def _deleted(lines: bytes) -> Callable[[Path, RNode], None]:
    def damage(p: Path, n: RNode) -> None:
        (p / "deleted.files").write_bytes((p / "deleted.files").read_bytes() + lines)
        reseal_manifest(p)
    return damage


def _tar_add(*infos: tuple[tarfile.TarInfo, bytes | None]) -> Callable[[Path, RNode], None]:
    def damage(p: Path, n: RNode) -> None:
        tar_p = p / "rootfs-diff.tar"
        buf = io.BytesIO()
        with tarfile.open(tar_p) as old, tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as new:
            for m in old.getmembers():
                new.addfile(m, old.extractfile(m) if m.isreg() else None)
            for info, data in infos:
                if data is not None:
                    info.size = len(data)
                new.addfile(info, io.BytesIO(data) if data is not None else None)
        tar_p.write_bytes(buf.getvalue())
        os.chmod(tar_p, 0o600)
        reseal_manifest(p)
    return damage


def ti(name: str, type_: bytes = tarfile.REGTYPE, mode: int = 0o644, linkname: str = "", **kw) -> tarfile.TarInfo:
    t = tarfile.TarInfo(name)
    t.type, t.mode, t.linkname = type_, mode, linkname
    for k, v in kw.items():
        setattr(t, k, v)
    return t


def garbage_tar(p: Path, n: RNode) -> str:
    (p / "rootfs-diff.tar").write_bytes(b"\x00garbage" + os.urandom(700))
    reseal_manifest(p)
    return "rootfs-diff.tar: unreadable"


def with_needle(damage: Callable[[Path, RNode], None], needle: str) -> Callable[[Path, RNode], str]:
    def f(p: Path, n: RNode) -> str:
        damage(p, n)
        return needle
    f.__name__ = damage.__name__
    return f


STORE_CASES = {f.__name__: f for f in [
    truncate_pages, bitflip_pages, truncate_core, tamper_metadata, manifest_escape, manifest_dotdot,
    manifest_control_file, manifest_ghost, metadata_other_id, metadata_not_schema, extra_file, marker_symlink,
    marker_failure, dir_symlink, dir_not_root, dir_world_writable, file_not_root, file_world_writable,
    image_symlink, metadata_fifo, store_world_writable]}

ROOTFS_CASES = {
    "deleted_dotdot": with_needle(_deleted(b"../../../../canary/victim\n"), "'../../../../canary/victim'"),
    "deleted_absolute": with_needle(_deleted(b"/etc/hostname\n"), "'/etc/hostname'"),
    "deleted_inner_dotdot": with_needle(_deleted(b"etc/../../canary\n"), "'etc/../../canary'"),
    "deleted_nul": with_needle(_deleted(b"etc/host\x00name\n"), "deleted.files: contains NUL"),
    "deleted_not_utf8": with_needle(_deleted(b"etc/\xff\xfe\n"), "deleted.files: not UTF-8"),
    "deleted_rootfs_itself": with_needle(_deleted(b"./\n"), "names the rootfs itself"),
    "tar_dotdot": with_needle(_tar_add((ti("../escape.txt"), b"x")), "'../escape.txt'"),
    "tar_absolute": with_needle(_tar_add((ti("/abs.txt"), b"x")), "'/abs.txt'"),
    "tar_symlink_escape": with_needle(_tar_add((ti("data/out", tarfile.SYMTYPE, linkname="../../canary"), None)),
                                      "symlink to '../../canary' escapes"),
    "tar_through_symlink": with_needle(_tar_add((ti("evil", tarfile.SYMTYPE, linkname="/"), None),
                                                (ti("evil/etc/x"), b"x")), "goes through the non-directory entry 'evil'"),
    "tar_chardev": with_needle(_tar_add((ti("data/mem", tarfile.CHRTYPE, devmajor=1, devminor=1), None)),
                               "'data/mem': type"),
    "tar_blockdev": with_needle(_tar_add((ti("data/sda", tarfile.BLKTYPE, devmajor=8, devminor=0), None)),
                                "'data/sda': type"),
    "tar_fifo": with_needle(_tar_add((ti("data/fifo", tarfile.FIFOTYPE), None)), "'data/fifo': type"),
    "tar_hardlink": with_needle(_tar_add((ti("data/hl", tarfile.LNKTYPE, linkname="etc/hostname"), None)),
                                "'data/hl': type"),
    "tar_setuid": with_needle(_tar_add((ti("data/suid", mode=0o4755), b"#!/bin/sh\n")), "'data/suid': setuid"),
    "tar_setgid": with_needle(_tar_add((ti("data/sgid", mode=0o2755), b"#!/bin/sh\n")), "'data/sgid': setuid"),
    "tar_garbage": garbage_tar,
}


def _run_case(n: RNode, name: str, damage: Callable[[Path, RNode], str], rootfs_level: bool) -> None:
    path = reset(n)
    needle = damage(path, n)
    c = n.ctr(f"h-{name.replace('_', '-')}"[:60], ann(CID, "restore-only"))
    rootfs = c.bundle / "rootfs"
    listing = rootfs_listing(rootfs)
    since = len(n.runtime_log())
    c.create()
    assert rootfs_listing(rootfs) == listing, "the new rootfs was touched by a refused checkpoint"
    assert (n.canary / "victim").read_text() == "must survive\n"
    recs = [r for r in n.runtime_log()[since:] if r.get("msg", "").startswith("cold start:")]
    assert recs, n.log_msgs(since)
    msg, phases = recs[-1]["msg"], recs[-1].get("phases") or {}
    assert "refused" in msg and needle in msg, f"{name}: expected {needle!r} in {msg!r}"
    assert "restore" not in phases, f"CRIU ran for a refused checkpoint: {phases}"
    if not rootfs_level:
        assert "rootfs" not in phases, phases
    assert not (n.base / "logs" / f"restore-{c.id}.log").exists(), "CRIU's restore log exists: CRIU ran"
    c.start()
    ready = c.readline()
    assert ready["event"] == "ready" and ready["random"] != n.dumped["random"], "not a cold start"
    c.stop()
    c.delete()
    q = n.store / ".quarantine" / f"{CID}.json"
    assert not q.exists() or not json.loads(q.read_text()).get("quarantined")
    count("hostile.checkpoints")


@pytest.mark.parametrize("name", sorted(STORE_CASES))
def test_damaged_checkpoint_refused(hnode: RNode, name: str):
    _run_case(hnode, name, STORE_CASES[name], rootfs_level=False)


@pytest.mark.parametrize("name", sorted(ROOTFS_CASES))
def test_hostile_rootfs_diff_refused(hnode: RNode, name: str):
    _run_case(hnode, name, ROOTFS_CASES[name], rootfs_level=True)


def test_deletion_through_a_symlink_in_the_new_rootfs_stays_inside(hnode: RNode):
    """deleted.files names `link/victim` where the *new* rootfs has `link -> <canary dir>` (absolute, host path):
    the apply walk never follows it, whatever the outcome of the restore."""
    path = reset(hnode)
    (path / "deleted.files").write_bytes(b"link/victim\n")
    reseal_manifest(path)
    c = hnode.ctr("h-link", ann(CID, "restore-only"))
    (c.bundle / "rootfs" / "link").symlink_to(hnode.canary)
    c.create()
    count("hostile.checkpoints")
    assert (hnode.canary / "victim").read_text() == "must survive\n", "a deletion followed a symlink out of the rootfs"
    assert (c.bundle / "rootfs" / "link").is_symlink()
    c.start()
    c.stop()
    c.delete()


def test_pristine_copy_still_restores(hnode: RNode):
    """Control: the undamaged copy restores, so every refusal above is due to its damage."""
    reset(hnode)
    c = hnode.ctr("h-control", ann(CID, "restore-only"))
    c.create()
    c.start()
    got = c.ask()
    assert got["random"] == hnode.dumped["random"] and got["counter"] == hnode.dumped["counter"] + 1
    c.stop()
    c.delete()
