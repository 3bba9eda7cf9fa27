"""The trust store: the ed25519 public keys a device (or this machine) accepts, by key id.

A key id is the first 16 hex digits of the sha256 of the raw 32-byte public key. The local trust
store is ``EDGEDEPLOY_HOME/trust/<key_id>.pub``; a device trusts exactly its ``trusted_keys`` files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.errors import NotFoundError, ValidationError
from edge_agent.home import edgedeploy_home

__all__ = ["TrustStore", "key_id_of", "load_public_key", "public_pem", "trust_dir"]


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """Short, stable id of a public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    """The public key as PEM (SubjectPublicKeyInfo), as ``keys export`` writes it."""
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def trust_dir(home: Path | None = None) -> Path:
    """The local trust store's folder."""
    return (home or edgedeploy_home()) / "trust"


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read an ed25519 public key from a PEM file, with a clear error when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"public key file not found: {path}")
    try:
        public_key = serialization.load_pem_public_key(path.read_bytes())
    except ValueError as exc:
        raise ValidationError(f"{path} is not a PEM public key ({exc})") from None
    if not isinstance(public_key, Ed25519PublicKey):
        raise ValidationError(f"{path} is not an ed25519 public key")
    return public_key


class TrustStore:
    """The public keys a verifier accepts, by key id. Empty means nothing is trusted."""

    def __init__(self, keys: Iterable[Ed25519PublicKey] = ()) -> None:
        self._keys = {key_id_of(key): key for key in keys}

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> TrustStore:
        """Trust exactly the keys in these PEM files (a device's ``trusted_keys``)."""
        return cls(load_public_key(Path(p)) for p in paths)

    @classmethod
    def local(cls, home: Path | None = None) -> TrustStore:
        """The trust store under ``EDGEDEPLOY_HOME/trust``."""
        return cls.from_files(sorted(trust_dir(home).glob("*.pub")))

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def verify(self, key_id: str, signature: bytes, data: bytes) -> bool:
        """True when ``key_id`` is trusted and ``signature`` is its signature of ``data``."""
        key = self._keys.get(key_id)
        if key is None:
            return False
        try:
            key.verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys
