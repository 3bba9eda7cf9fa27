"""Signed orders (edge_agent/orders.py): what a device accepts, refuses, and remembers across restarts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edge_agent.orders import OrderGuard, OrderRefused, sign_order, verify_order
from edge_agent.trust import ORDERS, TrustStore
from packager.keys import SigningKey, export_public_key, load_order_key

NOW = 1_800_000_000.0


def message(seq: int, device_id: str = "pi-1", expires: float = NOW + 60, **extra: Any) -> dict[str, Any]:
    return {"schema": 2, "device_id": device_id, "seq": seq, "expires": expires,
            "models": {"digits": {"deployment_id": f"d-{seq}", "bundle_url": "http://b/x.edb",
                                  "bundle_sha256": "ab", "model": {"name": "digits", "version": seq}}}, **extra}


@pytest.fixture
def guard(signing_key: SigningKey, tmp_path: Path) -> OrderGuard:
    export_public_key(tmp_path / "device.pub")
    trust = TrustStore.from_files([tmp_path / "device.pub"], role=ORDERS)
    return OrderGuard("pi-1", trust, tmp_path / "data" / "orders.json", clock=lambda: NOW)


def test_a_signed_current_order_is_accepted_once_and_its_sequence_survives_a_restart(guard: OrderGuard) -> None:
    key = load_order_key()
    first = sign_order(message(1), key)
    assert guard.check(first).models["digits"].version == 1
    assert guard.check(first).seq == 1  # redelivered (retained): accepted again, idempotent, no alarm
    assert guard.check(sign_order(message(5), key)).seq == 5
    again = OrderGuard("pi-1", guard.trust, guard.state_file, clock=lambda: NOW)
    assert again.last_seq == 5
    with pytest.raises(OrderRefused, match=r"refused order seq 1: replayed \(sequence 1 is not above 5"):
        again.check(first)
    assert json.loads(guard.state_file.read_text())["last_seq"] == 5


@pytest.mark.parametrize("case, reason", [
    ("unsigned", "unsigned"), ("publisher", "not a controller key"), ("altered", "signature does not match"),
    ("other-device", "addressed to 'pi-2'"), ("expired", "expired"), ("no-expiry", "expired (expiry never set)"),
    ("garbage-signature", "signature does not match"), ("bad-shape", "'models' must be an object"),
])
def test_refusals_are_one_line_and_change_nothing(guard: OrderGuard, signing_key: SigningKey, case: str,
                                                  reason: str) -> None:
    key = load_order_key()
    payload = {
        "unsigned": message(2),
        "publisher": sign_order(message(2), signing_key),
        "altered": {**sign_order(message(2), key), "seq": 3},
        "other-device": sign_order(message(2, device_id="pi-2"), key),
        "expired": sign_order(message(2, expires=NOW - 1), key),
        "no-expiry": sign_order({k: v for k, v in message(2).items() if k != "expires"}, key),
        "garbage-signature": {**message(2), "signature": {"key_id": key.key_id, "ed25519": "@@not base64@@"}},
        "bad-shape": sign_order({**message(2), "models": ["digits"]}, key),
    }[case]
    with pytest.raises(OrderRefused) as refused:
        guard.check(payload)
    line = str(refused.value)
    assert reason in line and line.startswith("refused order") and "\n" not in line
    assert guard.last_seq == -1 and not guard.state_file.exists()


def test_a_device_without_a_controller_key_refuses_every_order(signing_key: SigningKey, tmp_path: Path) -> None:
    nobody = OrderGuard("pi-1", TrustStore(), tmp_path / "orders.json", clock=lambda: NOW)
    with pytest.raises(OrderRefused, match="trusts no controller key"):
        nobody.check(sign_order(message(1), load_order_key()))
    with pytest.raises(OrderRefused, match="not a controller key"):  # the bundle key never stands in
        verify_order(sign_order(message(1), signing_key), TrustStore([load_order_key().public_key]))
