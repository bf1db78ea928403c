"""Store commands: list, inspect, verify, remove, gc, identity."""
from __future__ import annotations

import argparse
import json
import sys

from .. import config, identity
from ..ids import validate_id
from ..store import CheckpointError, Store, evict_to_budget, tree_bytes
from .. import trust
from ..trust import LOCAL_SCOPE


def add_scope_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", default=LOCAL_SCOPE, dest="scope",
                   help=f"the Kubernetes namespace the checkpoint belongs to (default {LOCAL_SCOPE}: "
                        "containers started outside Kubernetes)")


def _store(args: argparse.Namespace) -> Store:
    return Store(config.load(), args.scope)


def add_list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def _rows(store: Store) -> list[dict]:
    rows = []
    known = set(store.ids())
    for sub in (".status", ".quarantine"):  # ids that failed without a checkpoint dir
        d = store.root / sub
        known |= {p.stem for p in d.glob("*.json") if "~" not in p.stem} if d.is_dir() else set()
    for cid in sorted(known):
        path = store.root / cid
        q = store.quarantine_state(cid)
        failed = store.dump_failure(cid)
        status = "complete" if store.exists(cid) else ("failed" if failed else "incomplete")
        if q.get("quarantined"):
            status = "quarantined"
        rows.append({"namespace": store.scope, "id": cid, "status": status, "bytes": tree_bytes(path),
                     "restore_failures": q.get("failures", 0),
                     "last_error": q.get("last_error") or (failed or {}).get("error")})
    tmp = store.root / ".tmp"
    for entry in sorted(tmp.iterdir()) if tmp.is_dir() else []:
        if not entry.name.startswith("trash."):
            rows.append({"namespace": store.scope, "id": entry.name.rsplit(".", 1)[0], "status": "in-progress",
                         "bytes": 0, "restore_failures": 0, "last_error": None})
    return rows


def run_list(args: argparse.Namespace) -> int:
    settings = config.load()
    rows = [r for scope in Store.scopes(settings) for r in _rows(Store(settings, scope))]
    legacy = sorted(m.parent.name for m in settings.store.glob("*/checkpoint.done"))
    for name in legacy:  # made before checkpoints had a namespace: never restored; `rm -r` them
        rows.append({"namespace": "", "id": name, "status": "legacy", "bytes": 0, "restore_failures": 0,
                     "last_error": "made by an older warmstart without a namespace or signature; never restored"})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'NAMESPACE':<20} {'ID':<40} {'STATUS':<12} {'SIZE':>10}  FAILURES")
    for r in rows:
        print(f"{r['namespace']:<20} {r['id']:<40} {r['status']:<12} {r['bytes'] / 2**20:>8.1f}Mi  "
              f"{r['restore_failures']}" + (f"  ({r['last_error']})" if r["last_error"] else ""))
    return 0


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", type=validate_id)
    add_scope_argument(p)


def run_inspect(args: argparse.Namespace) -> int:
    store = _store(args)
    path = store.path(args.id)
    try:
        meta = json.loads((path / "metadata.json").read_text())
    except FileNotFoundError:
        print(f"warmstart inspect: no checkpoint {args.id} in {store.root}", file=sys.stderr)
        return 1
    meta["quarantine"] = store.quarantine_state(args.id)
    try:  # what the images would restore: the privileges a restore checks against the new spec
        meta["privileges"] = trust.summary(trust.read_tasks(path))
    except Exception as e:  # noqa: BLE001 - inspect shows what it can
        meta["privileges"] = {"error": f"cannot read the task images: {type(e).__name__}: {e}"}
    print(json.dumps(meta, indent=1, sort_keys=True))
    return 0


def add_verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", type=validate_id)
    add_scope_argument(p)
    p.add_argument("--clear", action="store_true", help="also clear a quarantine after a successful check")


def run_verify(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        ck = store.open_verified(args.id, full=True)
    except CheckpointError as e:
        print(f"warmstart verify: {args.id}: REFUSED: {e}", file=sys.stderr)
        return 1
    if args.clear:
        store.clear_quarantine(args.id)
    print(f"{args.id}: ok ({len(ck.metadata['manifest'])} files hashed, signed by {ck.signer}, sealed)"
          + ("; quarantine cleared" if args.clear else ""))
    return 0


def add_remove_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", type=validate_id)
    add_scope_argument(p)


def run_remove(args: argparse.Namespace) -> int:
    try:
        existed = _store(args).remove(args.id)
    except CheckpointError as e:
        print(f"warmstart remove: {e}", file=sys.stderr)
        return 1
    print(f"{args.id}: removed" if existed else f"{args.id}: not present")
    return 0


def add_gc_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-age", type=float, default=3600.0,
                   help="only reap the store's temp dirs older than this many seconds (default 3600; locks are checked "
                        "anyway; the shared store's are judged by their publish lock alone)")
    p.add_argument("--budget", type=config.parse_bytes, metavar="BYTES",
                   help="then evict the least recently restored checkpoints until the store holds at most "
                        "BYTES (e.g. 200G; a checkpoint in use is kept)")


def run_gc(args: argparse.Namespace) -> int:
    settings = config.load()
    removed = [r for scope in Store.scopes(settings) for r in Store(settings, scope).gc(max_tmp_age_s=args.min_age)]
    for r in removed:
        print(f"removed {r}")
    print(f"gc: {len(removed)} removed")
    if settings.shared_store.enabled:
        from ..sharedfs import sweep_share  # noqa: PLC0415 - only a node with a shared store needs it

        sw = sweep_share(settings)
        for r in sw.removed:
            print(f"removed {r}")
        for r in sw.kept:
            print(f"kept {r}: a publish in progress (its id's publish lock is held)")
        for e in sw.errors:
            print(f"warmstart gc: {e}", file=sys.stderr)
        print(f"gc: {len(sw.removed)} removed from the shared store {settings.shared_store.path}"
              + (f", {len(sw.kept)} kept (publishes in progress)" if sw.kept else ""))
    if args.budget is not None:
        ev = evict_to_budget(settings, args.budget)
        for r in ev.evicted:
            print(f"evicted {r}")
        for r in ev.busy:
            print(f"kept {r}: in use")
        print(f"gc: {len(ev.evicted)} evicted; the store holds {ev.total_bytes} bytes (budget {args.budget})")
    return 0


def add_identity_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", required=True, dest="identity_json",
                   help="a DynamoCheckpoint identity as JSON, keys in any order")


def run_identity(args: argparse.Namespace) -> int:
    try:
        ident = json.loads(args.identity_json)
    except ValueError as e:
        print(f"warmstart identity: --json: not valid JSON ({e})", file=sys.stderr)
        return 2
    try:
        print(identity.identity_hash(ident))
    except identity.IdentityError as e:
        print(f"warmstart identity: {e}", file=sys.stderr)
        return 2
    return 0
