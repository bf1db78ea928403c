"""The checkpoint store: publish, verify (seal and hash), tamper detection, locks, gc, quarantine."""
from __future__ import annotations

import hashlib
import json
import time
import os
import subprocess
import sys
from pathlib import Path

import pytest

from warmstart import store as store_mod
from warmstart.config import Settings
from warmstart import signing
from warmstart.store import MARKER, METADATA, CheckpointError, Store

CID = "ck-1"
FILES = {"inventory.img": b"\x01inventory" * 10, "pages-1.img": bytes(range(256)) * 64,
         "dump.log": b"criu says hi\n", "rootfs-diff.tar": b"\0" * 1024, "deleted.files": b"etc/x\n"}


def meta(cid: str = CID) -> dict:
    return {
        "schema_version": 2, "id": cid, "id_source": "id", "identity": None, "created": "2025-01-01T00:00:00Z",
        "container": {"id": "c1", "args": ["srv"], "env": ["PATH=/bin"], "cwd": "/", "image": "img:1",
                      "hostname": "", "rootfs": {"kind": "overlay", "readonly": False}, "mounts": [],
                      "cgroup": {"version": 2, "path": "/k8s/c1"}, "namespaces": ["mount", "pid"]},
        "compat": {"scope": "_local", "args": ["srv"], "image_name": "img:1", "image_fingerprint": "sha256:" + "a" * 64,
                   "namespaces": ["mount", "pid"], "id_mappings": {"uidMappings": [], "gidMappings": []},
                   "seccomp_sha256": "", "cgroup_version": 2, "arch": "x86_64", "criu": "4.1"},
        "versions": {"criu": "4.1", "runc": "1.2.0", "kernel": "6.18", "arch": "x86_64", "warmstart": "0.1.0"},
        "dump": {"phases": {"checkpoint": 1.5}, "criu_stats": {}},
        "rootfs_diff": {"files": 0, "deleted": 1, "bytes": 0},
        "sizes": {"total_bytes": 0, "files": 0},
        "manifest": {},
    }


@pytest.fixture
def store(tmp_path) -> Store:
    signing.keygen(tmp_path / "node.key", tmp_path / "node.pub")
    return Store(Settings(store=tmp_path / "store", seal_dir=tmp_path / "seals", state_dir=tmp_path / "state",
                          log_dir=tmp_path / "log", max_restore_failures=2, signing_key=tmp_path / "node.key",
                          trusted_keys=(tmp_path / "node.pub",)))


def publish(store: Store, cid: str = CID, files: dict[str, bytes] = FILES) -> Path:
    tmp = store.new_tmp(cid)
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    return store.publish(cid, tmp, meta(cid))


@pytest.fixture
def ck(store) -> Path:
    return publish(store)


def refused(store: Store, needle: str, full_too: bool = True) -> None:
    with pytest.raises(CheckpointError, match=needle):
        store.open_verified(CID)
    if full_too:
        with pytest.raises(CheckpointError, match=needle):
            store.open_verified(CID, full=True)


def test_publish_layout(store, ck):
    assert ck == store.root / CID
    assert sorted(p.name for p in ck.iterdir()) == sorted([*FILES, MARKER, METADATA])
    assert store.exists(CID) and store.ids() == [CID]
    assert list((store.root / ".tmp").iterdir()) == []
    m = json.loads((ck / METADATA).read_text())
    assert set(m["manifest"]) == set(FILES)
    assert m["sizes"]["files"] == len(FILES) and m["sizes"]["total_bytes"] == sum(map(len, FILES.values()))
    marker = json.loads((ck / MARKER).read_text())
    assert marker["success"] is True and marker["checkpoint_id"] == CID
    for p in ck.iterdir():
        assert p.stat().st_mode & 0o077 == 0, p
    assert (store.seal_dir / f"{CID}.json").is_file()


