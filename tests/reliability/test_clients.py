"""What podman and containerd do around warmstart-runtime, played through the shim's argv.

Each case is one thing a real client did that broke a checkpoint or the user's container:
podman's `kill` without PATH, its cleanup's `delete --force` racing the dump, the exit
status a stopped container reports, and runc's own output in the container's stdio after a
failed restore.  tests/e2e/test_podman.py and test_ctr.py run the clients themselves.
"""
from __future__ import annotations

import subprocess

import pytest
from reliability_lib import RNode, ann, start_ready

pytestmark = [pytest.mark.reliability]


def test_kill_without_path_still_checkpoints(node: RNode):
    """podman runs `<runtime> kill` with only XDG_RUNTIME_DIR set: CRIU's network lock execs
    iptables-restore by name (Debian: /usr/sbin), so without a PATH every podman stop lost its dump."""
    c = node.ctr("nopath", ann("nopath"))
    ready = start_ready(c)
    c.ask()
    env = {"XDG_RUNTIME_DIR": "", **node.env()}  # exactly what podman 4.3 passes, plus our private config
    p = subprocess.run(c.argv("kill", c.id, "15"), env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert (node.store / "nopath" / "checkpoint.done").is_file(), node.log_msgs()
    c.stop()
    c.delete()
    b = node.ctr("nopath2", ann("nopath"))
    b.create()
    b.start()
    got = b.ask()
    assert (got["random"], got["counter"]) == (ready["random"], 2), "not restored from the PATH-less stop's checkpoint"
