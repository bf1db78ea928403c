"""Worker hooks around a checkpoint: `warmstart.dev/pre-dump` and `warmstart.dev/post-restore`.

A small image is a checkpoint of a worker that first gave back what it can
rebuild (vLLM's sleep mode frees the KV cache and offloads weights); after the
restore it takes it again.  Each annotation holds one action:

  http://HOST:PORT/PATH           GET, from inside the container's network namespace
  POST http://HOST:PORT/PATH      (GET or POST before the URL)
  [GET|POST] :PORT/PATH           same, on 127.0.0.1 of the container
  anything else                   a shell command run in the container (`runc exec`, `sh -c`)

`warmstart.dev/hook-timeout` (seconds, default 60) bounds each; the post-restore hook runs inside
the create and gets at most what is left of the node's create_budget_s (budget.py).  A 2xx answer
or exit status 0 is success.  What failure means (docs/gpu.md):
  pre-dump fails  → no checkpoint; the stop goes on as plain runc (a half-slept
                    worker must not become the image every later pod restores)
  post-restore fails → the restore counts as failed: the restored container is
                    removed and the container starts cold (a worker that did not
                    wake is not a working worker); the failure counts towards
                    the checkpoint's quarantine like any failed restore.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import nsrun, runc

DEFAULT_TIMEOUT_S = 60
_HTTP_RE = re.compile(r"^(?:(GET|POST)\s+)?(http://\S+|:\d{1,5}/\S*)$")


class HookError(RuntimeError):
    pass


@dataclass(frozen=True)
class Action:
    kind: str  # "http" or "exec"
    method: str = "GET"
    url: str = ""
    command: str = ""

    def describe(self) -> str:
        return f"{self.method} {self.url}" if self.kind == "http" else f"exec {self.command!r}"


def parse(value: str) -> Action:
    """One annotation value → an Action; ValueError on what cannot be one (annotations.py names the key)."""
    v = value.strip()
    if not v:
        raise ValueError("empty; give a URL, [GET|POST] :PORT/PATH, or a shell command")
    m = _HTTP_RE.match(v)
    if m:
        method, target = m.group(1) or "GET", m.group(2)
        if target.startswith(":"):
            target = "http://127.0.0.1" + target
        u = urlsplit(target)
        if not u.hostname or (u.port is not None and not 0 < u.port < 65536):
            raise ValueError(f"bad URL {target!r}")
        return Action("http", method, target)
    if re.match(r"^(GET|POST)\s", v) or v.startswith(("https://", "http:")):
        raise ValueError(f"{v[:60]!r}: only plain http:// URLs (or :PORT/PATH) are supported")
    return Action("exec", command=v)


def parse_timeout(value: str | None) -> int:
    if value is None:
        return DEFAULT_TIMEOUT_S
    try:
        t = int(value.strip())
    except ValueError:
        raise ValueError(f"{value[:20]!r} is not an integer number of seconds") from None
    if not 1 <= t <= 3600:
        raise ValueError(f"{t} out of range; use 1-3600 seconds")
    return t


def _http_in_netns(pid: int | None, action: Action, timeout: float, source: str) -> str:
    """Do the request from inside the container's network namespace (nsrun's child does the setns)."""
    def request() -> bytes:
        u = urlsplit(action.url)
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
        conn.request(action.method, (u.path or "/") + (f"?{u.query}" if u.query else ""),
                     body=b"" if action.method == "POST" else None)
        resp = conn.getresponse()
        body = resp.read(300).decode(errors="replace")
        return json.dumps({"ok": 200 <= resp.status < 300, "msg": f"HTTP {resp.status} {body.strip()[:200]}"}).encode()
    out = nsrun.run(request, setns=((f"/proc/{pid}/ns/net", nsrun.CLONE_NEWNET),) if pid else (),
                    timeout_s=timeout + 1)
    if not out.ok:
        if out.error.startswith("timed out"):
            raise HookError(f"{action.describe()} timed out after {timeout:g}s ({source})")
        raise HookError(f"{action.describe()} failed: {out.error}")
    res = json.loads(out.data)
    if not res["ok"]:
        raise HookError(f"{action.describe()} failed: {res['msg']}")
    return str(res["msg"])


def _exec(rc: runc.Runc, container_id: str, spec: dict[str, Any], action: Action, timeout: float,
          source: str) -> str:
    proc = dict(spec.get("process") or {})
    proc.update({"args": ["/bin/sh", "-c", action.command], "terminal": False})
    proc.pop("consoleSize", None)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(proc, f)
    try:
        p = rc.exec(container_id, Path(f.name), timeout)
    except subprocess.TimeoutExpired:
        raise HookError(f"{action.describe()} timed out after {timeout:g}s ({source})") from None
    finally:
        os.unlink(f.name)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise HookError(f"{action.describe()} exited {p.returncode}: {tail[0][:200]}")
    return (p.stdout or "").strip()[-200:]


def run(action: Action, rc: runc.Runc, container_id: str, spec: dict[str, Any], timeout: float,
        pid: int | None = None, timeout_source: str = "warmstart.dev/hook-timeout") -> str:
    """Run one action against the running container; its output on success, HookError otherwise (a timeout's
    names `timeout_source`: the annotation, or the create's budget that cut it)."""
    if action.kind == "http":
        own_netns = any(ns.get("type") == "network" for ns in (spec.get("linux") or {}).get("namespaces") or [])
        if pid is None and own_netns:
            st = rc.state(container_id)
            pid = int(st["pid"]) if st and st.get("pid") else None
            if not pid:
                raise HookError(f"{action.describe()}: container {container_id} has no running process")
        return _http_in_netns(pid if own_netns else None, action, timeout, timeout_source)
    return _exec(rc, container_id, spec, action, timeout, timeout_source)
