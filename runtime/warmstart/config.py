"""Node settings: `/etc/warmstart/config.toml` (or $WARMSTART_CONFIG), then env overrides.

Every path the runtime touches comes from here, so tests can point a whole
node (store, state, logs) at a temp dir with one config file or env var.
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

from . import budget

DEFAULT_CONFIG = Path("/etc/warmstart/config.toml")
# Where install.sh puts the launcher: the handler's BinaryName, and what demo/bench/doctor run.
INSTALLED_RUNTIME = Path("/usr/local/bin/warmstart-runtime")
# The PATH the runtime gives itself, runc and CRIU when its caller gives none (podman's `kill` does
# not): CRIU's network lock runs iptables-restore by name, and Debian keeps it in /usr/sbin.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ConfigError(ValueError):
    """A bad config value; the message names the key and the fix."""


# host[:port]/path, the path in the distribution spec's grammar (lowercase components); no tag, no digest.
_REPOSITORY_RE = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)+")
MAX_PULL_DEADLINE_S = 110  # kubelet gives StartContainer 2 min (runtimeRequestTimeout)


@dataclass(frozen=True)
class RegistrySettings:
    """`[registry]`: where checkpoints travel between nodes (fleet.py, transfer.py beside this file)."""

    # host[:port]/path of the repository every node pushes to and pulls from; "" = no automatic push/pull.
    repository: str = ""
    auth_file: Path | None = None  # registry credentials (skopeo --authfile); None: skopeo's defaults
    tls_verify: bool = True
    push: str = "auto"  # auto: push each checkpoint this node makes, in the background; off
    pull: str = "on-miss"  # on-miss: pull in create when the checkpoint is missing; prefetch; off
    # Seconds create waits for a pull before starting cold (the pull goes on for the next container).
    pull_deadline_s: int = 30
    cache_budget_bytes: int = 0  # most bytes of pulled checkpoints kept on the node (0: no budget)
    # Page images travel as chunks of this size, one layer each: an unchanged chunk is never re-sent.
    chunk_bytes: int = 128 << 20
    compress: str = "zstd"  # zstd or none (docs/fleet.md has the measurements behind the default)
    compress_level: int = 1

    @property
    def pulls_on_miss(self) -> bool:
        """create pulls a missing checkpoint (prefetch mode also pulls ahead, in the node agent)."""
        return self.enabled and self.pull in ("on-miss", "prefetch")

    @property
    def enabled(self) -> bool:
        return bool(self.repository)


@dataclass(frozen=True)
class SharedStoreSettings:
    """`[shared_store]`: a directory every node mounts (a PVC, an NFS export) holding checkpoints in the
    store's layout, `<path>/<namespace>/<id>/checkpoint.done, *.img, ...` (sharedfs.py beside this file)."""

    path: Path | None = None  # the share's mount point on this node; None: no shared store
    publish: str = "auto"  # auto: copy each checkpoint this node makes to the share, in the background; off
    fetch: str = "on-miss"  # on-miss: create copies a missing checkpoint from the share, then restores; off
    # Seconds create waits for a fetch before starting cold (the fetch goes on for the next container).
    fetch_deadline_s: int = 30

    @property
    def enabled(self) -> bool:
        return self.path is not None

    @property
    def fetches_on_miss(self) -> bool:
        return self.enabled and self.fetch == "on-miss"

    @property
    def publishes(self) -> bool:
        return self.enabled and self.publish == "auto"


