"""criu.read_stats decodes CRIU's stats images without pycriu: checked against pycriu's own encoder."""
from __future__ import annotations

from pathlib import Path

import pytest

from warmstart import criu

images = pytest.importorskip("pycriu.images")


def _write(path: Path, entry: dict) -> None:
    with open(path, "wb") as f:
        images.dump({"magic": "STATS", "entries": [entry]}, f)


def test_restore_stats_match_pycriu(tmp_path: Path) -> None:
    want = {"pages_compared": 0, "pages_skipped_cow": 7, "forking_time": 4500, "restore_time": 134360,
            "pages_restored": 65_601}
    _write(tmp_path / "stats-restore", {"restore": want})
    assert criu.restore_stats(tmp_path) == want
    with open(tmp_path / "stats-restore", "rb") as f:  # the same answer as CRIU's own decoder
        assert dict(images.load(f)["entries"][0]["restore"]) == want


def test_dump_stats_match_pycriu(tmp_path: Path) -> None:
    want = {"freezing_time": 1200, "frozen_time": 90_000, "memdump_time": 30_000, "memwrite_time": 55_000,
            "pages_scanned": 1 << 40, "pages_skipped_parent": 0, "pages_written": 65_536, "pages_lazy": 0,
            "page_pipes": 3}
    _write(tmp_path / "stats-dump", {"dump": want})
    assert criu.dump_stats(tmp_path) == want
    assert criu.restore_stats(tmp_path) == {}  # no stats-restore: nothing, not an error


@pytest.mark.parametrize("raw", [b"", b"\x40\x59\x10\x55\x06\x33\x09\x57\xff\x00\x00\x00\x12",
                                 b"\x40\x59\x10\x55\x06\x33\x09\x57\x03\x00\x00\x00\x12\x05\x18"])
def test_a_bad_stats_file_is_an_error_entry_not_an_exception(tmp_path: Path, raw: bytes) -> None:
    (tmp_path / "stats-restore").write_bytes(raw)
    out = criu.restore_stats(tmp_path)
    assert set(out) <= {"error"}
