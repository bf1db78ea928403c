"""Checkpoints that follow a deployment across nodes: the automatic push after a dump, the pull on a miss.

Both are driven by `[registry]` in the config and keyed by (namespace, id): the image of namespace
`ns`'s checkpoint `id` is `<repository>:<tag_for(ns, id)>`.  Neither ever sits on a container's
critical path for longer than asked:

* push_in_background starts a detached `python -m warmstart.fleet push` and returns at once; the
  outcome is one line in the runtime log.
* pull_on_miss waits at most its deadline.  The pull itself runs in a detached process that holds
  the key's lock file (`<store>/<ns>/.pulls/<id>.lock`, flock): concurrent callers on the node share
  that one pull, and past the deadline it goes on, so the next container of the id finds it.  Its
  outcome, and any error, is one line in the runtime log; a failed pull leaves the store unchanged.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import config
from .config import Settings
from .ids import validate_id
from .log import Logger
from .store import CheckpointError, Store
from .transfer import Remote
from .trust import K8S_NAMESPACE_RE, LOCAL_SCOPE

MAX_TAG = 128  # the distribution spec's tag length
PULL_GIVE_UP_S = 3600  # a pull still running after this is killed (its lock then frees the key)
PUSH_GIVE_UP_S = 3600
POLL_S = 0.05


def tag_for(scope: str, cid: str) -> str:
    """The image tag of checkpoint `cid` of namespace `scope`: `<scope>.<id>`.

    A namespace (DNS label) or `_local` never holds a '.', so the first '.' separates the two and
    two keys never share a tag ("--" would not: namespaces may hold it).  Keys too long for a tag
    (128 characters) become `sha256-<hex of scope/id>`, which holds no '.'.
    """
    if scope != LOCAL_SCOPE and not K8S_NAMESPACE_RE.fullmatch(scope):
        raise ValueError(f"namespace {scope[:80]!r}: not a Kubernetes namespace name or {LOCAL_SCOPE}")
    tag = f"{scope}.{validate_id(cid)}"
    if len(tag) > MAX_TAG:
        tag = "sha256-" + hashlib.sha256(f"{scope}/{cid}".encode()).hexdigest()
    return tag


def ref_for(settings: Settings, scope: str, cid: str) -> str:
    if not settings.registry.repository:
        raise ValueError("[registry] repository is not set in the config; set it to host[:port]/path")
    return f"{settings.registry.repository}:{tag_for(scope, cid)}"


def _logger(settings: Settings, scope: str, cid: str) -> Logger:
    return Logger(settings.log_dir, context={"namespace": scope, "checkpoint_id": cid, "component": "fleet"})


def _spawn(settings: Settings, args: list[str], pass_fds: tuple[int, ...] = (), module: str = "fleet") -> None:
    """Start `python -m warmstart.MODULE ARGS` detached: own session, no stdio of the caller (a shim
    waits for the runtime's pipes to close), the same config; the caller never waits for it."""
    env = {**os.environ, "WARMSTART_CONFIG": settings.config_source}
    subprocess.Popen([sys.executable, "-m", f"{__package__}.{module}", *args], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                     close_fds=True, pass_fds=pass_fds, env=env, cwd="/")


def push_in_background(settings: Settings, scope: str, cid: str) -> bool:
    """After a successful dump: push the checkpoint to the registry without waiting for it.

    True when a push was started; False when [registry] asks for none (no repository, push = off) or it
    could not be started (logged).
    """
    reg = settings.registry
    if not reg.enabled or reg.push != "auto":
        return False
    try:
        tag_for(scope, cid)
        _spawn(settings, ["push", "--namespace", scope, cid])
        return True
    except (OSError, ValueError) as e:
        _logger(settings, scope, cid).warning(f"push to the registry not started: {e}")
        return False


def _key_lock(settings: Settings, scope: str, cid: str, kind: str) -> int:
    """An fd on the key's lock file (flock on it decides who pulls or pushes the key)."""
    store = Store(settings, scope)
    store.ensure()
    d = store.root / ".pulls"
    d.mkdir(mode=0o700, exist_ok=True)
    return os.open(d / f"{validate_id(cid)}.{kind}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _try_flock(fd: int, how: int) -> bool:
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise


def pull_on_miss(settings: Settings, scope: str, cid: str, deadline_s: float | None = None,
                 deadline_source: str = "pull_deadline_s") -> bool:
    """`create` found no checkpoint `cid` for namespace `scope`: pull it from the registry, waiting at most
    `deadline_s` (default [registry] pull_deadline_s; `deadline_source` names what set it in the log line).
    True when the checkpoint is in the store.

    False when no pull is configured, on any error (one log line, from the pull; the store unchanged),
    or at the deadline (one log line; the pull goes on for the next container).
    """
    reg = settings.registry
    if not reg.enabled or reg.pull == "off":
        return False
    log = _logger(settings, scope, cid)
    try:
        ref = ref_for(settings, scope, cid)
    except ValueError as e:
        log.warning(f"pull from the registry not started: {e}; starting cold")
        return False
    return fetch_detached(OnMiss(settings, scope, cid, "pull", "fleet", "pull from the registry", f"pull of {ref}",
                                 deadline_source, log),
                          reg.pull_deadline_s if deadline_s is None else deadline_s)


@dataclass(frozen=True)
class OnMiss:
    """One source a create's miss fetches from: its worker (`python -m warmstart.MODULE KIND ...`) and how
    its log lines name it."""

    settings: Settings
    scope: str
    cid: str
    kind: str  # the worker's action, and the key lock's name: pull (registry), fetch (shared store)
    module: str
    source: str  # "pull from the registry"
    what: str  # "pull of REF"
    deadline_key: str  # what set the deadline: its config key, or the create's budget
    log: Logger


def fetch_detached(m: OnMiss, wait_s: float) -> bool:
    """Bring a missing checkpoint into the store through a detached worker, waiting at most wait_s.

    The caller that wins the key's flock (`<store>/<ns>/.pulls/<id>.<kind>.lock`) starts the worker and
    hands it that lock; every caller then waits until the lock is free (the worker is over) or wait_s
    passes.  So concurrent callers on a node share one worker, and one that outlives the deadline goes on
    for the next container.  True when the checkpoint is in the store.
    """
    deadline = time.monotonic() + wait_s
    try:
        store = Store(m.settings, m.scope)
        if store.exists(m.cid):
            return True
        fd = _key_lock(m.settings, m.scope, m.cid, m.kind)
    except (OSError, ValueError) as e:
        m.log.warning(f"{m.source} not started: {e}; starting cold")
        return False
    try:
        if _try_flock(fd, fcntl.LOCK_EX):  # nobody fetches this key: start the worker, and hand it this lock
            if store.exists(m.cid):  # a worker finished between the check above and the lock
                return True
            _spawn(m.settings, [m.kind, "--namespace", m.scope, "--lock-fd", str(fd), m.cid], pass_fds=(fd,),
                   module=m.module)
        os.close(fd)  # a started worker holds the lock through its own fd on the same open file
        fd = _key_lock(m.settings, m.scope, m.cid, m.kind)  # a new open file: its flock waits like anyone's
        while time.monotonic() < deadline:
            if _try_flock(fd, fcntl.LOCK_SH):  # the worker is over, one way or the other
                return store.exists(m.cid)
            time.sleep(POLL_S)
        m.log.warning(f"{m.what} not finished after {wait_s:g}s ({m.deadline_key}): starting cold; "
                      f"the {m.kind} goes on for the next container")
        return False
    except OSError as e:
        m.log.warning(f"{m.source} not started: {e}; starting cold")
        return False
    finally:
        os.close(fd)


# -- the detached workers: python -m warmstart.fleet push|pull ----------------

def _run_push(settings: Settings, scope: str, cid: str) -> int:
    from . import transfer  # noqa: PLC0415

    log = _logger(settings, scope, cid)
    try:
        fd = _key_lock(settings, scope, cid, "push")
        if not _try_flock(fd, fcntl.LOCK_EX):
            log.info("push to the registry skipped: another push of this checkpoint is running")
            return 0
        ref = ref_for(settings, scope, cid)
        done = transfer.push(settings, scope, cid, ref, Remote.of(settings.registry), timeout_s=PUSH_GIVE_UP_S)
    except (OSError, ValueError, CheckpointError, transfer.oci.OciError) as e:
        log.warning(f"push to the registry failed: {e}")
        return 1
    log.info(f"pushed to {ref} in {done.seconds:.1f}s: {done.copied.sent} blobs sent, "
             f"{done.copied.skipped} already in the registry", seconds=round(done.seconds, 3),
             blobs_sent=done.copied.sent, blobs_skipped=done.copied.skipped)
    return 0


def _run_pull(settings: Settings, scope: str, cid: str, lock_fd: int) -> int:
    """Holds the key's lock (inherited from pull_on_miss) until the pull is over."""
    from . import transfer  # noqa: PLC0415

    log = _logger(settings, scope, cid)
    t0 = time.monotonic()
    ref = ""
    try:
        ref = ref_for(settings, scope, cid)
        if Store(settings, scope).exists(cid):
            return 0
        transfer.pull(settings, scope, ref, Remote.of(settings.registry), expect_id=cid, timeout_s=PULL_GIVE_UP_S)
        log.info(f"pulled {ref}, verified and sealed, in {time.monotonic() - t0:.1f}s",
                 seconds=round(time.monotonic() - t0, 3))
        return 0
    except (OSError, ValueError, CheckpointError, transfer.oci.OciError) as e:
        log.warning(f"pull of {ref or cid} failed: {e}; the store is unchanged")
        return 1
    finally:
        os.close(lock_fd)  # after the log line: whoever waits on the lock sees the outcome logged


def worker_args(prog: str, actions: list[str], doc: str, argv: list[str] | None) -> argparse.Namespace:
    """The argv of a detached worker: ACTION ID [--namespace NS] [--lock-fd N].  The last action is the
    one fetch_detached starts, which needs --lock-fd (the key's lock, inherited)."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    p.add_argument("action", choices=actions)
    p.add_argument("id", type=validate_id)
    p.add_argument("--namespace", default=LOCAL_SCOPE)
    p.add_argument("--lock-fd", type=int)
    args = p.parse_args(argv)
    if args.action == actions[-1] and args.lock_fd is None:
        p.error(f"{actions[-1]} needs --lock-fd (its on-miss caller starts it)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = worker_args("python -m warmstart.fleet", ["push", "pull"], __doc__, argv)
    settings = config.load()
    if args.action == "push":
        return _run_push(settings, args.namespace, args.id)
    return _run_pull(settings, args.namespace, args.id, args.lock_fd)


if __name__ == "__main__":
    sys.exit(main())