def test_open_verified_seal_then_hash(store, ck):
    c = store.open_verified(CID)
    assert c.verified_by == "seal" and c.metadata["id"] == CID and c.path == ck
    c = store.open_verified(CID, full=True)
    assert c.verified_by == "hash"
    assert store.open_verified(CID).verified_by == "seal"


def test_no_seal_falls_back_to_hash_and_reseals(store, ck):
    (store.seal_dir / f"{CID}.json").unlink()
    assert store.open_verified(CID).verified_by == "hash"
    assert store.open_verified(CID).verified_by == "seal"


def test_bit_flip_same_size_same_mtime(store, ck):
    f = ck / "pages-1.img"
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[1000] ^= 0x01
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    refused(store, "pages-1.img: SHA-256 mismatch")


def test_bit_flip_caught_by_full_verify_even_with_fresh_seal(store, ck):
    f = ck / "inventory.img"
    data = bytearray(f.read_bytes())
    data[0] ^= 0x80
    f.write_bytes(bytes(data))
    # a seal forged to match the tampered stats: the cheap path trusts it, the full one must not
    store.seal(CID, ck, json.loads((ck / METADATA).read_text()))
    assert store.open_verified(CID).verified_by == "seal"
    with pytest.raises(CheckpointError, match="inventory.img: SHA-256 mismatch"):
        store.open_verified(CID, full=True)


def _rewrite_metadata(ck: Path, m: dict, fix_marker: bool | str) -> None:
    """fix_marker: True = a forger who also updates the marker's record of metadata.json (no key);
    "signed" = the same by the holder of the node's key, so that the check under test is what refuses."""
    (ck / METADATA).write_text(json.dumps(m))
    if fix_marker:
        body = json.loads((ck / MARKER).read_text())
        body["metadata_sha256"] = hashlib.sha256((ck / METADATA).read_bytes()).hexdigest()
        if fix_marker == "signed":
            body["signature"] = signing.sign(ck.parent.parent.parent / "node.key", body["metadata_sha256"])
        (ck / MARKER).write_text(json.dumps(body))


@pytest.mark.parametrize("fix_marker, needle", [(False, "metadata.json: SHA-256 differs"),
                                                (True, "signature by key .* does not match"),
                                                ("signed", "dump.log: SHA-256 mismatch")])
def test_metadata_manifest_edited(store, ck, fix_marker, needle):
    m = json.loads((ck / METADATA).read_text())
    m["manifest"]["dump.log"]["sha256"] = "0" * 64
    _rewrite_metadata(ck, m, fix_marker)
    refused(store, needle)


def test_metadata_not_json_or_schema_invalid(store, ck):
    (ck / METADATA).write_text("{not json")
    refused(store, "metadata.json: not JSON")
    m = meta()
    m["schema_version"] = 1  # made before checkpoints had a namespace
    (ck / METADATA).write_text(json.dumps(m))
    refused(store, "metadata.json: metadata field schema_version")


@pytest.mark.parametrize("fix_marker, needle", [(False, "metadata.json: SHA-256 differs"),
                                                ("signed", "metadata.json: id 'other' does not match")])
def test_metadata_id_mismatch(store, ck, fix_marker, needle):
    m = json.loads((ck / METADATA).read_text())
    m["id"] = "other"
    _rewrite_metadata(ck, m, fix_marker)
    refused(store, needle)


def test_metadata_cosmetic_edit_refused(store, ck):
    """Any write to metadata.json voids the seal, and the marker's record of it catches the edit."""
    raw = (ck / METADATA).read_bytes()
    (ck / METADATA).write_bytes(raw + b"\n")
    refused(store, "metadata.json")


def test_extra_file(store, ck):
    (ck / "evil.img").write_bytes(b"x")
    (ck / "evil.img").chmod(0o600)
    refused(store, "evil.img: file not in the manifest")


def test_file_removed(store, ck):
    (ck / "dump.log").unlink()
    refused(store, "dump.log: listed in the manifest but missing")


