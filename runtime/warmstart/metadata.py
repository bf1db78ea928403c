"""metadata.json: the JSON Schema that ships with the package, validation, and its typed views."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .spec import Spec


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    from importlib import resources  # noqa: PLC0415 - only where metadata is validated

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


SCHEMA_VERSION = 2


@dataclass(frozen=True)
class Compat:
    """What must hold between a checkpoint and the container it restores into, in one record.

    The dump writes it (`metadata.json` → `compat`) from the dumped container's
    Spec and node; a restore builds the same record from the new container's
    Spec and node and asks `refusal()`.  One definition, so the writer and the
    checker cannot drift apart.
    """
    scope: str                # tenant: the Kubernetes namespace, or trust.LOCAL_SCOPE
    args: tuple[str, ...]
    image_name: str           # as CRI records it ("" outside CRI)
    image_fingerprint: str    # image_id.fingerprint(): the image's content, by layer listing
    namespaces: tuple[str, ...]
    id_mappings: dict[str, list[list[int]]]
    seccomp_sha256: str
    cgroup_version: int
    arch: str
    criu: str

    @classmethod
    def of(cls, spec: "Spec", scope: str, image_fingerprint: str, node: dict[str, str],
           cgroup_version: int) -> "Compat":
        return cls(scope=scope, args=tuple(spec.args), image_name=spec.image_name,
                   image_fingerprint=image_fingerprint,
                   namespaces=tuple(sorted({n.type for n in spec.namespaces})), id_mappings=spec.id_mappings,
                   seccomp_sha256=spec.seccomp_sha256, cgroup_version=cgroup_version,
                   arch=node["arch"], criu=node["criu"])

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Compat":
        return cls(**{**d, "args": tuple(d["args"]), "namespaces": tuple(d["namespaces"])})

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["args"], d["namespaces"] = list(self.args), list(self.namespaces)
        return d

    def refusal(self, here: "Compat", shared: bool = False) -> str | None:
        """Why a checkpoint with this record cannot restore into `here`; None when it can.

        `shared`: the node config shares this checkpoint with other scopes (trust.shared).
        """
        from . import criu  # noqa: PLC0415

        if self.scope != here.scope and not shared:
            return (f"checkpoint belongs to namespace {self.scope!r}, the container runs in {here.scope!r}; "
                    "a node's config can share it (shared_checkpoints)")
        if self.arch != here.arch:
            return f"checkpoint arch {self.arch} differs from node arch {here.arch}"
        dumped, now = criu.parse_version(self.criu), criu.parse_version(here.criu)
        if dumped is None or now is None or now[:2] < dumped[:2]:
            return f"checkpoint made with CRIU {self.criu}; this node has CRIU {here.criu} (needs >= the dump's)"
        if self.args != here.args:
            return f"container args {list(here.args)!r} differ from the checkpoint's {list(self.args)!r}"
        if self.image_fingerprint != here.image_fingerprint:
            return (f"container image differs from the checkpoint's (fingerprint {here.image_fingerprint[:19]} "
                    f"vs {self.image_fingerprint[:19]})")
        if self.image_name and here.image_name and self.image_name != here.image_name:
            return f"container image {here.image_name} differs from the checkpoint's {self.image_name}"
        if self.namespaces != here.namespaces:
            return f"namespaces {list(here.namespaces)} differ from the checkpoint's {list(self.namespaces)}"
        if self.id_mappings != here.id_mappings:
            return "user namespace uid/gid mappings differ from the checkpoint's"
        if self.seccomp_sha256 != here.seccomp_sha256:
            return "seccomp profile differs from the one the checkpoint was dumped under"
        if self.cgroup_version != here.cgroup_version:
            return f"checkpoint taken on cgroup v{self.cgroup_version}, node runs v{here.cgroup_version}"
        return None


@dataclass(frozen=True)
class CheckpointMetadata:
    """A typed view of a verified checkpoint's metadata.json (the schema has checked its shape)."""
    raw: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.raw["id"])

    @property
    def compat(self) -> Compat:
        return Compat.from_json(self.raw["compat"])

    @property
    def scope(self) -> str:
        return str(self.raw["compat"]["scope"])

    @property
    def gpu(self) -> dict[str, Any] | None:
        return self.raw.get("gpu")

    @property
    def cuda(self) -> dict[str, Any] | None:
        return (self.raw.get("dump") or {}).get("cuda")
