"""Per-container state: the dump lock `delete` waits on, and saves after the client removed the state."""
from __future__ import annotations

import os

import pytest

from warmstart.state import ContainerState, StateDir


@pytest.fixture
def sd(tmp_path) -> StateDir:
    s = StateDir(tmp_path, "c1")
    s.create()
    return s


def test_delete_waits_while_a_dump_holds_the_container(sd: StateDir):
    assert sd.wait_unheld(0.1) == 0.0  # never held: no lock file, no wait
    fd = sd.hold()
    try:
        assert sd.wait_unheld(0.2) is None  # held: gives up after the bound
        assert os.get_inheritable(fd)  # survives the exec of `runc kill` that ends the stop
    finally:
        os.close(fd)
    waited = sd.wait_unheld(1)
    assert waited is not None and waited < 0.5


def test_save_after_the_state_dir_was_removed(sd: StateDir):
    st = ContainerState(container_id="c1", checkpoint_id="x", mode="on-stop", bundle="/b", rootfs="/b/rootfs")
    assert sd.save(st) is True and sd.load() == st
    sd.remove()
    assert sd.save(st, missing_ok=True) is False and not sd.path.exists()  # nothing recreated
    with pytest.raises(FileNotFoundError):
        sd.save(st)
