"""fileutil.WriteBehind: a dump's files handed to the disk while CRIU writes them."""
from __future__ import annotations

import os
import time

import pytest

from warmstart import fileutil


def test_write_behind_hands_each_file_s_new_bytes_to_the_disk_once(tmp_path):
    calls = []
    wb = fileutil.WriteBehind(tmp_path, syscall=lambda fd, off, n, flags: calls.append(
        (os.readlink(f"/proc/self/fd/{fd}"), off, n, flags)))
    pages = tmp_path / "pages-1.img"
    pages.write_bytes(b"x" * 4096)
    wb.tick()
    with open(pages, "ab") as f:
        f.write(b"y" * 8192)
    wb.tick()
    wb.tick()  # nothing new: no call
    W = fileutil.WriteBehind.SYNC_FILE_RANGE_WRITE
    assert calls == [(str(pages), 0, 4096, W), (str(pages), 4096, 8192, W)]
    assert wb.started_bytes == 12288


def test_write_behind_opens_only_regular_files_and_follows_no_link(tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"secret" * 1000)
    d = tmp_path / "dump"
    d.mkdir()
    (d / "link.img").symlink_to(outside)
    os.mkfifo(d / "fifo.img")  # opened O_NONBLOCK: no hang, and skipped
    (d / "sub").mkdir()
    calls = []
    fileutil.WriteBehind(d, syscall=lambda *a: calls.append(a)).tick()
    assert calls == []


def test_write_behind_runs_while_the_block_runs_and_stops_after(tmp_path, monkeypatch):
    monkeypatch.setattr(fileutil.WriteBehind, "TICK_S", 0.01)
    calls = []
    with fileutil.WriteBehind(tmp_path, syscall=lambda *a: calls.append(a)) as wb:
        (tmp_path / "pages-1.img").write_bytes(b"x" * 100)
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
    assert calls and not wb._thread.is_alive()
    n = len(calls)
    (tmp_path / "pages-2.img").write_bytes(b"x" * 100)
    time.sleep(0.05)
    assert len(calls) == n, "nothing after the block"


def test_write_behind_really_starts_write_back(tmp_path):
    """libc's own sync_file_range (where it exists) accepts the call on a real file."""
    fn = fileutil._sync_file_range()
    if fn is None:
        pytest.skip("no sync_file_range in this libc")
    f = tmp_path / "pages-1.img"
    f.write_bytes(os.urandom(1 << 20))
    fd = os.open(f, os.O_RDONLY)
    try:
        assert fn(fd, 0, 1 << 20, fileutil.WriteBehind.SYNC_FILE_RANGE_WRITE) == 0
    finally:
        os.close(fd)


def test_write_behind_opens_only_files_that_grew(tmp_path, monkeypatch):
    (tmp_path / "pages-1.img").write_bytes(b"x" * 4096)
    (tmp_path / "core-1.img").write_bytes(b"y" * 100)
    wb = fileutil.WriteBehind(tmp_path, syscall=lambda *a: 0)
    wb.tick()
    opened = []
    real_open = os.open
    monkeypatch.setattr(fileutil.os, "open",
                        lambda p, *a, **k: opened.append(os.path.basename(p)) or real_open(p, *a, **k))
    wb.tick()
    assert opened == [], "nothing grew: nothing opened"
    with open(tmp_path / "pages-1.img", "ab") as f:
        f.write(b"x")
    wb.tick()
    assert opened == ["pages-1.img"]
