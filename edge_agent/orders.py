"""Signed orders: a desired state counts only when this device's controller signed it for this device.

Anyone who can publish to the broker could otherwise stop a model (``"action": "remove"``) or roll
a device back to an old, validly signed bundle. So every desired message carries, besides what to
run (schema 1 or 2, see :mod:`edge_agent.fleet_messages`)::

    "device_id": "pi-kitchen-01"          the one device it is for
    "seq": 42                             the controller's counter for this device, always rising
    "expires": 1795590000.0               unix time after which it must not be applied
    "signature": {"key_id": "...", "ed25519": "<base64>"}

The signature is ed25519 over the message's canonical JSON (sorted keys, no spaces) without the
``signature`` field, by a key the device trusts in the ``orders`` role (never a bundle publisher's
key, see :mod:`edge_agent.trust`). :class:`OrderGuard` checks, in order: signed, by a trusted order
key, addressed to this device, sequence above the last applied one (the same sequence again is the
retained message redelivered on reconnect: applied again, which is idempotent, and no alarm), not
expired. The last applied
sequence is written atomically before the order is acted on, so it survives restarts.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from edge_agent.atomic import atomic_write_json, read_json
from edge_agent.bundle import canonical_json
from edge_agent.errors import ValidationError
from edge_agent.fleet_messages import DesiredState
from edge_agent.trust import TrustStore

__all__ = ["ORDER_TTL_S", "OrderGuard", "OrderRefused", "Signer", "check_signature", "sign_order", "signing_bytes",
           "verify_order"]

log = logging.getLogger(__name__)

ORDER_TTL_S = 30 * 24 * 3600.0  # an order outlives a device that is offline for weeks, not a stolen backup


class OrderRefused(ValidationError):
    """A desired message that this device must not act on; the message is the one line to report."""


class Signer(Protocol):
    """What signs orders (``packager.keys.SigningKey`` is one)."""

    @property
    def key_id(self) -> str: ...

    def sign(self, data: bytes) -> bytes: ...


def signing_bytes(message: dict[str, Any]) -> bytes:
    """The bytes an order signature covers: canonical JSON of everything but ``signature``."""
    return canonical_json({k: v for k, v in message.items() if k != "signature"})


def sign_order(message: dict[str, Any], signer: Signer) -> dict[str, Any]:
    """``message`` (with schema, device_id, seq and expires set) plus the controller's signature."""
    signature = base64.b64encode(signer.sign(signing_bytes(message))).decode()
    return {**message, "signature": {"key_id": signer.key_id, "ed25519": signature}}


def _label(message: dict[str, Any]) -> str:
    name = message.get("deployment_id")
    if not isinstance(name, str) or not name:
        seq = message.get("seq")
        name = f"seq {seq}" if isinstance(seq, int) else "without id"
    return f"refused order {name[:80]}"


def verify_order(message: dict[str, Any], trust: TrustStore) -> DesiredState:
    """The typed desired state of a message signed by a key in ``trust``; OrderRefused otherwise.

    Only the signature and the shape are checked here; :class:`OrderGuard` adds address, sequence
    and expiry.
    """
    label = _label(message)
    check_signature(message, trust, label)
    try:
        return DesiredState.from_message(message)
    except ValidationError as exc:
        raise OrderRefused(f"{label}: {exc}") from None


def check_signature(message: dict[str, Any], trust: TrustStore, label: str, what: str = "orders") -> None:
    """Refuse (OrderRefused, starting with ``label``) a message not signed by a key in ``trust``.

    Orders and the controller's requests (:mod:`edge_agent.operations`) are signed alike.
    """
    signature = message.get("signature")
    if not isinstance(signature, dict):
        raise OrderRefused(f"{label}: unsigned ({what} must carry the controller's signature)")
    key_id, value = signature.get("key_id"), signature.get("ed25519")
    if not trust.key_ids:
        raise OrderRefused(f"{label}: this device trusts no controller key (export the keys again with "
                           "`edgedeploy keys export`, or name one in controller_keys)")
    if not isinstance(key_id, str) or key_id not in trust:
        raise OrderRefused(f"{label}: signed by key {str(key_id)[:40]!r}, not a controller key this device trusts")
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if not trust.verify(key_id, raw, signing_bytes(message)):
        raise OrderRefused(f"{label}: the signature does not match (altered or forged)")


class OrderGuard:
    """Decides whether a desired message is this device's controller's current order."""

    def __init__(self, device_id: str, trust: TrustStore, state_file: Path,
                 clock: Callable[[], float] = time.time) -> None:
        self.device_id = device_id
        self.trust = trust
        self.state_file = Path(state_file)
        self.clock = clock
        self.last_seq = self._load()

    def _load(self) -> int:
        if not self.state_file.is_file():
            return -1
        try:
            value = read_json(self.state_file).get("last_seq", -1)
        except (OSError, ValueError, AttributeError):
            # Fail closed would brick the device; -1 accepts only orders that are signed and current.
            log.error("%s is unreadable; accepting the next signed order", self.state_file)
            return -1
        return value if isinstance(value, int) else -1

    def check(self, message: dict[str, Any]) -> DesiredState:
        """The typed order to apply; OrderRefused says why not.

        The order applied last, redelivered (a retained message after a reconnect), passes again
        without a new record: applying it twice is idempotent, and a crash between accepting it
        and starting it loses nothing.
        """
        label = _label(message)
        desired = verify_order(message, self.trust)
        if desired.device_id != self.device_id:
            raise OrderRefused(f"{label}: addressed to {desired.device_id!r}, not to this device")
        if desired.seq is None:
            raise OrderRefused(f"{label}: it has no sequence number")
        if desired.seq == self.last_seq:
            return desired
        if desired.seq < self.last_seq:
            raise OrderRefused(f"{label}: replayed (sequence {desired.seq} is not above {self.last_seq}, "
                               "the last one applied)")
        if desired.expires is None or desired.expires < self.clock():
            when = "never set" if desired.expires is None else time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(desired.expires))
            raise OrderRefused(f"{label}: expired (expiry {when})")
        atomic_write_json(self.state_file, {"last_seq": desired.seq, "ts": self.clock()})
        self.last_seq = desired.seq
        return desired
