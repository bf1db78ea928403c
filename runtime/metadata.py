"""metadata.json: the JSON Schema that ships with the package, and validation."""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    return json.loads(resources.files("warmstart").joinpath("schemas/metadata.schema.json").read_text())


def validate(metadata: Any) -> None:
    """Raise ValueError naming the first offending field."""
    import jsonschema  # noqa: PLC0415 - heavy import, only where metadata is checked

    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(metadata), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ValueError(f"metadata field {where}: {e.message[:200]}")
