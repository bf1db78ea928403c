"""Install the warmstart node image onto a node's root filesystem: the DaemonSet's install step.

The image (packaging/build-agent-image.sh) carries a self-contained /opt/warmstart: its own Python
(python/, linked against the bundled lib/ by RPATH), the venv with warmstart and pycriu, sbin/criu
and share/ (the runtime launcher, the config template, the containerd handler and the few repo
files install.sh's containerd step reads).  `install(payload, root)` copies that tree to
ROOT/opt/warmstart when the image id differs, then writes what install.sh's runtime and config steps
write, every path under ROOT and nothing else:

  ROOT/usr/local/bin/warmstart-runtime (0755), warmstart and warmstart-hook (links into the venv),
  ROOT/etc/warmstart/config.toml (only if absent), keys/node.key (0600) and node.pub,
  the store, seal, log and state dirs (0700), ROOT/etc/tmpfiles.d/warmstart.conf on systemd nodes.

containerd's handler is not written here: merging it safely needs the host's `containerd config
dump` (install.sh's containerd step, which the DaemonSet runs on the host right after this).
A re-run with the same image changes nothing.  Usage (in the image):

  python -m warmstart.nodeinstall --root /host
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

PAYLOAD = Path("/opt/warmstart")
# What the image's /opt/warmstart holds; each is replaced as a whole when the image id changes.
PAYLOAD_DIRS = ("python", "lib", "sbin", "venv", "share")
IMAGE_ID = ".image-id"
BIN_DIR = Path("/usr/local/bin")
ETC = Path("/etc/warmstart")
LINKS = ("warmstart", "warmstart-hook")
# Directories the runtime needs, as config.toml keys with their defaults (config.Settings').
DIR_KEYS = {"store": "/var/lib/warmstart/checkpoints", "seal_dir": "/var/lib/warmstart/seals",
            "log_dir": "/var/log/warmstart", "state_dir": "/run/warmstart"}


class InstallError(RuntimeError):
    """The node cannot be installed from this payload; the message says why and what to do."""


@dataclass
class NodeInstall:
    """One install of `payload` (the image's /opt/warmstart) under `root` (the node's /)."""

    payload: Path
    root: Path
    done: list[str] = field(default_factory=list)

    def under(self, path: Path | str) -> Path:
        """The node path `path` (absolute) as seen from here, below root."""
        return self.root / Path(path).relative_to("/")

    def run(self) -> list[str]:
        image_id = self._read_id(self.payload)
        if not image_id:
            raise InstallError(f"{self.payload / IMAGE_ID} missing: {self.payload} is not a warmstart node image payload")
        self.copy_payload(image_id)
        self.write_runtime()
        self.write_config()
        return self.done

    @staticmethod
    def _read_id(base: Path) -> str:
        try:
            return (base / IMAGE_ID).read_text().strip()
        except OSError:
            return ""

    def copy_payload(self, image_id: str) -> None:
        """Each payload dir is copied beside its target and renamed into place, so a runtime call during an
        upgrade sees the old tree or the new one; the image id is written last (a torn copy re-runs)."""
        dest = self.under(PAYLOAD)
        if self._read_id(dest) == image_id and all((dest / d).is_dir() for d in PAYLOAD_DIRS):
            return
        dest.mkdir(parents=True, exist_ok=True)
        for name in PAYLOAD_DIRS:
            new, old, final = dest / f".{name}.new", dest / f".{name}.old", dest / name
            for stale in (new, old):
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale)
            shutil.copytree(self.payload / name, new, symlinks=True)
            if final.is_symlink() or final.is_file():
                final.unlink()
            elif final.exists():
                final.rename(old)
            new.rename(final)
            if old.exists():
                shutil.rmtree(old)
        tmp = dest / f"{IMAGE_ID}.tmp"
        tmp.write_text(image_id + "\n")
        tmp.chmod(0o644)
        tmp.rename(dest / IMAGE_ID)
        self.done.append(f"{PAYLOAD} from image {image_id}")

    def write_runtime(self) -> None:
        bin_dir = self.under(BIN_DIR)
        bin_dir.mkdir(parents=True, exist_ok=True)
        src = self.payload / "share" / "warmstart-runtime"
        dst = bin_dir / "warmstart-runtime"
        data = src.read_bytes()
        if dst.is_symlink() or not dst.is_file() or dst.read_bytes() != data or dst.stat().st_mode & 0o7777 != 0o755:
            tmp = bin_dir / ".warmstart-runtime.tmp"
            tmp.write_bytes(data)
            tmp.chmod(0o755)
            tmp.rename(dst)
            self.done.append(str(BIN_DIR / "warmstart-runtime"))
        for name in LINKS:
            target = str(PAYLOAD / "venv" / "bin" / name)
            link = bin_dir / name
            if link.is_symlink() and os.readlink(link) == target:
                continue
            tmp = bin_dir / f".{name}.tmp"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(target)
            tmp.rename(link)
            self.done.append(f"{BIN_DIR / name} -> {target}")

    def write_config(self) -> None:
        etc = self.under(ETC)
        etc.mkdir(parents=True, exist_ok=True)
        config = etc / "config.toml"
        if not config.exists():
            text = (self.payload / "share" / "config.toml.in").read_text()
            text = text.replace("@CRIU@", str(PAYLOAD / "sbin" / "criu")).replace("@ETC@", str(ETC))
            tmp = etc / "config.toml.tmp"
            tmp.write_text(text)
            tmp.chmod(0o644)
            tmp.rename(config)
            self.done.append(f"{ETC / 'config.toml'}")
        try:
            raw = tomllib.loads(config.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise InstallError(f"{ETC / 'config.toml'} on the node does not parse ({e}); fix its TOML and re-run") from e
        dirs = {key: str(raw.get(key, default)) for key, default in DIR_KEYS.items()}
        for key, path in dirs.items():
            if not path.startswith("/"):
                raise InstallError(f"{ETC / 'config.toml'}: {key} must be an absolute path, got {path!r}")
            self._private_dir(Path(path))
        keys = etc / "keys"
        self._private_dir(ETC / "keys")
        if not (keys / "node.key").exists():
            from .signing import keygen  # noqa: PLC0415 - cryptography is only needed on a first install
            (keys / "node.pub").unlink(missing_ok=True)
            kid = keygen(keys / "node.key", keys / "node.pub")
            self.done.append(f"{ETC / 'keys/node.key'} (ed25519, key id {kid})")
        if (keys / "node.key").stat().st_mode & 0o7777 != 0o600:
            (keys / "node.key").chmod(0o600)
            self.done.append(f"{ETC / 'keys/node.key'} (mode fixed)")
        # /run is a tmpfs: systemd recreates the state dir at boot (the runtime creates it too).
        if self.under("/etc/tmpfiles.d").is_dir() or self.under("/run/systemd/system").is_dir():
            line = f"d {dirs['state_dir']} 0700 root root -\n"
            conf = self.under("/etc/tmpfiles.d/warmstart.conf")
            if not conf.is_file() or conf.read_text() != line:
                conf.parent.mkdir(parents=True, exist_ok=True)
                conf.write_text(line)
                conf.chmod(0o644)
                self.done.append("/etc/tmpfiles.d/warmstart.conf")

    def _private_dir(self, node_path: Path) -> None:
        """node_path root-owned 0700 under root (created, or its mode fixed)."""
        d = self.under(node_path)
        if not d.is_dir():
            d.mkdir(mode=0o700, parents=True)
            d.chmod(0o700)
            os.chown(d, 0, 0)
            self.done.append(str(node_path))
        elif d.stat().st_mode & 0o7777 != 0o700 or d.stat().st_uid != 0:
            d.chmod(0o700)
            os.chown(d, 0, 0)
            self.done.append(f"{node_path} (mode fixed)")


def install(payload: Path, root: Path) -> list[str]:
    """Install `payload` under `root`; returns what changed (empty on a re-run with the same image)."""
    return NodeInstall(payload, root).run()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m warmstart.nodeinstall", description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="the node's / (the DaemonSet mounts it at /host)")
    ap.add_argument("--payload", type=Path, default=PAYLOAD, help=f"the image's tree (default {PAYLOAD})")
    args = ap.parse_args(argv)
    if not args.root.is_absolute() or not args.root.is_dir():
        print(f"[warmstart-nodeinstall] ERROR: --root {args.root}: not an existing absolute directory", file=sys.stderr)
        return 2
    try:
        done = install(args.payload, args.root)
    except (InstallError, OSError) as e:
        print(f"[warmstart-nodeinstall] ERROR: {e}", file=sys.stderr)
        return 1
    print(f"[warmstart-nodeinstall] {args.root}: " + ("; ".join(done) if done else "up to date, nothing changed"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
