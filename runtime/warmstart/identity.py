"""Checkpoint ids: Dynamo's DynamoCheckpoint identity hash and our fallback hash.

The identity hash must be byte-compatible with Dynamo's Go code (encoding/json
of a struct with fields in declaration order), so one store can serve both.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
from typing import Any

# (json name, kind, omitempty-default). Order is the Go struct's field order.
IDENTITY_FIELDS: tuple[tuple[str, type], ...] = (
    ("model", str),
    ("backendFramework", str),
    ("frameworkVersion", str),
    ("tensorParallelSize", int),
    ("pipelineParallelSize", int),
    ("dtype", str),
    ("maxModelLen", int),
    ("extraParameters", dict),
)
_ALWAYS = {"tensorParallelSize", "pipelineParallelSize"}  # default 1, never omitted

# Env keys that differ between interchangeable replicas (pod name, injected service links).
VOLATILE_ENV = ("HOSTNAME", "POD_*", "NODE_NAME", "KUBERNETES_*", "*_SERVICE_HOST", "*_SERVICE_PORT",
                "*_SERVICE_PORT_*", "*_PORT", "*_PORT_*_TCP*", "*_PORT_*_UDP*", "DYN_CHECKPOINT_*",
                "DYN_RESTORE_*")


class IdentityError(ValueError):
    """Bad identity input; the message names the field and the fix."""


def go_json_string(s: str) -> str:
    """A string as Go's encoding/json writes it (HTML-safe escaping, UTF-8 kept)."""
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\b":
            out.append("\\b")  # Go >= 1.22 writes \b and \f short forms
        elif ch == "\f":
            out.append("\\f")
        elif o < 0x20 or ch in "<>&" or o in (0x2028, 0x2029):
            out.append(f"\\u{o:04x}")
        elif 0xD800 <= o <= 0xDFFF:
            out.append("\\ufffd")  # Go replaces invalid UTF-8 / lone surrogates
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def normalize_identity(raw: Any) -> dict[str, Any]:
    """Validate a DynamoCheckpoint identity and fill the Go defaults."""
    if not isinstance(raw, dict):
        raise IdentityError("identity: must be a JSON object like {\"model\": \"Qwen/Qwen3-0.6B\", ...}")
    known = {name for name, _ in IDENTITY_FIELDS}
    for key in raw:
        if key not in known:
            raise IdentityError(f"identity: unknown field {key!r}; valid fields: {', '.join(n for n, _ in IDENTITY_FIELDS)}")
    out: dict[str, Any] = {}
    for name, kind in IDENTITY_FIELDS:
        val = raw.get(name)
        if val is None:
            continue
        if kind is int:
            if isinstance(val, bool) or not isinstance(val, int) or val < 0 or val > 2**31 - 1:
                raise IdentityError(f"identity: {name} must be a non-negative integer, got {val!r}")
        elif kind is str:
            if not isinstance(val, str):
                raise IdentityError(f"identity: {name} must be a string, got {val!r}")
        elif kind is dict:
            if not isinstance(val, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in val.items()):
                raise IdentityError(f"identity: {name} must map strings to strings, e.g. {{\"enableChunkedPrefill\": \"true\"}}")
        out[name] = val
    if not out.get("model"):
        raise IdentityError("identity: model is required, e.g. {\"model\": \"Qwen/Qwen3-0.6B\"}")
    for name in _ALWAYS:
        if not out.get(name):
            out[name] = 1
    return out


def identity_bytes(identity: dict[str, Any]) -> bytes:
    """Go json.Marshal of the identity struct: field order fixed, omitempty, map keys sorted."""
    ident = normalize_identity(identity)
    parts = []
    for name, kind in IDENTITY_FIELDS:
        val = ident.get(name)
        if name not in _ALWAYS and not val:
            continue  # omitempty: "", 0 and empty maps vanish
        if kind is int:
            enc = str(int(val))
        elif kind is str:
            enc = go_json_string(val)
        else:
            enc = "{" + ",".join(f"{go_json_string(k)}:{go_json_string(v)}" for k, v in sorted(val.items())) + "}"
        parts.append(f"{go_json_string(name)}:{enc}")
    return ("{" + ",".join(parts) + "}").encode("utf-8", "surrogatepass")


def identity_hash(identity: dict[str, Any]) -> str:
    """Dynamo's checkpoint id: first 16 hex chars of SHA-256 of the Go JSON bytes."""
    return hashlib.sha256(identity_bytes(identity)).hexdigest()[:16]


def is_volatile(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pat) for pat in VOLATILE_ENV)


def fallback_record(spec: dict[str, Any]) -> dict[str, Any]:
    """What makes two containers interchangeable, from an OCI spec.

    Host paths of mounts and the bundle differ between replicas by design, so only
    mount destinations and types count; the image counts by the name CRI records.
    """
    proc = spec.get("process") or {}
    ann = spec.get("annotations") or {}
    env = sorted(e for e in proc.get("env") or [] if not is_volatile(e.split("=", 1)[0]))
    mounts = sorted((m.get("destination", ""), m.get("type", "")) for m in spec.get("mounts") or [])
    image = ann.get("io.kubernetes.cri.image-name") or ann.get("io.containerd.image.name") or ""
    return {"args": proc.get("args") or [], "cwd": proc.get("cwd") or "/", "env": env,
            "image": image, "mounts": [list(m) for m in mounts]}


def fallback_hash(spec: dict[str, Any]) -> str:
    rec = json.dumps(fallback_record(spec), sort_keys=True, separators=(",", ":"))
    return "auto-" + hashlib.sha256(rec.encode()).hexdigest()[:16]
