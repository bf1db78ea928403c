#!/usr/bin/env python3
"""Reference worker: a stand-in for an inference server, stdlib only.

Its cold start does the kind of work a real worker does before it can serve
(imports, building a large deterministic state by computation, a warm-up
pass), so that a checkpoint/restore has something real to skip and something
checkable to preserve:

* the state is one big ``bytearray`` (private anonymous memory, the way model
  weights sit in a process) so CRIU dumps it as ordinary pages;
* the state is a SHAKE-256 hash chain over 1 MiB chunks, repeated ``--rounds``
  times; each chunk depends on the previous one, so it cannot be shortcut or
  parallelised, its bytes are non-zero and non-repeating, and its SHA-256
  (``checksum``) is a pure function of ``--state-mb``, ``--rounds`` and
  ``--seed``: a restored worker must report the same value as a cold one;
* ``counter`` (per request), ``boot_id``/``started_at``/``random_value`` (drawn
  at process start) tell a restored process (same boot_id, counter continues)
  from a cold-started one (new boot_id, counter at 0).

Endpoints: ``GET /ready`` (200 once ready, 503 before), ``GET /infer``
(JSON; ``?verify=1`` recomputes the checksum from memory), ``GET /healthz``.
Prints one line starting with ``refworker ready`` to stdout when ready.

Defaults (1 GiB, 4 rounds) take a few tens of seconds on a 2-core VM;
``--state-mb 16 --rounds 1`` starts in well under a second, for tests.
Runs as PID 1 in a container, where signals without a handler are ignored:
SIGTERM/SIGINT therefore get an explicit handler that exits at once.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import socket
import socketserver
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

CHUNK = 1 << 20  # 1 MiB: small enough that a signal handler runs promptly


class Worker:
    """Holds the state and the per-process facts the endpoints report."""

    def __init__(self, state_mb: int, rounds: int, seed: str) -> None:
        self.state_mb = state_mb
        self.rounds = rounds
        self.seed = seed
        self.state = bytearray(state_mb * CHUNK)
        self.ready = threading.Event()
        self.lock = threading.Lock()
        self.counter = 0
        self.checksum = ""
        self.boot_id = str(uuid.uuid4())
        self.started_at = time.time()
        # Drawn from the OS at start: one snapshot restored many times would
        # share it, which is exactly what a test of "fresh randomness" checks.
        self.random_value = random.SystemRandom().getrandbits(63)
        self.phases: dict[str, float] = {}

    def build(self) -> None:
        """Fill the state with a sequential hash chain (the CPU-heavy cold start)."""
        view = memoryview(self.state)
        n = self.state_mb
        link = hashlib.sha256(f"refworker:{self.seed}".encode()).digest()
        t = time.monotonic()
        for i in range(n):
            chunk = hashlib.shake_256(link + i.to_bytes(8, "little")).digest(CHUNK)
            view[i * CHUNK:(i + 1) * CHUNK] = chunk
            link = hashlib.sha256(chunk[-64:] + link).digest()
        self.phases["fill_s"] = time.monotonic() - t
        t = time.monotonic()
        for r in range(1, self.rounds):
            for i in range(n):
                cur = view[i * CHUNK:(i + 1) * CHUNK]
                h = hashlib.shake_256(link + r.to_bytes(4, "little"))
                h.update(cur)
                out = h.digest(CHUNK)
                view[i * CHUNK:(i + 1) * CHUNK] = out
                link = hashlib.sha256(out[:64] + link).digest()
        self.phases["mix_s"] = time.monotonic() - t
        view.release()

    def compute_checksum(self) -> str:
        return hashlib.sha256(self.state).hexdigest()

    def warm_up(self) -> None:
        """Touch every page and compute the checksum once (the 'first inference')."""
        t = time.monotonic()
        self.checksum = self.compute_checksum()
        self.phases["warmup_s"] = time.monotonic() - t

    def infer(self, verify: bool) -> dict:
        with self.lock:
            self.counter += 1
            counter = self.counter
        body = {
            "checksum": self.checksum,
            "counter": counter,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "boot_id": self.boot_id,
            "started_at": self.started_at,
            "random_value": self.random_value,
            "state_mb": self.state_mb,
            "rounds": self.rounds,
            "seed": self.seed,
            "phases": self.phases,
            "now": time.time(),
        }
        if verify:
            t = time.monotonic()
            actual = self.compute_checksum()
            body["verified"] = actual == self.checksum
            body["verify_checksum"] = actual
            body["verify_s"] = time.monotonic() - t
        return body


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup
        # that stalls ~10 s in a pod whose resolv.conf points at an
        # unreachable resolver; the name is only used in CGI env vars.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), port


def make_handler(worker: Worker) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: one request per connection, so no idle established TCP
        # connection lingers into a checkpoint.
        protocol_version = "HTTP/1.0"

        def _send(self, code: int, body: dict) -> None:
            data = (json.dumps(body) + "\n").encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            url = urlparse(self.path)
            if url.path == "/ready":
                if worker.ready.is_set():
                    self._send(200, {"ready": True, "checksum": worker.checksum})
                else:
                    self._send(503, {"ready": False})
            elif url.path == "/infer":
                if not worker.ready.is_set():
                    self._send(503, {"ready": False})
                    return
                verify = parse_qs(url.query).get("verify", ["0"])[0] not in ("0", "", "false")
                self._send(200, worker.infer(verify))
            elif url.path == "/healthz":
                self._send(200, {"ok": True})
            else:
                self._send(404, {"error": "not found", "path": url.path})

        def log_message(self, fmt: str, *args: object) -> None:
            pass  # keep the container log to the lines that matter

    return Handler


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--state-mb", type=int, default=1024, help="size of the state (MiB)")
    p.add_argument("--rounds", type=int, default=4,
                   help="hash-chain passes over the state (cold-start CPU cost grows linearly)")
    p.add_argument("--seed", default="warmstart", help="changes the state (and checksum)")
    p.add_argument("--ready-file", default="", help="write this file once ready (for checkpoint-after-ready)")
    a = p.parse_args(argv)
    if a.state_mb < 1 or a.rounds < 1:
        p.error("--state-mb and --rounds must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    t0 = time.monotonic()

    def _exit(signum: int, _frame: object) -> None:
        print(f"refworker: signal {signum}, exiting", flush=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)

    worker = Worker(args.state_mb, args.rounds, args.seed)
    server = Server((args.host, args.port), make_handler(worker))
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    print(f"refworker starting pid={os.getpid()} port={args.port} state_mb={args.state_mb} "
          f"rounds={args.rounds} boot_id={worker.boot_id}", flush=True)

    worker.build()
    worker.warm_up()
    worker.phases["cold_start_s"] = time.monotonic() - t0
    worker.ready.set()
    if args.ready_file:
        with open(args.ready_file, "w") as f:
            f.write(worker.checksum + "\n")
    print(f"refworker ready port={args.port} checksum={worker.checksum} "
          f"cold_start_s={worker.phases['cold_start_s']:.2f}", flush=True)

    while True:  # the main thread only waits (and runs signal handlers)
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
