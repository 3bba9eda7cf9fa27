"""Ed25519 signing keys and the trust store of public keys.

Layout under ``EDGEDEPLOY_HOME``::

    keys/<name>.key              private signing key (PEM, PKCS#8, mode 0600)
    keys/orders/controller.key   the controller's order-signing key (never signs bundles)
    trust/<key_id>.pub           trusted bundle-publisher keys (PEM); every generated key is trusted locally

``keys generate`` also creates the order-signing key when there is none, and ``keys export``
writes both public keys into the one file a device trusts, each marked with its role
(see :mod:`edge_agent.trust`). The order key never enters ``trust/``: bundles signed with it are refused.

A key id is the first 16 hex digits of the sha256 of the raw 32-byte public key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.atomic import atomic_write_bytes
from edge_agent.errors import AlreadyExistsError, NotFoundError, UsageError, ValidationError
from edge_agent.home import edgedeploy_home
from edge_agent.trust import ORDERS, PUBLISHER, TrustStore, key_id_of, load_public_key, public_pem, role_pem, trust_dir

__all__ = [
    "DEFAULT_KEY_NAME",
    "ORDER_KEY_NAME",
    "KeyInfo",
    "SigningKey",
    "TrustStore",
    "export_public_key",
    "generate_key",
    "key_id_of",
    "list_keys",
    "load_public_key",
    "load_order_key",
    "load_signing_key",
    "trust_key",
]

DEFAULT_KEY_NAME = "default"
ORDER_KEY_NAME = "controller"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class SigningKey:
    """A private key that signs bundles."""

    name: str
    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def key_id(self) -> str:
        return key_id_of(self.public_key)

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature of ``data`` (deterministic: same key and data, same bytes)."""
        return self.private_key.sign(data)


@dataclass(frozen=True)
class KeyInfo:
    """One row of ``edgedeploy keys list``."""

    kind: str  # "signing" or "trusted"
    name: str
    key_id: str
    path: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "key_id": self.key_id, "path": self.path}


def _keys_dir(home: Path | None) -> Path:
    return (home or edgedeploy_home()) / "keys"


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise UsageError(f"invalid key name {name!r}: use letters, digits, '.', '_' or '-' (max 64)")


def _new_private_key(path: Path) -> Ed25519PrivateKey:
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write_bytes(path, pem, mode=0o600)
    return private_key


def _read_private_key(path: Path) -> Ed25519PrivateKey:
    private_key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(private_key, Ed25519PrivateKey):
        raise ValidationError(f"{path} is not an ed25519 private key")
    return private_key


def generate_key(name: str = DEFAULT_KEY_NAME, home: Path | None = None) -> SigningKey:
    """Create a signing key named ``name``, trust its public key here; create the order key if absent."""
    _check_name(name)
    path = _keys_dir(home) / f"{name}.key"
    if path.exists():
        raise AlreadyExistsError(f"signing key {name!r} exists already ({path}); pick another --name")
    key = SigningKey(name, _new_private_key(path))
    atomic_write_bytes(trust_dir(home) / f"{key.key_id}.pub", public_pem(key.public_key))
    load_order_key(home)
    return key


def load_order_key(home: Path | None = None) -> SigningKey:
    """The controller's order-signing key, created on first use (distinct from every bundle key)."""
    path = _keys_dir(home) / "orders" / f"{ORDER_KEY_NAME}.key"
    private_key = _read_private_key(path) if path.is_file() else _new_private_key(path)
    return SigningKey(ORDER_KEY_NAME, private_key)


def load_signing_key(name: str | None = None, home: Path | None = None) -> SigningKey:
    """Load a signing key; refuses (never signs with nothing) when it does not exist."""
    name = name or DEFAULT_KEY_NAME
    _check_name(name)
    path = _keys_dir(home) / f"{name}.key"
    if not path.is_file():
        raise NotFoundError(f"no signing key {name!r}: run 'edgedeploy keys generate --name {name}' first")
    return SigningKey(name, _read_private_key(path))


def export_public_key(out: Path, name: str | None = None, home: Path | None = None) -> str:
    """Write the public halves of signing key ``name`` and of the order key to ``out``, by role.

    Returns the signing key's id. A device given this one file (``trusted_keys``) accepts bundles
    from the publisher and orders from this controller, and neither key in the other's place.
    """
    key = load_signing_key(name, home)
    orders = load_order_key(home)
    atomic_write_bytes(Path(out), role_pem(key.public_key, PUBLISHER) + role_pem(orders.public_key, ORDERS))
    return key.key_id


def trust_key(path: Path, home: Path | None = None) -> str:
    """Add a signer's public key to the trust store; returns its key id."""
    public_key = load_public_key(path)
    key_id = key_id_of(public_key)
    atomic_write_bytes(trust_dir(home) / f"{key_id}.pub", public_pem(public_key))
    return key_id


def list_keys(home: Path | None = None) -> list[KeyInfo]:
    """Signing keys and trusted public keys on this machine."""
    rows = []
    for path in sorted(_keys_dir(home).glob("*.key")):
        key = load_signing_key(path.stem, home)
        rows.append(KeyInfo("signing", key.name, key.key_id, str(path)))
    order_path = _keys_dir(home) / "orders" / f"{ORDER_KEY_NAME}.key"
    if order_path.is_file():
        rows.append(KeyInfo("orders", ORDER_KEY_NAME, load_order_key(home).key_id, str(order_path)))
    for path in sorted(trust_dir(home).glob("*.pub")):
        rows.append(KeyInfo("trusted", path.stem, key_id_of(load_public_key(path)), str(path)))
    return rows
