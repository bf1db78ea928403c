"""runtime/warmstart/sharedfs.py: publish to and fetch from a shared directory, with hostile shares.

Two node settings (own store, seals, logs; one trusted key) over one share dir, with the small signed
checkpoints of test_store.  The real worker, runc and CRIU are in tests/e2e/test_shared_store.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
from test_store import CID, FILES, publish, store  # noqa: F401 - fixture

from warmstart import sharedfs
from warmstart.config import SharedStoreSettings
from warmstart.sharedfs import Share, ShareError
from warmstart.store import MARKER, METADATA, CheckpointError, Store


def node(store: Store, name: str, share: Path, scope: str = "_local") -> Store:
    """Another node's store: its own dirs under tmp, the same keys, the shared dir."""
    base = store.settings.store.parent / name
    s = dataclasses.replace(store.settings, store=base / "store", seal_dir=base / "seals", log_dir=base / "log",
                            shared_store=SharedStoreSettings(path=share))
    return Store(s, scope)


@pytest.fixture
def nodes(store, tmp_path):
    share = tmp_path / "share"
    share.mkdir(mode=0o700)
    return node(store, "a", share), node(store, "b", share)


def snapshot(s: Store) -> list[str]:
    """The store's entries and its temp dir: what a refused fetch must leave as it was."""
    if not s.root.exists():
        return []
    return sorted(p.name for p in s.root.iterdir() if not p.name.startswith(".")) + \
        sorted(f".tmp/{p.name}" for p in (s.root / ".tmp").iterdir())


def test_publish_then_fetch_on_another_node_verifies_and_seals(nodes):
    a, b = nodes
    publish(a)
    msg = Share(a.settings, "_local").publish(CID)
    on_share = a.settings.shared_store.path / "_local" / CID
    assert msg.startswith("published ") and str(on_share) in msg
    assert sorted(p.name for p in on_share.iterdir()) == sorted([*FILES, MARKER, METADATA])
    assert os.listdir(on_share.parent / ".tmp") == []
    assert Share(b.settings, "_local").fetch(CID)
    ck = b.open_verified(CID)
    assert ck.verified_by == "seal" and ck.path == b.root / CID  # sealed on adoption: the seal stands for the hashes
    for name, data in FILES.items():
        assert (ck.path / name).read_bytes() == data
    assert (b.settings.seal_dir / "_local" / f"{CID}.json").is_file()


def test_the_same_version_is_not_copied_twice_and_a_new_one_replaces_it(nodes):
    a, b = nodes
    publish(a)
    share = Share(a.settings, "_local")
    share.publish(CID)
    assert share.publish(CID) == "skipped: the share already has this version"
    a.remove(CID)
    publish(a, files={**FILES, "pages-1.img": b"new pages" * 100})
    msg = share.publish(CID)
    assert "(replaced the version there)" in msg
    assert os.listdir(share.root / ".tmp") == []  # the old version is gone, nothing half-made is left
    assert Share(b.settings, "_local").fetch(CID)
    assert (b.root / CID / "pages-1.img").read_bytes() == b"new pages" * 100


def test_a_dead_publishers_leftovers_are_reaped_by_the_next_publish(nodes):
    a, _ = nodes
    publish(a)
    tmpdir = a.settings.shared_store.path / "_local" / ".tmp"
    tmpdir.mkdir(parents=True)
    for name in (f"{CID}.0123456789ab", f"trash.{CID}.ba9876543210", "other.0123456789ab"):
        (tmpdir / name).mkdir()
        (tmpdir / name / "pages-1.img").write_bytes(b"half")
    Share(a.settings, "_local").publish(CID)
    assert os.listdir(tmpdir) == ["other.0123456789ab"]  # another id's publish may still be running


def test_nothing_on_the_share_is_a_miss(nodes):
    _, b = nodes
    assert not Share(b.settings, "_local").fetch(CID)  # no namespace dir
    (b.settings.shared_store.path / "_local" / CID).mkdir(parents=True)  # a dir without its marker
    assert not Share(b.settings, "_local").fetch(CID)
    assert snapshot(b) == []


def published(nodes) -> tuple[Store, Store, Path]:
    a, b = nodes
    publish(a)
    Share(a.settings, "_local").publish(CID)
    return a, b, a.settings.shared_store.path / "_local" / CID


