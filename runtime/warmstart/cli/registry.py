"""`warmstart push` / `warmstart pull`: checkpoints through a registry (runtime/warmstart/transfer.py, skopeo).

The registry, TLS and credentials default to the config's [registry]; a reference left out is the
automatic paths' own, `<repository>:<namespace>.<id>` (runtime/warmstart/fleet.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import config, fleet, oci, transfer
from ..ids import validate_id
from ..store import CheckpointError
from .store_cmds import add_scope_argument


def _common(p: argparse.ArgumentParser) -> None:
    add_scope_argument(p)  # pull: the checkpoint's own (signed) namespace must be this one
    p.add_argument("--tls-verify", choices=["true", "false"],
                   help="verify the registry's TLS certificate (false for a plain-HTTP test registry; "
                        "default: [registry] tls_verify)")
    p.add_argument("--authfile", type=Path, help="registry credentials (skopeo --authfile; default: [registry] auth_file)")
    p.add_argument("--progress", action="store_true", default=None,
                   help="show progress on stderr (the default when stderr is a terminal)")


def add_push_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", type=validate_id)
    p.add_argument("ref", nargs="?", help="image reference, e.g. registry.local:5000/checkpoints/qwen:7341f4ec "
                                          "(default: [registry] repository, tagged NAMESPACE.ID)")
    _common(p)


def add_pull_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ref", nargs="?", help="image reference pushed by `warmstart push` "
                                          "(default with --id: [registry] repository, tagged NAMESPACE.ID)")
    p.add_argument("--id", type=validate_id,
                   help="the checkpoint id the image must hold (its warmstart.dev/checkpoint-id); refused otherwise")
    _common(p)


def _setup(args: argparse.Namespace, cid: str | None) -> tuple[config.Settings, str, transfer.Remote, bool]:
    settings = config.load()
    reg = settings.registry
    if args.ref is None and cid is None:
        raise ValueError("give an image reference, or --id to use [registry] repository")
    ref = transfer.check_ref(args.ref) if args.ref is not None else fleet.ref_for(settings, args.scope, cid or "")
    tls = reg.tls_verify if args.tls_verify is None else args.tls_verify == "true"
    remote = transfer.Remote(tls, args.authfile or reg.auth_file)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    return settings, ref, remote, progress


def run_push(args: argparse.Namespace) -> int:
    try:
        settings, ref, remote, progress = _setup(args, args.id)
        done = transfer.push(settings, args.scope, args.id, ref, remote, progress)
    except (oci.OciError, CheckpointError, ValueError) as e:
        print(f"warmstart push: {args.id}: refused: {e}", file=sys.stderr)
        return 1
    print(f"{args.id}: pushed to {ref} in {done.seconds:.1f}s ({done.copied.sent} blobs sent, "
          f"{done.copied.skipped} already in the registry)")
    return 0


def run_pull(args: argparse.Namespace) -> int:
    ref = args.ref or args.id
    try:
        settings, ref, remote, progress = _setup(args, args.id)
        cid = transfer.pull(settings, args.scope, ref, remote, args.id, progress)
    except (oci.OciError, CheckpointError, ValueError) as e:
        print(f"warmstart pull: {ref}: refused: {e}", file=sys.stderr)
        return 1
    print(f"{cid}: pulled from {ref}, verified and sealed")
    return 0