@dataclass(frozen=True)
class Settings:
    store: Path = Path("/var/lib/warmstart/checkpoints")
    seal_dir: Path = Path("/var/lib/warmstart/seals")
    state_dir: Path = Path("/run/warmstart")
    log_dir: Path = Path("/var/log/warmstart")
    runc: Path = Path("/usr/sbin/runc")
    criu: Path = Path("/usr/local/sbin/criu")
    # Consecutive failed restores of one checkpoint before it is quarantined.
    max_restore_failures: int = 3
    # Seconds a dump may take before it is abandoned (CRIU `timeout`).
    dump_timeout_s: int = 600
    # Seconds `runc restore` may take inside `create` before runc and CRIU are killed and the
    # container starts cold: below kubelet's runtimeRequestTimeout (2 min), with room for the cold start.
    restore_timeout_s: int = 90
    # Seconds one opted-in create may take in all, from the runtime's start (budget.py): every wait on the
    # restore path (fetch, pull, locks, runc restore, CUDA, the post-restore hook) gets at most what is left,
    # less 10 s kept for the cold start; keep it below kubelet's runtime-request-timeout (2 min by default).
    create_budget_s: int = budget.DEFAULT_S
    # Threads that read the pages of an eager restore (warmstart's CRIU patch): 0 = one per CPU
    # (at most 8), 1 = CRIU's own single-threaded reads.
    restore_read_threads: int = 0
    # How CRIU holds a container's TCP connections still during a dump (its --network-lock): "iptables"
    # (CRIU's default; needs the iptables binary), "nftables" (a CRIU built with libnftables), or "skip"
    # (no lock: only for nodes without either, where every connection's both ends are in the dump).
    network_lock: str = "iptables"
    # A GPU container whose CUDA processes share GPU state across processes (live NCCL communicators,
    # IMEX channels: cuda.shared_state) is not checkpointed: "refuse" (the driver cannot restore it,
    # docs/gpu.md), or "try" (checkpoint anyway: a driver that restores it, or to measure one).
    cuda_ipc: str = "refuse"
    # Most bytes one `warmstart pull` may write under the store (downloaded layer + unpacked files); a pull
    # is also held to the store filesystem's free space.
    max_pull_bytes: int = 256 << 30
    # The node's ed25519 key that signs each checkpoint it publishes (install.sh creates it, root-only).
    signing_key: Path = Path("/etc/warmstart/keys/node.key")
    # Public keys whose signatures this node accepts on restore and pull: its own, and a cluster key if shared.
    trusted_keys: tuple[Path, ...] = (Path("/etc/warmstart/keys/node.pub"),)
    # Checkpoints every namespace may restore, as "namespace/id" (the owner's; "_local/id" outside Kubernetes).
    # Without an entry, a checkpoint restores only into containers of the namespace that made it.
    shared_checkpoints: tuple[str, ...] = ()
    # Env keys never written to metadata in clear (values are hashed).
    secret_env_patterns: tuple[str, ...] = field(
        default=("*TOKEN*", "*SECRET*", "*PASSWORD*", "*PASSWD*", "*KEY*", "*CREDENTIAL*", "*AUTH*"))
    registry: RegistrySettings = RegistrySettings()
    shared_store: SharedStoreSettings = SharedStoreSettings()
    # The file these settings were loaded from (not a config key): what a detached helper loads again.
    source: Path | None = field(default=None, compare=False)

    @property
    def config_source(self) -> str:
        return str(self.source) if self.source else os.environ.get("WARMSTART_CONFIG") or str(DEFAULT_CONFIG)


_PATH_KEYS = {"store", "seal_dir", "state_dir", "log_dir", "runc", "criu", "signing_key"}
_BYTE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """A byte count as an operator writes it: 1073741824, 512M, 200G, 1.5T (binary units)."""
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _BYTE_UNITS else ""
    try:
        n = float(t[:len(t) - len(unit)])
    except ValueError:
        raise ValueError(f"{text!r}: not a byte count; write e.g. 1073741824, 512M or 200G") from None
    if n < 0:
        raise ValueError(f"{text!r}: a byte count cannot be negative")
    return int(n * _BYTE_UNITS[unit])


