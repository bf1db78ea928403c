"""warmstart-hook: OCI hook entry point (state JSON on stdin, per the runtime spec).

createRuntime: record the container's mount table as the runtime built it
(after other hooks, e.g. the NVIDIA toolkit's, added theirs), for remapping at
restore.  poststop: note that the container stopped (its state goes at `delete`).  A hook that fails
fails the container, so these log and exit 0 on every error.
"""
from __future__ import annotations

import argparse
import json
import time
import sys
from pathlib import Path


def _log(state_dir: Path, msg: str) -> None:
    try:
        with open(state_dir / "hook.log", "a") as f:
            f.write(json.dumps({"msg": msg}) + "\n")
    except OSError:
        pass


def create_runtime(state: dict, state_dir: Path) -> None:
    pid = state.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        _log(state_dir, f"createRuntime: no pid in state ({state.get('status')})")
        return
    try:
        text = Path(f"/proc/{pid}/mountinfo").read_text()
    except OSError as e:
        _log(state_dir, f"createRuntime: cannot read mountinfo of {pid}: {e}")
        return
    if state_dir.is_dir():
        (state_dir / "mountinfo").write_text(text)


def poststop(state: dict, state_dir: Path) -> None:
    """Record that the container stopped; removal is `warmstart-runtime delete`'s job.

    runc also runs poststop when `runc checkpoint` destroys the container and
    when a failed restore is cleaned up, while warmstart still uses the state
    dir (the plain-dir baseline, the rootfs undo journal), so nothing goes here.
    """
    if state_dir.name != str(state.get("id")):
        _log(state_dir, f"poststop: state dir {state_dir} is not for container {state.get('id')}; left alone")
        return
    if state_dir.is_dir():
        (state_dir / "stopped").write_text(str(time.time()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="warmstart-hook", description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["createRuntime", "prestart", "poststop"])
    ap.add_argument("--state-dir", type=Path, default=None,
                    help="the container's warmstart state dir (default: <config state_dir>/containers/<id>)")
    args = ap.parse_args(argv)
    try:
        state = json.loads(sys.stdin.read() or "{}")
    except ValueError:
        state = {}
    if args.state_dir is None:  # CRI-O/Podman hooks.d: no per-container argument there
        cid = str(state.get("id") or "")
        if not cid or "/" in cid or cid in (".", ".."):
            return 0
        try:
            from warmstart import config  # noqa: PLC0415
            args.state_dir = config.load().state_dir / "containers" / cid
            args.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except Exception:  # noqa: BLE001 - never fail the container from a hook
            return 0
    try:
        if args.stage in ("createRuntime", "prestart"):
            create_runtime(state, args.state_dir)
        else:
            poststop(state, args.state_dir)
    except Exception as e:  # noqa: BLE001 - never fail the container from a hook
        _log(args.state_dir, f"{args.stage}: {type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
