"""The checkpoint-id rule, in one place, with an error of its own.

An id names a directory in the store, a lock file, a seal and an image
annotation, so it must never be a path: `[A-Za-z0-9._-]{1,128}`, not starting
with '.' (dot-names are the store's own).  Callers that speak for a user-facing
field (an annotation, a CLI argument) turn InvalidId into their own error.
"""
from __future__ import annotations

import re

ID_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


class InvalidId(ValueError):
    """Not a checkpoint id; the message names the field and the rule."""


def validate_id(value: object, field: str = "checkpoint id") -> str:
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise InvalidId(f"{field}: invalid checkpoint id {repr(value)[:80]}; use 1-128 characters from "
                        "[A-Za-z0-9._-], not starting with '.'")
    return value
