"""Structured logs: warmstart's own JSON lines, and runc-format lines in the shim's --log.

The shim reports a failed runc call by reading the `--log` file (runc's JSON
format: level, msg, time), so a reason we fall back to a cold start belongs
there too; our own log under log_dir keeps the full record per event.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


KEEP_CRIU_LOGS = 200  # per kind (dump-*, restore-*): one per container id would grow without bound


def keep_criu_log(log_dir: Path, kind: str, container_id: str, src: Path) -> Path | None:
    """Copy a CRIU log out of a work dir that is about to go, keeping only the newest of its kind."""
    if not src.exists():
        return None
    try:
        log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        dst = log_dir / f"{kind}-{container_id}.log"
        shutil.copyfile(src, dst)
        dst.chmod(0o600)
        old = sorted(log_dir.glob(f"{kind}-*.log"), key=lambda p: p.stat().st_mtime, reverse=True)
        for stale in old[KEEP_CRIU_LOGS:]:
            stale.unlink(missing_ok=True)
        return dst
    except OSError:
        return None  # logging must never break a container operation


def _append(path: Path, line: str) -> None:
    """One write(2) per line with O_APPEND, so concurrent writers never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)


@dataclass
class Logger:
    log_dir: Path | None = None
    runc_log: Path | None = None  # the shim's --log file, when called by the shim
    context: dict[str, Any] = field(default_factory=dict)
    echo: bool = False  # also print to stderr (CLI use; never in the runtime: stderr is the container's)

    def event(self, level: str, msg: str, **fields: Any) -> None:
        rec = {"time": _now(), "level": level, "msg": msg, **self.context, **fields}
        line = json.dumps(rec, default=str, sort_keys=False)
        if self.log_dir is not None:
            try:
                self.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                _append(self.log_dir / "runtime.log", line)
            except OSError:
                pass  # logging must never break a container operation
        if self.runc_log is not None:
            try:
                _append(self.runc_log, json.dumps(
                    {"level": level, "msg": f"warmstart: {msg}", "time": rec["time"],
                     **{k: v for k, v in fields.items() if isinstance(v, (str, int, float, bool))}},
                    default=str))
            except OSError:
                pass
        if self.echo:
            import sys
            print(f"warmstart: {level}: {msg}", file=sys.stderr)

    def info(self, msg: str, **fields: Any) -> None:
        self.event("info", msg, **fields)

    def warning(self, msg: str, **fields: Any) -> None:
        self.event("warning", msg, **fields)

    def error(self, msg: str, **fields: Any) -> None:
        self.event("error", msg, **fields)