@pytest.mark.parametrize("case, needle, exc", [
    ("tampered", "pages-1.img: SHA-256 mismatch", CheckpointError),
    ("symlink", "'pages-1.img': not a regular file .* on the share", ShareError),
    ("fifo", "'evil.img': not a regular file .* on the share", ShareError),
    ("extra", "extra.img: file not in the manifest", CheckpointError),
    ("dotfile", "'.hidden': not a checkpoint file name", ShareError),
    ("id-symlink", f"{CID}: a symlink or not a directory on the share", ShareError),
    ("unsigned", "checkpoint is not signed", CheckpointError),
])
def test_a_hostile_share_is_refused_and_the_store_is_unchanged(nodes, tmp_path, case, needle, exc):
    _, b, d = published(nodes)
    secret = tmp_path / "secret"
    secret.write_bytes(b"root's" * 100)
    if case == "tampered":
        data = bytearray((d / "pages-1.img").read_bytes())
        data[7] ^= 0xFF
        (d / "pages-1.img").write_bytes(data)
    elif case == "symlink":
        (d / "pages-1.img").unlink()
        (d / "pages-1.img").symlink_to(secret)
    elif case == "fifo":
        os.mkfifo(d / "evil.img")  # a read would block forever
    elif case == "extra":
        (d / "extra.img").write_bytes(b"x")
    elif case == "dotfile":
        (d / ".hidden").write_bytes(b"x")
    elif case == "id-symlink":
        shutil.move(d, d.with_name("elsewhere"))
        d.symlink_to(d.with_name("elsewhere"))
    elif case == "unsigned":
        marker = json.loads((d / MARKER).read_text())
        del marker["signature"]
        (d / MARKER).write_text(json.dumps(marker))
    with pytest.raises(exc, match=needle):
        Share(b.settings, "_local").fetch(CID)
    assert snapshot(b) == [] and not (b.root / CID).exists()


def test_an_entry_of_another_namespace_is_refused(nodes):
    """Someone with write access to the share copies namespace _local's checkpoint under tenant-b."""
    a, b, d = published(nodes)
    shutil.copytree(d, d.parent.parent / "tenant-b" / CID)
    other = Store(b.settings, "tenant-b")
    with pytest.raises(CheckpointError, match="made in namespace '_local', found in the store of 'tenant-b'"):
        Share(b.settings, "tenant-b").fetch(CID)
    assert snapshot(other) == []


def test_more_than_the_pull_budget_is_refused_before_it_is_all_copied(nodes):
    a, b, d = published(nodes)
    small = dataclasses.replace(b.settings, max_pull_bytes=1000)
    with pytest.raises(ShareError, match="over 1000 bytes"):
        Share(small, "_local").fetch(CID)
    assert snapshot(Store(small, "_local")) == []


def test_a_publish_waits_for_readers_and_readers_never_see_the_swap(nodes, monkeypatch):
    """A reader in another process holds the content lock: the publish copies, then cannot swap."""
    from test_sharelock import Holder
    a, b, d = published(nodes)
    a.remove(CID)
    publish(a, files={**FILES, "pages-1.img": b"v2" * 100})
    h = Holder(d.parent / ".locks", f"{sharedfs.CONTENT}:sh")  # x.lock is not the id's: rename it into place
    os.replace(d.parent / ".locks" / "x.lock", d.parent / ".locks" / f"{CID}.lock")
    monkeypatch.setattr(sharedfs, "SWAP_WAIT_S", 0.3)
    try:
        with pytest.raises(ShareError, match="readers held"):
            Share(a.settings, "_local").publish(CID)
        assert (d / "pages-1.img").read_bytes() == FILES["pages-1.img"]  # the old version, whole
        assert os.listdir(d.parent / ".tmp") == []
    finally:
        h.release()
    assert "replaced" in Share(a.settings, "_local").publish(CID)


def test_off_or_unconfigured_does_nothing(store, monkeypatch):
    monkeypatch.setattr(sharedfs, "_spawn", lambda *a, **k: pytest.fail("nothing may be started"))
    assert not sharedfs.fetch_on_miss(store.settings, "_local", CID, 1)
    assert not sharedfs.publish_in_background(store.settings, "_local", CID)
    off = dataclasses.replace(store.settings, shared_store=SharedStoreSettings(Path("/x"), publish="off", fetch="off"))
    assert not sharedfs.fetch_on_miss(off, "_local", CID, 1)
    assert not sharedfs.publish_in_background(off, "_local", CID)
    with pytest.raises(ShareError, match=r"\[shared_store\] path is not set"):
        Share(store.settings, "_local")


