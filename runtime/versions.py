"""Versions recorded at dump and compared at restore."""
from __future__ import annotations

import os
import platform
import re
import subprocess
from functools import lru_cache
from pathlib import Path

from . import __version__, criu


@lru_cache(maxsize=4)
def runc_version(runc: Path) -> str:
    try:
        out = subprocess.run([str(runc), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    m = re.search(r"runc version (\S+)", out)
    return m.group(1) if m else "unknown"


def node_versions(runc: Path, criu_path: Path) -> dict[str, str]:
    return {"criu": criu.version_str(criu.version(criu_path)), "runc": runc_version(runc),
            "kernel": os.uname().release, "arch": platform.machine(), "warmstart": __version__}


def cgroup_version() -> int:
    return 2 if Path("/sys/fs/cgroup/cgroup.controllers").exists() else 1
