"""Checkpoint signatures: ed25519 over the metadata's hash, checked against the node's trust policy.

metadata.json carries the SHA-256 of every other file (the manifest), its own
hash is in the marker, and the marker carries the signature of that hash.  So
one signature covers the whole checkpoint: the images, the rootfs diff, and
the namespace and compat record the restore decision trusts.  Without a key
anyone who can write the store (or a registry) could edit `core-1.img` and
recompute the hashes.

Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public), made by
`install.sh` (`python -m warmstart.signing keygen`); a key's id is the first 16
hex digits of the SHA-256 of its raw public key.  The trust policy is the list
of public keys in the config (`trusted_keys`): the node's own, and any cluster
key shared to all nodes.
"""
from __future__ import annotations

import base64
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

DOMAIN = b"warmstart checkpoint v1\n"  # what is signed is this, then the metadata's hex SHA-256


class SignatureError(Exception):
    """A missing, unknown or wrong signature, or an unusable key; the message says which."""


def _raw_public(key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - only when signing or verifying

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)  # type: ignore[attr-defined]


def key_id(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


@dataclass(frozen=True)
class TrustPolicy:
    paths: tuple[Path, ...]

    @property
    def fingerprint(self) -> str:
        """Changes when a trusted key file does: a seal made under another policy is not reused."""
        h = hashlib.sha256()
        for p in sorted(self.paths):
            h.update(str(p).encode() + b"\0")
            try:
                h.update(p.read_bytes())
            except OSError:
                h.update(b"missing")
        return h.hexdigest()

    def keys(self) -> dict[str, tuple[object, Path]]:
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey  # noqa: PLC0415

        out: dict[str, tuple[object, Path]] = {}
        for p in self.paths:
            try:
                key = serialization.load_pem_public_key(p.read_bytes())
            except (OSError, ValueError) as e:
                raise SignatureError(f"trusted_keys: cannot read {p} ({e}); fix the config or the key file") from None
            if not isinstance(key, Ed25519PublicKey):
                raise SignatureError(f"trusted_keys: {p} is not an ed25519 public key")
            out[key_id(_raw_public(key))] = (key, p)
        return out

    def verify(self, metadata_sha256: str, signature: object) -> str:
        """The signer's key id and file, or SignatureError."""
        if not isinstance(signature, dict) or not isinstance(signature.get("ed25519"), str):
            raise SignatureError("checkpoint is not signed; only signed checkpoints are restored")
        kid = str(signature.get("key_id", ""))
        keys = self.keys()
        if kid not in keys:
            raise SignatureError(f"signed by key {kid[:32]!r}, which is not in this node's trusted_keys")
        from cryptography.exceptions import InvalidSignature  # noqa: PLC0415

        key, path = keys[kid]
        try:
            key.verify(base64.b64decode(signature["ed25519"], validate=True),  # type: ignore[attr-defined]
                       DOMAIN + metadata_sha256.encode())
        except (InvalidSignature, ValueError):
            raise SignatureError(f"signature by key {kid} does not match the checkpoint (tampered?)") from None
        return f"{kid} ({path})"


def sign(private_key: Path, metadata_sha256: str) -> dict[str, str]:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415

    try:
        key = serialization.load_pem_private_key(private_key.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise SignatureError(f"signing_key: cannot read {private_key} ({e}); install.sh creates the node key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"signing_key: {private_key} is not an ed25519 private key")
    sig = key.sign(DOMAIN + metadata_sha256.encode())
    return {"key_id": key_id(_raw_public(key.public_key())), "ed25519": base64.b64encode(sig).decode()}


def keygen(private_key: Path, public_key: Path) -> str:
    """Write a new key pair (private 0600); returns the key id."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_key.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
    public_key.chmod(0o644)
    return key_id(_raw_public(key.public_key()))


if __name__ == "__main__":  # python -m warmstart.signing keygen PRIVATE PUBLIC
    if len(sys.argv) != 4 or sys.argv[1] != "keygen":
        sys.exit("usage: python -m warmstart.signing keygen PRIVATE.pem PUBLIC.pem")
    print(keygen(Path(sys.argv[2]), Path(sys.argv[3])))