def test_publish_in_background_starts_the_worker_and_returns(nodes, monkeypatch):
    a, _ = nodes
    calls = []
    monkeypatch.setattr(sharedfs, "_spawn", lambda settings, args, pass_fds=(), module="fleet": calls.append((module, args)))
    assert sharedfs.publish_in_background(a.settings, "tenant-a", CID)
    assert calls == [("sharedfs", ["publish", "--namespace", "tenant-a", CID])]


def test_the_worker_logs_one_line_per_outcome(nodes):
    """`python -m warmstart.sharedfs` in-process: publish, then fetch refused (tampered), each one line."""
    a, b, d = published(nodes)
    a.remove(CID)
    publish(a, files={**FILES, "dump.log": b"second\n"})
    assert sharedfs._run_publish(a.settings, "_local", CID) == 0
    (line,) = [json.loads(x) for x in (a.settings.log_dir / "runtime.log").read_text().splitlines()]
    assert line["component"] == "shared_store" and "replaced the version there" in line["msg"]
    (d / "dump.log").write_bytes(b"SECOND\n")
    assert sharedfs._run_fetch(b.settings, "_local", CID, os.open("/dev/null", os.O_RDONLY)) == 1
    (line,) = [json.loads(x) for x in (b.settings.log_dir / "runtime.log").read_text().splitlines()]
    assert line["level"] == "warning" and "dump.log: SHA-256 mismatch" in line["msg"]
    assert "the store is unchanged" in line["msg"] and snapshot(b) == []


def hold_publish_lock(root: Path, cid: str):
    """Another process holding byte 0 of `cid`'s lock on the share, as a live publisher does."""
    from test_sharelock import Holder
    (root / ".locks").mkdir(exist_ok=True)
    h = Holder(root / ".locks", f"{sharedfs.PUBLISH}:ex")
    os.replace(root / ".locks" / "x.lock", root / ".locks" / f"{cid}.lock")  # the holder's fd keeps its lock
    return h


def test_gc_sweeps_what_dead_publishers_left_and_nothing_a_live_one_owns(nodes, tmp_path):
    """Node B's gc over the share: entries of ids whose publish lock is free go, whatever they are (dirs
    deleted, symlinks unlinked, never followed); entries of ids another process holds stay."""
    _, b = nodes
    root = b.settings.shared_store.path / "_local"
    (root / ".tmp").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"root's")
    dead = [f"{CID}.0123456789ab", f"trash.{CID}.ba9876543210"]
    live = ["busy.0123456789ab", "trash.busy.0123456789ab", "trash.x.0123456789ab"]  # the last: x's trash, or
    for name in dead + live:  # a publish of the id "trash.x", which another process holds: it stays
        (root / ".tmp" / name).mkdir()
        (root / ".tmp" / name / "pages-1.img").write_bytes(b"half")
    (root / ".tmp" / "evil").symlink_to(outside)
    (root / ".tmp" / f"{CID}.aaaaaaaaaaaa").symlink_to(outside)
    (root / ".tmp" / "junk").write_bytes(b"x")
    holders = [hold_publish_lock(root, "busy"), hold_publish_lock(root, "trash.x")]
    try:
        got = sharedfs.sweep_share(b.settings)
        assert sorted(os.listdir(root / ".tmp")) == sorted(live)
        assert sorted(got.removed) == sorted(f"{root}/.tmp/{n}" for n in [*dead, "evil", f"{CID}.aaaaaaaaaaaa", "junk"])
        assert sorted(got.kept) == sorted(f"{root}/.tmp/{n}" for n in live) and got.errors == []
    finally:
        for h in holders:
            h.kill()  # as a node crash would: the kernel drops the locks
    assert sorted(os.listdir(outside)) == ["keep"] and (outside / "keep").read_bytes() == b"root's"
    assert sorted(sharedfs.sweep_share(b.settings).removed) == sorted(f"{root}/.tmp/{n}" for n in live)
    assert os.listdir(root / ".tmp") == []
    (line, again) = [json.loads(x) for x in (b.settings.log_dir / "runtime.log").read_text().splitlines()]
    assert line["component"] == "shared_store" and line["removed"] == 5 and "kept 3" in line["msg"]
    assert again["removed"] == 3 and f"{root}/.tmp/busy.0123456789ab" in again["msg"]
