"""What test_podman.py and test_ctr.py share: the workload, reading its output, the node's log and store.

The clients run the reference worker image (python3) with this program instead of the worker:
its state is in memory (a random value drawn at start, a counter, a buffer), it prints one JSON
line per tick, and its TERM handler exits with $TERM_EXIT, so a stop's exit status is the
workload's own under plain runc.  With $BLOB_MB it first writes that many MiB of random bytes to
/var/tmp/blob (the rootfs diff a checkpoint must carry) and prints their SHA-256.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Callable

import pytest
import shim

RUNC = shutil.which("runc") or "/usr/sbin/runc"


def marks(client: str) -> list[pytest.MarkDecorator]:
    """An e2e module's marks: skip, saying why, without root, the client, the runtime or CRIU."""
    return [
        pytest.mark.e2e,
        pytest.mark.skipif(os.geteuid() != 0, reason=f"needs root ({client}, runc, CRIU)"),
        pytest.mark.skipif(not shutil.which(client), reason=f"{client} not installed (install.sh installs it)"),
        pytest.mark.skipif(not Path(shim.RUNTIME).exists(), reason=f"{shim.RUNTIME} not installed (install.sh)"),
        pytest.mark.skipif(not Path("/usr/local/sbin/criu").exists(), reason="needs CRIU >= 4.1 (install.sh)"),
    ]

TICKER = r'''
import hashlib, json, os, random, signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(int(os.environ.get("TERM_EXIT", "0"))))
rnd = random.SystemRandom().getrandbits(62)
state = bytearray(os.urandom(8 << 20))
blob = ""
if int(os.environ.get("BLOB_MB", "0")):
    data = os.urandom(int(os.environ["BLOB_MB"]) << 20)
    with open("/var/tmp/blob", "wb") as f:
        f.write(data)
    blob = hashlib.sha256(data).hexdigest()
n = 0
while True:
    n += 1
    print(json.dumps({"random": rnd, "counter": n, "blob": blob}), flush=True)
    time.sleep(0.1)
'''
COMMAND = ["python3", "-c", TICKER]
BLOB_SHA = ["python3", "-c", "import hashlib; print(hashlib.sha256(open('/var/tmp/blob', 'rb').read()).hexdigest())"]
# Exits without a stop: stdout, stderr and status to compare between runc and warmstart-runtime.
ONE_SHOT = ["python3", "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(7)"]


def unique(prefix: str) -> str:
    """Names and checkpoint ids of one test run: the node's store is shared by the session."""
    return f"{prefix}-{secrets.token_hex(3)}"


def ticks(text: str) -> list[dict]:
    """The workload's lines; anything else in its output (runc's or CRIU's words) fails the test."""
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            raise AssertionError(f"not the workload's output: {line!r}") from None
        assert isinstance(rec, dict) and {"random", "counter"} <= rec.keys(), line
        out.append(rec)
    return out


def wait_ticks(read: Callable[[], str], n: int = 2, timeout: float = 60) -> list[dict]:
    """The workload's lines once it printed at least n."""
    deadline = time.monotonic() + timeout
    while True:
        got = ticks(read())
        if len(got) >= n:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"the workload printed {len(got)} lines in {timeout}s")
        time.sleep(0.1)


def annotations(cid: str) -> dict[str, str]:
    return {"warmstart.dev/checkpoint": "on-stop", "warmstart.dev/id": cid}


class NodeFiles:
    """The warmstart node a test's client runs against (the session's WARMSTART_CONFIG)."""

    def __init__(self, config: Path) -> None:
        self.base = config.parent

    def checkpoint(self, cid: str) -> Path:
        return self.base / "checkpoints" / "_local" / cid

    def log_msgs(self, container: str | None = None) -> list[str]:
        p = self.base / "log" / "runtime.log"
        recs = [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []
        return [r.get("msg", "") for r in recs if container is None or r.get("container") == container]
