"""The opt-in contract: `warmstart.dev/*` annotations, parsed and validated in one place.

A container is touched only when this module returns a Policy; every problem
is a one-line error naming the annotation and the fix, and the caller then
runs the container as plain runc.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from . import identity as ident
from . import ids

PREFIX = "warmstart.dev/"
CHECKPOINT = PREFIX + "checkpoint"
ID = PREFIX + "id"
IDENTITY = PREFIX + "identity"
PRE_DUMP = PREFIX + "pre-dump"          # worker hook before the dump (hooks_exec.py)
POST_RESTORE = PREFIX + "post-restore"  # worker hook after the restore
HOOK_TIMEOUT = PREFIX + "hook-timeout"  # seconds for each of them
RESTORE = PREFIX + "restore"            # eager (default) | lazy: memory paged in on demand (lazy.py)
READY_FILE = PREFIX + "ready-file"      # on-ready: a file in the container that signals readiness
READY_HTTP = PREFIX + "ready-http"      # on-ready: "PORT/PATH" answering 2xx inside the pod
READY_DELAY = PREFIX + "ready-delay"    # on-ready: seconds to let caches settle after ready
READY_TIMEOUT = PREFIX + "ready-timeout"  # on-ready: give up waiting after this many seconds
KNOWN = {CHECKPOINT, ID, IDENTITY, PRE_DUMP, POST_RESTORE, HOOK_TIMEOUT, RESTORE,
         READY_FILE, READY_HTTP, READY_DELAY, READY_TIMEOUT}
CONTAINER_TYPE = "io.kubernetes.cri.container-type"
ID_RE = ids.ID_RE
MAX_VALUE = 64 * 1024


class Mode(str, Enum):
    ON_STOP = "on-stop"          # checkpoint at the first SIGTERM if none exists; restore when one does
    RESTORE_ONLY = "restore-only"  # restore when a checkpoint exists; never dump
    ON_READY = "on-ready"        # checkpoint once ready, leaving it running; restore when one exists
    OFF = "off"


class AnnotationError(ValueError):
    """A bad warmstart.dev/* annotation; the message names it and the fix."""


@dataclass(frozen=True)
class Policy:
    mode: Mode
    checkpoint_id: str
    id_source: str  # "id", "identity", "env", "auto": how the id was chosen
    identity: dict[str, Any] | None = None


def validate_id(value: str, field: str = ID) -> str:
    try:
        return ids.validate_id(value, field)
    except ids.InvalidId as e:
        raise AnnotationError(str(e)) from None


def is_sandbox(annotations: dict[str, str]) -> bool:
    return annotations.get(CONTAINER_TYPE) == "sandbox"


def policy_from_spec(spec: dict[str, Any]) -> Policy | None:
    """The container's policy, or None when it did not opt in (or is a CRI sandbox)."""
    ann = spec.get("annotations") or {}
    if not isinstance(ann, dict):
        raise AnnotationError("annotations: config.json annotations must be an object")
    ours = {k: v for k, v in ann.items() if isinstance(k, str) and k.startswith(PREFIX)}
    if not ours or is_sandbox(ann):
        return None
    for key, val in ours.items():
        if key not in KNOWN:
            raise AnnotationError(f"{key}: unknown annotation; known: {', '.join(sorted(KNOWN))}")
        if not isinstance(val, str) or len(val) > MAX_VALUE or "\x00" in val:
            raise AnnotationError(f"{key}: value must be a string under {MAX_VALUE} bytes without NUL")
    raw_mode = ours.get(CHECKPOINT)
    if raw_mode is None:
        raise AnnotationError(f"{CHECKPOINT}: missing; set it to one of on-stop, on-ready, restore-only, off")
    try:
        mode = Mode(raw_mode.strip())
    except ValueError:
        raise AnnotationError(
            f"{CHECKPOINT}: unknown mode {raw_mode[:40]!r}; use one of on-stop, on-ready, restore-only, off") from None
    if mode is Mode.OFF:
        return None
    worker_hooks(ours)  # validated here so that a bad hook annotation shows at create, not at the stop
    if ours.get(RESTORE, "eager").strip() not in ("eager", "lazy"):
        raise AnnotationError(f"{RESTORE}: unknown value {ours[RESTORE][:40]!r}; use eager or lazy")
    identity = None
    if IDENTITY in ours:
        try:
            identity = ident.normalize_identity(json.loads(ours[IDENTITY]))
        except (ValueError, RecursionError) as e:  # JSONDecodeError, IdentityError, absurd nesting
            raise AnnotationError(f"{IDENTITY}: {e}") from None
    if ID in ours:
        cid = validate_id(ours[ID])
        if identity is not None and ident.identity_hash(identity) != cid:
            raise AnnotationError(
                f"{ID} and {IDENTITY} conflict: the identity hashes to {ident.identity_hash(identity)}; set only one")
        return Policy(mode, cid, "id", identity)
    if identity is not None:
        return Policy(mode, ident.identity_hash(identity), "identity", identity)
    from .spec import Spec  # noqa: PLC0415

    env_hash = Spec(spec).env.get("DYN_CHECKPOINT_HASH")
    if env_hash:
        return Policy(mode, validate_id(env_hash, "env DYN_CHECKPOINT_HASH"), "env")
    return Policy(mode, ident.fallback_hash(spec), "auto")


@dataclass(frozen=True)
class WorkerHooks:
    pre_dump: Any = None      # hooks_exec.Action or None
    post_restore: Any = None
    timeout_s: int = 60


def worker_hooks(ann: dict[str, Any]) -> WorkerHooks:
    """pre-dump / post-restore / hook-timeout, parsed (AnnotationError names the annotation)."""
    if not any(k in ann for k in (PRE_DUMP, POST_RESTORE, HOOK_TIMEOUT)):
        return WorkerHooks()
    from . import hooks_exec  # noqa: PLC0415 - only for containers that use hooks

    out = {}
    for key, name in ((PRE_DUMP, "pre_dump"), (POST_RESTORE, "post_restore")):
        if key in ann:
            try:
                out[name] = hooks_exec.parse(str(ann[key]))
            except ValueError as e:
                raise AnnotationError(f"{key}: {e}") from None
    try:
        timeout = hooks_exec.parse_timeout(ann.get(HOOK_TIMEOUT))
    except ValueError as e:
        raise AnnotationError(f"{HOOK_TIMEOUT}: {e}") from None
    return WorkerHooks(timeout_s=timeout, **out)
