"""warmstart-hook: never fails the container; writes only into its own state dir."""
from __future__ import annotations

import io
import json
import os

import pytest

from warmstart.hooks import main as hook


def run(monkeypatch, argv, state) -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(state if isinstance(state, str) else json.dumps(state)))
    return hook.main(argv)


def test_create_runtime_records_mountinfo(tmp_path, monkeypatch):
    sd = tmp_path / "c1"
    sd.mkdir()
    assert run(monkeypatch, ["createRuntime", "--state-dir", str(sd)], {"id": "c1", "pid": os.getpid()}) == 0
    assert (sd / "mountinfo").read_text() == open(f"/proc/{os.getpid()}/mountinfo").read()


@pytest.mark.parametrize("state", [{}, {"pid": "12"}, {"pid": -1}, {"pid": 2**22 + 12345}, "not json", ""])
def test_create_runtime_bad_state_exits_zero(tmp_path, monkeypatch, state):
    sd = tmp_path / "c1"
    sd.mkdir()
    assert run(monkeypatch, ["createRuntime", "--state-dir", str(sd)], state) == 0
    assert not (sd / "mountinfo").exists()


def test_poststop(tmp_path, monkeypatch):
    sd = tmp_path / "c1"
    sd.mkdir()
    assert run(monkeypatch, ["poststop", "--state-dir", str(sd)], {"id": "other"}) == 0
    assert not (sd / "stopped").exists()
    assert run(monkeypatch, ["poststop", "--state-dir", str(sd)], {"id": "c1"}) == 0
    assert (sd / "stopped").exists()
    # state dir already gone: still exit 0
    assert run(monkeypatch, ["poststop", "--state-dir", str(tmp_path / "gone")], {"id": "gone"}) == 0
