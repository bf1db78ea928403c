"""Concurrency: two containers of one checkpoint id stopping at once, ten restores of one checkpoint at
once, and `warmstart gc` / `warmstart remove` racing a restore and a dump."""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest
from reliability_lib import RNode, ann, assert_clean, count, make_checkpoint, shim, start_ready, write_criu_wrapper

pytestmark = [pytest.mark.reliability]


def kill_argv(c: shim.Container) -> list[str]:
    return [shim.RUNTIME, "--root", str(c.root), "--log", str(c.bundle / "log.json"), "--log-format", "json",
            "kill", c.id, "15"]


def test_two_containers_same_id_stop_at_once(node: RNode):
    before = node.snapshot()
    a, b = node.ctr("a", ann("twin")), node.ctr("b", ann("twin"))
    start_ready(a)
    start_ready(b)
    procs = [subprocess.Popen(kill_argv(c), env={**os.environ, **node.env()}) for c in (a, b)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    count("concurrency.races")
    for c in (a, b):
        assert shim.wait_exit(c.pid(), 15), f"{c.id} did not stop"
    assert (node.store / "twin" / "checkpoint.done").is_file()
    assert node.warmstart("verify", "twin").returncode == 0
    msgs = node.log_msgs()
    assert sum("checkpointed on stop" in m for m in msgs) == 1, msgs
    assert sum(m.startswith("not checkpointed:") and ("in progress; skipping" in m or "already exists" in m)
               for m in msgs) == 1, msgs
    assert not list((node.store / ".tmp").iterdir())
    for c in (a, b):
        c.delete()
    assert_clean(node, before, "after two simultaneous dumps")


def _pidns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/pid")


def test_ten_restores_of_one_checkpoint_at_once(node: RNode):
    n = int(os.environ.get("WARMSTART_REL_PARALLEL", "10"))
    dumped = make_checkpoint(node, "fan")
    before = node.snapshot()
    cs = [node.ctr(f"f{i}", ann("fan")) for i in range(n)]
    errors: list[BaseException] = []

    def create(c):
        try:
            c.create()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    t0 = time.monotonic()
    threads = [threading.Thread(target=create, args=(c,)) for c in cs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    assert not errors, errors
    count("concurrency.restores", n)
    msgs = node.log_msgs()
    assert sum(m.startswith("restored from fan") for m in msgs) == n, msgs
    namespaces = set()
    for c in cs:
        c.start()
        got = c.ask()
        # every restore continues from the same memory: same "random" value, same counter
        assert got["random"] == dumped["random"] and got["counter"] == dumped["counter"] + 1
        assert got["pid"] == 1, "each restored process is init of its own PID namespace"
        namespaces.add(_pidns(c.pid()))
    assert len(namespaces) == n and _pidns(os.getpid()) not in namespaces
    for c in cs:
        c.stop()
        c.delete()
    assert_clean(node, before, f"after {n} parallel restores")
    (node.base / "parallel.json").write_text(json.dumps({"n": n, "seconds": took}))
    print(f"{n} parallel restores in {took:.2f}s")


def test_gc_and_remove_race_a_restore(node: RNode):
    dumped = make_checkpoint(node, "busy")
    write_criu_wrapper(node)
    (node.bin / "criu-sleep").write_text("1.5")  # every CRIU call waits: the restore holds its lock a while
    c = node.ctr("r", ann("busy"))
    t = threading.Thread(target=c.create)
    t.start()
    deadline = time.monotonic() + 30
    while not (node.bin / "criu-calls").exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    gcs = removes = 0
    pid_file = c.bundle / "init.pid"  # written by runc restore: until then the restore holds its shared lock
    while t.is_alive() and not pid_file.exists():
        g = node.warmstart("gc", "--min-age", "0")
        assert g.returncode == 0
        gcs += 1
        r = node.warmstart("remove", "busy")
        if r.returncode == 0:
            # only possible once the restore let go of the checkpoint: runc wrote the pid file before that
            assert pid_file.exists(), ("remove succeeded while the restore held the checkpoint", r.stdout)
            break
        assert r.returncode == 1 and "in use" in r.stderr, (r.returncode, r.stdout, r.stderr)
        assert (node.store / "busy" / "checkpoint.done").is_file()
        removes += 1
    t.join()
    count("concurrency.races", gcs + removes)
    assert removes >= 1, "remove never raced the restore"
    c.start()
    got = c.ask()
    assert got["random"] == dumped["random"], "the restore succeeded while gc and remove ran"
    c.stop()
    c.delete()


def test_gc_races_a_dump(node: RNode):
    write_criu_wrapper(node)
    c = node.ctr("d", ann("dumping"), size=128 << 20)
    start_ready(c)
    (node.bin / "criu-sleep").write_text("1")
    p = subprocess.Popen(kill_argv(c), env={**os.environ, **node.env()})
    gcs = 0
    saw_tmp = False
    while p.poll() is None:
        saw_tmp |= bool(list((node.store / ".tmp").glob("dumping.*"))) if (node.store / ".tmp").exists() else False
        g = node.warmstart("gc", "--min-age", "0")
        assert g.returncode == 0 and "dumping." not in g.stdout, g.stdout
        gcs += 1
    count("concurrency.races", gcs)
    assert p.returncode == 0 and saw_tmp and gcs >= 1
    assert (node.store / "dumping" / "checkpoint.done").is_file()
    assert node.warmstart("verify", "dumping").returncode == 0
    c.delete()
