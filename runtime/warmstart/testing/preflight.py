"""What the commands that start containers (demo, bench) need before they start anything."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def ready_to_run(command: str, runtime: Path, needs: str) -> bool:
    """True when running as root with the runtime installed; else one line saying the fix."""
    if os.geteuid() != 0:
        print(f"warmstart {command}: must run as root ({needs})", file=sys.stderr)
        return False
    if not runtime.exists():
        print(f"warmstart {command}: {runtime} not found; run install.sh first", file=sys.stderr)
        return False
    return True
