"""The trust store: the ed25519 public keys a device (or this machine) accepts, by key id.

A key id is the first 16 hex digits of the sha256 of the raw 32-byte public key. The local trust
store is ``EDGEDEPLOY_HOME/trust/<key_id>.pub``; a device trusts exactly its ``trusted_keys`` files.

Every key has one role: ``publisher`` keys sign bundles, ``orders`` keys sign the controller's
desired-state orders. A key file may hold several PEM blocks, each preceded by a role line
(``edgedeploy-role: orders``); a block without one is a publisher key (files exported before
roles existed). A store holds the keys of one role only, so a bundle signed with the order key,
or an order signed with the publisher key, is refused.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.errors import NotFoundError, ValidationError
from edge_agent.home import edgedeploy_home

__all__ = [
    "ORDERS",
    "PUBLISHER",
    "ROLES",
    "TrustStore",
    "key_id_of",
    "load_public_key",
    "load_role_keys",
    "public_pem",
    "role_pem",
    "trust_dir",
]

PUBLISHER = "publisher"
ORDERS = "orders"
ROLES = (PUBLISHER, ORDERS)
_ROLE_LINE = "edgedeploy-role:"
_PEM_BLOCK = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----\s*", re.S)
_ROLE_MARK = re.compile(rb"edgedeploy-role:\s*([A-Za-z-]+)\s*$")


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """Short, stable id of a public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    """The public key as PEM (SubjectPublicKeyInfo), as ``keys export`` writes it."""
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def role_pem(public_key: Ed25519PublicKey, role: str) -> bytes:
    """The public key as PEM preceded by its role line (PEM allows text before a block)."""
    if role not in ROLES:
        raise ValidationError(f"unknown key role {role!r}: use {' or '.join(ROLES)}")
    return f"{_ROLE_LINE} {role}\n".encode() + public_pem(public_key)


def trust_dir(home: Path | None = None) -> Path:
    """The local trust store's folder."""
    return (home or edgedeploy_home()) / "trust"


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read the (first) publisher ed25519 key from a PEM file, with a clear error when there is none."""
    publishers = [key for role, key in load_role_keys(path) if role == PUBLISHER]
    if not publishers:
        raise ValidationError(f"{path} holds no publisher key (only {ORDERS!r} keys)")
    return publishers[0]


def load_role_keys(path: Path) -> list[tuple[str, Ed25519PublicKey]]:
    """Every (role, key) in a key file; an unmarked block is a publisher key."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"public key file not found: {path}")
    data = path.read_bytes()
    found: list[tuple[str, Ed25519PublicKey]] = []
    start = 0
    for block in _PEM_BLOCK.finditer(data):
        preamble = data[start:block.start()].strip().splitlines()
        start = block.end()
        mark = _ROLE_MARK.match(preamble[-1].strip()) if preamble else None
        role = mark.group(1).decode() if mark else PUBLISHER
        if role not in ROLES:
            raise ValidationError(f"{path}: unknown key role {role!r} (known: {', '.join(ROLES)})")
        found.append((role, _parse_public_key(block.group(), path)))
    if not found:
        raise ValidationError(f"{path} is not a PEM public key (no BEGIN PUBLIC KEY block)")
    return found


def _parse_public_key(pem: bytes, path: Path) -> Ed25519PublicKey:
    try:
        public_key = serialization.load_pem_public_key(pem)
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
    def from_files(cls, paths: Iterable[Path], role: str = PUBLISHER) -> TrustStore:
        """Trust exactly the keys of ``role`` in these PEM files (a device's ``trusted_keys``)."""
        return cls(key for p in paths for key_role, key in load_role_keys(Path(p)) if key_role == role)

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