_INT_KEYS = {"max_restore_failures", "dump_timeout_s", "restore_timeout_s", "max_pull_bytes"}
NETWORK_LOCKS = ("iptables", "nftables", "skip")
CUDA_IPC = ("refuse", "try")
_COUNT_KEYS = {"restore_read_threads"}  # 0 allowed: "automatic"
_SHARED_RE = re.compile(r"(_local|[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)/[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def load(path: Path | None = None) -> Settings:
    """Read the config file (missing file = defaults) and apply env overrides."""
    path = path or Path(os.environ.get("WARMSTART_CONFIG") or DEFAULT_CONFIG)
    values: dict[str, object] = {}
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raw = {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot parse config ({e}); fix the TOML syntax") from e
    known = {f.name for f in fields(Settings)} - {"source"}
    values["source"] = path
    for key, val in raw.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r}; valid keys: {', '.join(sorted(known))}")
        if key in _PATH_KEYS:
            if not isinstance(val, str) or not val.startswith("/"):
                raise ConfigError(f"{path}: {key} must be an absolute path string, got {val!r}")
            values[key] = Path(val)
        elif key in _INT_KEYS:
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ConfigError(f"{path}: {key} must be a positive integer, got {val!r}")
            values[key] = val
        elif key == budget.KEY:
            if not isinstance(val, int) or isinstance(val, bool) or not budget.MIN_S <= val <= budget.MAX_S:
                raise ConfigError(f"{path}: {key} must be an integer from {budget.MIN_S} to {budget.MAX_S} (seconds "
                                  f"for a whole create, {budget.RESERVE_S} of them kept for a cold start; below "
                                  f"kubelet's runtime-request-timeout, 2 min by default), got {str(val)[:80]!r}")
            values[key] = val
        elif key in _COUNT_KEYS:
            if not isinstance(val, int) or isinstance(val, bool) or not 0 <= val <= 64:
                raise ConfigError(f"{path}: {key} must be an integer from 0 (automatic) to 64, got {val!r}")
            values[key] = val
        elif key == "trusted_keys":
            if not isinstance(val, list) or not all(isinstance(v, str) and v.startswith("/") for v in val):
                raise ConfigError(f"{path}: trusted_keys must be a list of absolute paths to ed25519 public keys")
            values[key] = tuple(Path(v) for v in val)
        elif key == "shared_checkpoints":
            if not isinstance(val, list) or not all(isinstance(v, str) and _SHARED_RE.fullmatch(v) for v in val):
                raise ConfigError(f"{path}: shared_checkpoints must be a list of \"namespace/checkpoint-id\" strings")
            values[key] = tuple(val)
        elif key == "secret_env_patterns":
            if not isinstance(val, list) or not all(isinstance(v, str) for v in val):
                raise ConfigError(f"{path}: secret_env_patterns must be a list of glob strings")
            values[key] = tuple(val)
        elif key == "network_lock":
            if val not in NETWORK_LOCKS:
                raise ConfigError(f"{path}: network_lock must be one of {', '.join(NETWORK_LOCKS)}, got {val!r}")
            values[key] = val
        elif key == "cuda_ipc":
            if val not in CUDA_IPC:
                raise ConfigError(f"{path}: cuda_ipc must be one of {', '.join(CUDA_IPC)}, got {val!r}")
            values[key] = val
        elif key == "registry":
            values[key] = _registry(path, val)
        elif key == "shared_store":
            values[key] = _shared_store(path, val)
    store_env = os.environ.get("WARMSTART_STORE")
    if store_env:
        if not store_env.startswith("/"):
            raise ConfigError(f"WARMSTART_STORE must be an absolute path, got {store_env!r}")
        values["store"] = Path(store_env)
    settings = Settings(**values)  # type: ignore[arg-type]
    _check_share_apart(path, settings)
    return settings


_CHOICES = {"push": ("auto", "off"), "pull": ("on-miss", "prefetch", "off"), "compress": ("zstd", "none"),
            "publish": ("auto", "off"), "fetch": ("on-miss", "off")}
# key -> (least, most) for the integer keys of [registry] and [shared_store]
_RANGES = {"pull_deadline_s": (1, MAX_PULL_DEADLINE_S), "cache_budget_bytes": (0, 1 << 62),
           "chunk_bytes": (1 << 20, 1 << 30), "compress_level": (1, 19), "fetch_deadline_s": (1, MAX_PULL_DEADLINE_S)}


def _table(path: Path, raw: object, section: str, known: set[str],
           special: Callable[[str, str, object], object]) -> dict[str, object]:
    """A config table's values, each key checked like the top-level ones: choices (_CHOICES) and integer
    ranges (_RANGES) here, the table's own keys by `special(name, key, value)`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {section} must be a table: write it as a [{section}] section")
    values: dict[str, object] = {}
    for key, val in raw.items():
        name = f"{path}: {section}.{key}"
        if key not in known:
            raise ConfigError(f"{name}: unknown key; valid keys: {', '.join(sorted(known))}")
        if key in _CHOICES:
            if val not in _CHOICES[key]:
                raise ConfigError(f"{name} must be one of {', '.join(map(repr, _CHOICES[key]))}, got {str(val)[:80]!r}")
            values[key] = val
        elif key in _RANGES:
            least, most = _RANGES[key]
            if not isinstance(val, int) or isinstance(val, bool) or not least <= val <= most:
                raise ConfigError(f"{name} must be an integer from {least} to {most}, got {str(val)[:80]!r}")
            values[key] = val
        else:
            values[key] = special(name, key, val)
    return values


def _registry(path: Path, raw: object) -> RegistrySettings:
    """The `[registry]` table."""
    def special(name: str, key: str, val: object) -> object:
        if key == "repository":
            if not isinstance(val, str) or not (val == "" or _REPOSITORY_RE.fullmatch(val)) or len(val) > 255:
                raise ConfigError(f"{name} must be host[:port]/path (lowercase path, no tag), "
                                  f"e.g. \"registry.local:5000/warmstart/checkpoints\"; got {str(val)[:80]!r}")
            return val
        if key == "auth_file":
            if not isinstance(val, str) or not val.startswith("/"):
                raise ConfigError(f"{name} must be an absolute path string, got {str(val)[:80]!r}")
            return Path(val)
        if not isinstance(val, bool):  # tls_verify
            raise ConfigError(f"{name} must be true or false (false only for a plain-HTTP registry), got {val!r}")
        return val
    known = {f.name for f in fields(RegistrySettings)}
    return RegistrySettings(**_table(path, raw, "registry", known, special))  # type: ignore[arg-type]


def _shared_store(path: Path, raw: object) -> SharedStoreSettings:
    """The `[shared_store]` table."""
    def special(name: str, key: str, val: object) -> object:  # path
        if not isinstance(val, str) or not val.startswith("/") or val.rstrip("/") == "" or "\0" in val:
            raise ConfigError(f"{name} must be the absolute path of the shared mount, e.g. "
                              f"\"/mnt/warmstart-share\"; got {str(val)[:80]!r}")
        return Path(val)
    known = {f.name for f in fields(SharedStoreSettings)}
    return SharedStoreSettings(**_table(path, raw, "shared_store", known, special))  # type: ignore[arg-type]


def _check_share_apart(path: Path, settings: Settings) -> None:
    """The share is untrusted input and the store and seals are root-only: neither may hold the other."""
    share = settings.shared_store.path
    if share is None:
        return
    for key in ("store", "seal_dir"):
        mine: Path = getattr(settings, key)
        if share == mine or share.is_relative_to(mine) or mine.is_relative_to(share):
            raise ConfigError(f"{path}: shared_store.path {str(share)!r} overlaps {key} {str(mine)!r}; "
                              f"mount the share elsewhere (e.g. /mnt/warmstart-share)")