def test_marker_missing(store, ck):
    (ck / MARKER).unlink()
    refused(store, "checkpoint.done: missing")
    assert not store.exists(CID)


def test_marker_symlink(store, ck, tmp_path):
    body = (ck / MARKER).read_bytes()
    (tmp_path / "fake.done").write_bytes(body)
    (ck / MARKER).unlink()
    (ck / MARKER).symlink_to(tmp_path / "fake.done")
    refused(store, "checkpoint.done: is a symlink")


def test_marker_fifo_does_not_block(store, ck):
    (ck / MARKER).unlink()
    os.mkfifo(ck / MARKER, 0o600)
    refused(store, "checkpoint.done")


def test_marker_says_failure(store, ck):
    m = json.loads((ck / MARKER).read_text())
    m["success"] = False
    (ck / MARKER).write_text(json.dumps(m))
    refused(store, "checkpoint.done: marker does not say success: true")
    (ck / MARKER).write_text('{"success": "true"}')
    refused(store, "checkpoint.done: marker does not say success")


def test_checkpoint_dir_symlink(store, ck, tmp_path):
    real = tmp_path / "elsewhere"
    os.rename(ck, real)
    ck.symlink_to(real)
    refused(store, "is a symlink")


@pytest.mark.parametrize("name", ["pages-1.img", MARKER, METADATA])
def test_group_writable_file(store, ck, name):
    (ck / name).chmod(0o666)
    refused(store, f"{name}: .*writable by group/others")


def test_group_writable_dir(store, ck):
    ck.chmod(0o777)
    refused(store, f"checkpoint {CID}: .*writable")


def test_file_replaced_by_symlink(store, ck, tmp_path):
    target = tmp_path / "dump.log"
    target.write_bytes(FILES["dump.log"])
    (ck / "dump.log").unlink()
    (ck / "dump.log").symlink_to(target)
    refused(store, "dump.log: not a regular file")


def test_missing_checkpoint(store):
    store.ensure()
    with pytest.raises(CheckpointError, match="does not exist"):
        store.open_verified("nope")


def test_path_rejects_bad_ids(store):
    for bad in ("../x", ".tmp", "a/b", ""):
        with pytest.raises(ValueError):
            store.path(bad)


# -- publish atomicity ------------------------------------------------------------------

def test_final_dir_never_without_marker(store, monkeypatch):
    seen = []
    real_rename = os.rename

    def spy(src, dst, *a, **kw):
        if Path(dst) == store.root / CID:
            seen.append(sorted(p.name for p in Path(src).iterdir()))
        return real_rename(src, dst, *a, **kw)

    monkeypatch.setattr(store_mod.os, "rename", spy)
    publish(store)
    assert seen and MARKER in seen[0] and METADATA in seen[0]


def test_publish_does_not_replace_complete(store, ck):
    before = (ck / "pages-1.img").read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        publish(store, files={"pages-1.img": b"new"})
    assert (ck / "pages-1.img").read_bytes() == before
    assert store.open_verified(CID, full=True).verified_by == "hash"


def test_publish_replaces_incomplete_leftover(store):
    leftover = store.root / CID
    store.ensure()
    leftover.mkdir()
    (leftover / "junk.img").write_bytes(b"x")
    publish(store)
    assert not (store.root / CID / "junk.img").exists()
    assert store.open_verified(CID).verified_by == "seal"


def test_publish_refuses_non_regular(store):
    tmp = store.new_tmp(CID)
    (tmp / "sub").mkdir()
    with pytest.raises(CheckpointError, match="sub: not a regular file"):
        store.publish(CID, tmp, meta())
    assert not (store.root / CID).exists()


def test_publish_refuses_schema_invalid(store):
    tmp = store.new_tmp(CID)
    (tmp / "a.img").write_bytes(b"x")
    bad = meta()
    del bad["versions"]
    with pytest.raises(ValueError, match="versions"):
        store.publish(CID, tmp, bad)
    assert not (store.root / CID).exists()


