"""Eager restore with warmstart's CRIU patch: the root task's pages read by several threads.

Real runc and the patched CRIU, driven as the shim drives warmstart-runtime.
The workload is a process family (root with a large buffer and two threads,
two forked children with buffers of their own): the helper processes live in the
container's pid namespace while the root reads, and the children and threads
must still get their own pids back afterwards.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import shim  # noqa: E402
from shim import subreaper  # noqa: E402, F401 - autouse: this module plays the shim

pytestmark = [
    *shim.parallel_reads_marks("runc"),
    pytest.mark.skipif(not Path(shim.RUNTIME).exists(), reason=f"{shim.RUNTIME} not installed (install.sh)"),
]
STATE = str(96 << 20)  # above the patch's 64 MiB threshold
PARALLEL_LINE = "bytes of pages in"


@pytest.fixture
def node(tmp_path_factory):
    n = shim.Node(tmp_path_factory.mktemp("node"))
    with n.config.open("a") as f:
        f.write("restore_read_threads = 2\n")  # the same on a 1-CPU machine
    yield n
    n.cleanup()


def family(node: shim.Node, name: str, cid: str, mode: str) -> shim.Container:
    c = node.container(name, {"warmstart.dev/checkpoint": mode, "warmstart.dev/id": cid},
                       args=["python3", "/family.py", STATE])
    c.create()
    c.start()
    return c


def checkpointed_family(node: shim.Node, cid: str) -> str:
    c = family(node, "first", cid, "on-stop")
    token = c.readline()["token"]
    assert c.ask("check") == {"intact": True, "kids": [True, True], "ticking": True}
    assert c.stop().returncode == 0
    c.delete()
    assert (node.store / cid / "checkpoint.done").is_file()
    return token


def restore_log(node: shim.Node, c: shim.Container) -> str:
    return (node.base / "logs" / f"restore-{c.id}.log").read_text()


def test_family_restores_intact_with_parallel_reads_and_without(node):
    checkpointed_family(node, "fam")
    par = family(node, "par", "fam", "restore-only")
    assert any("restored from fam" in r.get("msg", "") for r in par.log_records()), par.log_text()
    assert par.ask("check") == {"intact": True, "kids": [True, True], "ticking": True}
    log = restore_log(node, par)
    assert f"{PARALLEL_LINE} " in log and "with 2 threads" in log, "the root's pages were read by 2 threads"
    assert "for parallel reads, kept out of the children" in log, "the root's own memory was not forked into them"
    # the family came back whole: root, its two threads and two children, each with its own pid
    pids = par.runtime("ps", par.id).stdout
    assert len([x for x in pids.splitlines()[1:] if x.strip()]) == 3, pids
    assert len(os.listdir(f"/proc/{par.pid()}/task")) == 3, "root thread + two ticking threads, no helper left"
    par.runtime("kill", "--all", par.id, "9")
    par.delete()

    node.config.write_text(node.config.read_text().replace("restore_read_threads = 2", "restore_read_threads = 1"))
    ser = family(node, "ser", "fam", "restore-only")
    assert ser.ask("check") == {"intact": True, "kids": [True, True], "ticking": True}
    assert PARALLEL_LINE not in restore_log(node, ser), "restore_read_threads = 1: CRIU's own reads"


def test_failed_parallel_read_means_cold_start_and_nothing_left(node):
    token = checkpointed_family(node, "short")
    pages = max((node.store / "short").glob("pages-*.img"), key=lambda p: p.stat().st_size)  # the root's
    with open(pages, "r+b") as f:
        f.truncate(pages.stat().st_size // 2)
    shim.reseal(node, "short")  # consistent and sealed: only CRIU's reads meet the short file
    c = family(node, "cold", "short", "restore-only")
    ready = c.readline()
    assert ready["event"] == "ready" and ready["token"] != token, "started cold"
    assert c.ask("check") == {"intact": True, "kids": [True, True], "ticking": True}
    msgs = [r["msg"] for r in c.log_records() if "cold start" in r.get("msg", "")]
    assert any("restore from short failed" in m for m in msgs), msgs
    assert "Can't read pages in parallel" in restore_log(node, c)
    pids = c.runtime("ps", c.id).stdout
    assert len([x for x in pids.splitlines()[1:] if x.strip()]) == 3, f"only the cold family: {pids}"
