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

DEFAULT_CONFIG = Path("/etc/warmstart/config.toml")
# Where install.sh puts the launcher: the handler's BinaryName, and what demo/bench/doctor run.
INSTALLED_RUNTIME = Path("/usr/local/bin/warmstart-runtime")
# The PATH the runtime gives itself, runc and CRIU when its caller gives none (podman's `kill` does
# not): CRIU's network lock runs iptables-restore by name, and Debian keeps it in /usr/sbin.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ConfigError(ValueError):
    """A bad config value; the message names the key and the fix."""


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
    # Threads that read the pages of an eager restore (warmstart's CRIU patch): 0 = one per CPU
    # (at most 8), 1 = CRIU's own single-threaded reads.
    restore_read_threads: int = 0
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

    @property
    def config_source(self) -> str:
        return os.environ.get("WARMSTART_CONFIG") or str(DEFAULT_CONFIG)


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
    known = {f.name for f in fields(Settings)}
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
    store_env = os.environ.get("WARMSTART_STORE")
    if store_env:
        if not store_env.startswith("/"):
            raise ConfigError(f"WARMSTART_STORE must be an absolute path, got {store_env!r}")
        values["store"] = Path(store_env)
    return Settings(**values)  # type: ignore[arg-type]
