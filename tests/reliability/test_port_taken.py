"""A restore whose listening port is already taken in the new network namespace.

As in a CRI pod, each container joins a network namespace by path (`ip netns`).
The dumped worker listens on 127.0.0.1:7777; in the restoring container's netns
another process holds that port, so CRIU cannot re-bind the socket.  Expect: a
cold start (the fresh worker reports that the port is taken), nothing of the
attempt left, the reason (CRIU's bind error) logged; with the port free again, the same
checkpoint restores (the control).
"""
from __future__ import annotations

import json
import secrets
import subprocess
import time

import pytest
from reliability_lib import RNode, ann, assert_clean, count, shim

pytestmark = [pytest.mark.reliability]
PORT = 7777
# The e2e workload, plus a listening socket (bound before it reports ready).
LISTENER = (
    "import socket, signal, sys, runpy\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "try:\n"
    f"    s.bind(('127.0.0.1', {PORT})); s.listen(8); bound = 'ok'\n"
    "except OSError as e:\n"
    "    bound = 'taken'\n"
    "print(bound, flush=True)\n"
    "sys.argv = ['/workload.py'] + sys.argv[1:]\n"
    "runpy.run_path('/workload.py', run_name='__main__')\n")


@pytest.fixture
def netns():
    names = []

    def make() -> str:
        name = f"wsrel-{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        names.append(name)
        return name
    yield make
    for name in names:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def _in_netns(c: shim.Container, name: str) -> None:
    cfg = c.bundle / "config.json"
    spec = json.loads(cfg.read_text())
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"] + [
        {"type": "network", "path": f"/var/run/netns/{name}"}]
    cfg.write_text(json.dumps(spec))


def test_port_taken_in_the_new_netns_means_cold_start(node: RNode, netns):
    first, second = netns(), netns()
    a = node.ctr("listener", ann("port"), args=["python3", "-c", LISTENER, str(8 << 20), node.tag])
    _in_netns(a, first)
    a.create()
    a.start()
    assert os_read_line(a) == "ok"
    ready = a.readline()
    a.ask()
    assert a.stop().returncode == 0
    a.delete()
    assert (node.store / "port" / "checkpoint.done").is_file(), node.log_msgs()
    before = node.snapshot()
    holder = subprocess.Popen(["ip", "netns", "exec", second, "python3", "-c",
                               f"import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {PORT})); "
                               f"s.listen(1); print('held', flush=True); time.sleep(300)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        since = len(node.runtime_log())
        b = node.ctr("restorer", ann("port"), args=["python3", "-c", LISTENER, str(8 << 20), node.tag])
        _in_netns(b, second)
        b.create()
        b.start()
        assert os_read_line(b) == "taken", "started cold: the fresh worker finds its port taken"
        fresh = b.readline()
        assert fresh["event"] == "ready" and fresh["random"] != ready["random"]
        msgs = node.log_msgs(since)
        assert any(m.startswith("cold start:") and "restore from port failed" in m and "bind" in m.lower()
                   for m in msgs), msgs
        count("faults.restore")
        b.stop()
        b.delete()
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.2)
    assert_clean(node, before, "after a restore into a netns whose port was taken")
    # control: with the port free, the same checkpoint restores into the same namespace
    c = node.ctr("control", ann("port"), args=["python3", "-c", LISTENER, str(8 << 20), node.tag])
    _in_netns(c, second)
    c.create()
    c.start()
    assert c.ask()["random"] == ready["random"], "restored: the dumped process, listening socket included"
    c.stop()
    c.delete()


def os_read_line(c: shim.Container) -> str:
    """The listener's first line is plain text, before the workload's JSON lines."""
    import os
    import select
    while b"\n" not in c.buf:
        assert select.select([c.proc_stdout], [], [], 60)[0], "no output from the container"
        c.buf += os.read(c.proc_stdout, 65536)
    line, c.buf = c.buf.split(b"\n", 1)
    return line.decode().strip()
