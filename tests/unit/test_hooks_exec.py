"""Worker hooks (warmstart.dev/pre-dump, post-restore, hook-timeout): parsing, validation, HTTP calls."""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from warmstart import annotations, hooks_exec, runc


def test_parse_forms():
    a = hooks_exec.parse("POST :8000/sleep?level=1")
    assert (a.kind, a.method, a.url) == ("http", "POST", "http://127.0.0.1:8000/sleep?level=1")
    assert hooks_exec.parse("http://localhost:9/x").method == "GET"
    assert hooks_exec.parse("curl -s localhost:8000/x").kind == "exec"
    for bad in ("", "https://x/y", "POST nothing-here"):
        with pytest.raises(ValueError):
            hooks_exec.parse(bad)


def test_annotations_validate_hooks():
    base = {"warmstart.dev/checkpoint": "on-stop", "warmstart.dev/id": "x"}
    ok = {**base, "warmstart.dev/pre-dump": "POST :8000/sleep?level=1",
          "warmstart.dev/post-restore": "POST :8000/wake_up", "warmstart.dev/hook-timeout": "30"}
    assert annotations.policy_from_spec({"annotations": ok}).checkpoint_id == "x"
    h = annotations.worker_hooks(ok)
    assert h.timeout_s == 30 and h.pre_dump.method == "POST" and h.post_restore.url.endswith("/wake_up")
    assert annotations.worker_hooks(base) == annotations.WorkerHooks()
    with pytest.raises(annotations.AnnotationError, match="^warmstart.dev/hook-timeout: "):
        annotations.policy_from_spec({"annotations": {**base, "warmstart.dev/hook-timeout": "soon"}})
    with pytest.raises(annotations.AnnotationError, match="^warmstart.dev/hook-timeout: .*range"):
        annotations.policy_from_spec({"annotations": {**base, "warmstart.dev/hook-timeout": "0"}})
    with pytest.raises(annotations.AnnotationError, match="^warmstart.dev/pre-dump: "):
        annotations.policy_from_spec({"annotations": {**base, "warmstart.dev/pre-dump": "https://x/y"}})


class _H(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        code = 200 if self.path.startswith("/sleep") else 500
        if self.path.startswith("/slow"):
            time.sleep(3)
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"ok" if code == 200 else b"boom")

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    s = HTTPServer(("127.0.0.1", 0), _H)
    t = threading.Thread(target=s.serve_forever, daemon=True)
    t.start()
    yield s.server_address[1]
    s.shutdown()


def _run(value, timeout=5):
    # a container in the host's network namespace: no setns needed, no runc involved
    return hooks_exec.run(hooks_exec.parse(value), runc.Runc(Path("/nonexistent/runc")), "c",
                          {"linux": {"namespaces": [{"type": "pid"}]}}, timeout)


def test_http_success_failure_and_timeout(server):
    assert "HTTP 200" in _run(f"POST :{server}/sleep?level=1")
    with pytest.raises(hooks_exec.HookError, match="HTTP 500"):
        _run(f"POST :{server}/wake_up")
    with pytest.raises(hooks_exec.HookError, match="timed out|TimeoutError|timed"):
        _run(f"POST :{server}/slow", timeout=1)
    with pytest.raises(hooks_exec.HookError, match="ConnectionRefused"):
        _run("GET :1/x")