# -- locks --------------------------------------------------------------------------------

def test_exclusive_lock_excludes(store):
    with store.lock(CID) as a:
        assert a is True
        with store.lock(CID) as b:
            assert b is False
        with store.lock(CID, exclusive=False) as c:
            assert c is False
        with store.lock("other") as d:
            assert d is True
    with store.lock(CID) as e:
        assert e is True


def test_shared_locks_coexist(store):
    with store.lock(CID, exclusive=False) as a, store.lock(CID, exclusive=False) as b:
        assert a and b
        with store.lock(CID) as c:
            assert c is False


def test_lock_across_processes(store):
    code = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()")
    store.ensure()
    lockfile = store.root / ".locks" / f"{CID}.lock"
    lockfile.touch()
    p = subprocess.Popen([sys.executable, "-c", code, str(lockfile)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with store.lock(CID) as held:
            assert held is False
    finally:
        p.stdin.close()
        p.wait(timeout=10)
    with store.lock(CID) as held:
        assert held is True


def test_remove_refuses_while_shared_lock_held(store, ck):
    with store.lock(CID, exclusive=False) as held:
        assert held
        with pytest.raises(CheckpointError, match="in use"):
            store.remove(CID)
    assert store.exists(CID)
    assert store.remove(CID) is True
    assert not (store.root / CID).exists() and not (store.seal_dir / f"{CID}.json").exists()
    assert store.remove(CID) is False


# -- gc --------------------------------------------------------------------------------------

def test_gc(store, ck):
    free_tmp = store.new_tmp("free")
    (free_tmp / "x.img").write_bytes(b"x")
    busy_tmp = store.new_tmp("busy")
    incomplete = store.root / "half"
    incomplete.mkdir()
    (incomplete / "pages-1.img").write_bytes(b"x")
    incomplete_busy = store.root / "halfbusy"
    incomplete_busy.mkdir()
    with store.lock("busy") as a, store.lock("halfbusy") as b:
        assert a and b
        removed = store.gc()
    assert not free_tmp.exists() and not incomplete.exists()
    assert busy_tmp.exists() and incomplete_busy.exists()
    assert ck.exists() and store.open_verified(CID, full=True).verified_by == "hash"
    assert str(free_tmp) in removed and str(incomplete) in removed
    assert str(ck) not in removed
    # a complete checkpoint whose lock is held is untouched too
    with store.lock(CID, exclusive=False):
        store.gc()
    assert store.exists(CID)


def test_gc_respects_min_age(store):
    t = store.new_tmp("young")
    assert store.gc(max_tmp_age_s=3600) == []
    assert t.exists()


# -- quarantine ------------------------------------------------------------------------------

def test_record_restore_quarantines(store, ck):
    assert store.quarantine_state(CID) == {"failures": 0, "quarantined": False}
    q = store.record_restore(CID, False, "criu said no")
    assert q["failures"] == 1 and not q["quarantined"]
    q = store.record_restore(CID, False, "again")
    assert q["failures"] == 2 and q["quarantined"] and q["last_error"] == "again"
    assert store.quarantine_state(CID)["quarantined"] is True
    assert store.record_restore(CID, True) == {"failures": 0, "quarantined": False}
    assert store.quarantine_state(CID)["failures"] == 0


def test_success_resets_failure_count(store, ck):
    store.record_restore(CID, False)
    store.record_restore(CID, True)
    assert store.record_restore(CID, False)["quarantined"] is False


def test_gc_keeps_in_progress_dump_of_dotted_id(store):
    cid = "model.v1"
    with store.lock(cid) as held:
        assert held
        tmp = store.new_tmp(cid)
        (tmp / "pages-1.img").write_bytes(b"in progress")
        store.gc()
        assert tmp.exists()


def test_gc_keeps_in_progress_dump(store):
    with store.lock("plain") as held:
        assert held
        tmp = store.new_tmp("plain")
        store.gc()
        assert tmp.exists()


def test_remove_leaves_nothing_of_the_id(store, ck):
    """Checkpoint dir, seal, derived caches, quarantine, dump status and lock file all go."""
    store.open_verified(CID)
    (store.seal_dir / f"{CID}.mounts.json").write_text("{}")
    (store.seal_dir / f"{CID}.security.json").write_text("{}")
    store.record_restore(CID, False, "boom")
    store.record_dump_failure(CID, "earlier dump failed")
    with store.lock(CID):
        pass
    assert store.remove(CID) is True
    left = [p for d in (store.root, store.seal_dir) for p in d.rglob("*") if CID in p.name]
    assert not left, left


def test_remove_an_id_with_only_a_failed_dump(store):
    """`list` shows such an id as failed: `remove` must call it present and clear it."""
    store.record_dump_failure("only-failed", "CRIU said no")
    assert store.dump_failure("only-failed") is not None
    assert store.remove("only-failed") is True
    assert store.dump_failure("only-failed") is None
    assert not (store.root / ".locks" / "only-failed.lock").exists()
    assert store.remove("only-failed") is False


def test_gc_reaps_orphans_but_keeps_fresh_failures_and_live_checkpoints(store, ck):
    store.record_dump_failure("gone.v1", "old failure")
    with store.lock("gone.v1"):
        pass
    (store.seal_dir / "gone.v1.mounts.json").write_text("{}")
    store.gc(max_tmp_age_s=3600)
    assert store.dump_failure("gone.v1") is not None, "a fresh failure is what `list` should still show"
    store.gc(max_tmp_age_s=0)
    assert store.dump_failure("gone.v1") is None
    assert not (store.root / ".locks" / "gone.v1.lock").exists()
    assert not (store.seal_dir / "gone.v1.mounts.json").exists()
    assert store.open_verified(CID).verified_by == "seal", "the live checkpoint's seal was reaped"


def test_a_lock_on_a_removed_lock_file_is_taken_again(store):
    """remove/gc unlink a lock file while holding it; a waiter that then gets the old file must retry."""
    import threading
    got = []
    with store.lock("x") as held:
        assert held
        t = threading.Thread(target=lambda: got.append(store.lock("x", blocking=True).__enter__()))
        t.start()
        time.sleep(0.1)
        (store.root / ".locks" / "x.lock").unlink()
    t.join(5)
    assert got == [True]
    lock_file = store.root / ".locks" / "x.lock"
    assert lock_file.exists(), "the waiter holds a lock on a file nobody else can see"


@pytest.fixture
def small_tree(monkeypatch):
    """The tree hash at a unit test's scale: 4 KiB pieces from 16 KiB up."""
    from warmstart import fileutil
    monkeypatch.setattr(fileutil, "TREE_PIECE", 4096)
    monkeypatch.setattr(fileutil, "TREE_MIN", 16384)
    return fileutil


def test_big_files_are_tree_hashed_and_every_piece_is_checked(store, small_tree):
    big = os.urandom(5 * 4096 + 123)  # five whole pieces and a partial one
    path = publish(store, files={**FILES, "pages-2.img": big})
    entry = json.loads((path / METADATA).read_text())["manifest"]["pages-2.img"]
    pieces = b"".join(hashlib.sha256(big[o:o + 4096]).digest() for o in range(0, len(big), 4096))
    assert entry == {"sha256": hashlib.sha256(pieces).hexdigest(), "size": len(big), "hash": "sha256-tree-64MiB"}
    assert json.loads((path / METADATA).read_text())["manifest"]["dump.log"].get("hash") is None  # small: plain
    store_mod.verify_dir(path, CID, store.policy, "_local")
    for off in (0, 3 * 4096 + 7, len(big) - 1):  # first, middle and last (partial) piece
        data = bytearray(big)
        data[off] ^= 1
        (path / "pages-2.img").write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match="pages-2.img: SHA-256 mismatch"):
            store_mod.verify_dir(path, CID, store.policy, "_local")
