"""`warmstart push` / `warmstart pull`: checkpoints through a registry (runtime/oci.py, skopeo)."""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from .. import config, oci
from ..ids import validate_id
from ..store import CheckpointError, Store
from .store_cmds import add_scope_argument


def _tls(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-verify", choices=["true", "false"], default="true",
                   help="verify the registry's TLS certificate (false for a plain-HTTP test registry)")
    p.add_argument("--authfile", type=Path, help="registry credentials (skopeo --authfile)")


def add_push_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", type=validate_id)
    p.add_argument("ref", help="image reference, e.g. registry.local:5000/checkpoints/qwen:7341f4ec")
    add_scope_argument(p)
    _tls(p)


def add_pull_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ref", help="image reference pushed by `warmstart push`")
    p.add_argument("--id", type=validate_id,
                   help="the checkpoint id the image must hold (its warmstart.dev/checkpoint-id); refused otherwise")
    add_scope_argument(p)  # the checkpoint's own (signed) namespace must be this one
    _tls(p)


def _skopeo_flags(args: argparse.Namespace, side: str) -> list[str]:
    """TLS and credential flags; side "src"/"dest" for skopeo copy, "" for skopeo inspect."""
    prefix = f"--{side}-" if side else "--"
    flags = [f"{prefix}tls-verify={args.tls_verify}"]
    if args.authfile:
        flags.append(f"{prefix}authfile={args.authfile}")
    return flags


def _ref(ref: str) -> str:
    if "://" in ref or ref.startswith("-") or any(c.isspace() for c in ref):
        raise ValueError(f"image reference {ref!r}: give it as host[:port]/name:tag, without a transport")
    return ref


def run_push(args: argparse.Namespace) -> int:
    store = Store(config.load(), args.scope)
    ref = _ref(args.ref)
    try:
        ckpt = store.open_verified(args.id, full=True)  # never ship a damaged checkpoint
    except CheckpointError as e:
        print(f"warmstart push: {args.id}: refused: {e}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="warmstart-push-") as d:
        layout = Path(d) / "layout"
        with store.lock(args.id, exclusive=False, blocking=True):
            oci.export_layout(ckpt.path, args.id, layout, "checkpoint")
        try:
            oci.skopeo_copy(f"oci:{layout}:checkpoint", f"docker://{ref}", _skopeo_flags(args, "dest") + oci.PUSH_FLAGS)
        except oci.OciError as e:
            print(f"warmstart push: {e}", file=sys.stderr)
            return 1
    print(f"{args.id}: pushed to {ref}")
    return 0


def run_pull(args: argparse.Namespace) -> int:
    settings = config.load()
    store = Store(settings, args.scope)
    ref = _ref(args.ref)
    # Downloads go under <store>/.tmp/pull.<rand> (same filesystem: adopting is a rename);
    # the shared "pull" lock keeps `warmstart gc` off them while they run.
    with store.lock("pull", exclusive=False, blocking=True):
        work = store.new_tmp("pull")
        layout, unpacked = work / "layout", work / "checkpoint"
        unpacked.mkdir(mode=0o700)
        try:
            # The manifest is checked (size budget, --id) before a byte is downloaded, and the copy is
            # pinned to its digest; import_layout checks the downloaded copy again and bounds the unpacking.
            pinned, max_file = oci.check_remote(ref, _skopeo_flags(args, ""),
                                                oci.budget(work, settings.max_pull_bytes), args.id)
            oci.skopeo_copy(f"docker://{pinned}", f"oci:{layout}:checkpoint", _skopeo_flags(args, "src"), max_file)
            cid = oci.import_layout(layout, unpacked, settings.max_pull_bytes, args.id)
            shutil.rmtree(layout)  # the layer blob: no need to hold the bytes twice
            store.adopt(cid, unpacked)
        except (oci.OciError, CheckpointError, ValueError) as e:
            print(f"warmstart pull: {ref}: refused: {e}", file=sys.stderr)
            return 1
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{cid}: pulled from {ref}, verified and sealed")
    return 0
