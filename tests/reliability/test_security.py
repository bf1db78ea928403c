"""Security defaults, end to end: root-only store and logs, no secrets in clear in metadata or logs,
the pass-through path runs only the configured runc, and `warmstart doctor` flags an unsafe store."""
from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from reliability_lib import RNode, ann, count, start_ready

pytestmark = [pytest.mark.reliability]
SECRETS = {"API_TOKEN": "tok-3f9a1c", "AWS_SECRET_ACCESS_KEY": "aws-77d0e2", "DB_PASSWORD": "pw-c0ffee",
           "HF_AUTH": "hf-b16b00"}


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def test_store_and_logs_root_only_and_no_secrets_in_clear(node: RNode):
    c = node.ctr("sec", ann("sec"))
    cfg = json.loads((c.bundle / "config.json").read_text())
    cfg["process"]["env"] += [f"{k}={v}" for k, v in SECRETS.items()] + ["PLAIN_SETTING=visible-123"]
    (c.bundle / "config.json").write_text(json.dumps(cfg))
    start_ready(c)
    c.ask()
    assert c.stop().returncode == 0
    c.delete()
    ck = node.store / "sec"
    assert (ck / "checkpoint.done").is_file()
    # permissions: dirs 0700, files 0600, all root
    for d in (node.store_root, node.store, ck, node.base / "seals", node.seals, node.base / "logs", node.store / ".locks",
              node.store / ".tmp"):
        assert mode(d) == 0o700 and d.lstat().st_uid == 0, (d, oct(mode(d)))
    for f in list(ck.iterdir()) + list((node.base / "logs").iterdir()) + list(node.seals.iterdir()):
        assert mode(f) == 0o600 and f.lstat().st_uid == 0, (f, oct(mode(f)))
    # restore once, so restore logs exist too
    r = node.ctr("sec2", ann("sec"))
    r.create()
    r.start()
    r.ask()
    r.stop()
    r.delete()
    for f in (node.base / "logs").iterdir():
        assert mode(f) == 0o600, (f, oct(mode(f)))
    # secrets: hashed in metadata, absent from every text file warmstart writes
    meta = json.loads((ck / "metadata.json").read_text())
    env = dict(e.split("=", 1) for e in meta["container"]["env"])
    for k in SECRETS:
        assert env[k].startswith("sha256:"), env[k]
    assert env["PLAIN_SETTING"] == "visible-123"
    texts = [ck / "metadata.json", ck / "checkpoint.done", ck / "dump.log", node.base / "logs" / "runtime.log",
             c.bundle / "log.json", r.bundle / "log.json", *(node.base / "logs").glob("restore-*.log"),
             *node.seals.iterdir()]
    for t in texts:
        data = t.read_bytes()
        for k, v in SECRETS.items():
            assert v.encode() not in data, f"{k}'s value in clear in {t}"
        count("security.files_scanned")
    # (the process's memory, in pages-*.img, holds its environment by nature: see docs/security.md)


def test_passthrough_runs_only_the_configured_runc(node: RNode, tmp_path):
    fake_dir = tmp_path / "path"
    fake_dir.mkdir()
    marker = tmp_path / "fake-runc-ran"
    for name in ("runc", "criu"):
        f = fake_dir / name
        f.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
        f.chmod(0o755)
    wrapper = node.bin / "runc-wrapper"
    calls = node.bin / "runc-calls"
    wrapper.write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\nexec /usr/sbin/runc \"$@\"\n")
    wrapper.chmod(0o755)
    node.set_config(runc=str(wrapper))
    env_path = f"{fake_dir}:{os.environ.get('PATH', '')}"
    for short, annotations in (("plain", {}), ("opted", ann("pt"))):
        c = node.ctr(short, annotations)
        c.extra_env["PATH"] = env_path
        start_ready(c)
        c.ask()
        c.stop()
        c.delete()
    count("security.passthrough_runs", 2)
    assert not marker.exists(), "a runc/criu from PATH was executed"
    ops = [ln.split() for ln in calls.read_text().splitlines()]
    subcommands = {next((a for a in op if a in {"create", "start", "kill", "delete", "state", "checkpoint"}), None)
                   for op in ops}
    assert {"create", "start", "kill", "delete", "checkpoint"} <= subcommands, subcommands


@pytest.mark.parametrize("problem", ["group_readable", "world_writable", "not_root"])
def test_doctor_flags_an_unsafe_store(node: RNode, problem: str):
    node.store_root.mkdir(mode=0o700, exist_ok=True)
    if problem == "group_readable":
        node.store_root.chmod(0o750)
    elif problem == "world_writable":
        node.store_root.chmod(0o777)
    else:
        os.chown(node.store_root, 1000, 1000)
    p = subprocess.run(["warmstart", "doctor", "--json"], capture_output=True, text=True,
                       env={**os.environ, **node.env()}, timeout=180)
    rows = [r for r in json.loads(p.stdout) if r["check"] == "store"]
    count("security.doctor_cases")
    want = "warn" if problem == "group_readable" else "FAIL"
    assert rows and rows[0]["status"] == want and rows[0]["fix"], rows
