"""The MQTT topic contract (packager/fleet_messages.py)."""

from __future__ import annotations

import json

import pytest

from edge_agent.errors import ValidationError
from edge_agent.fleet_messages import (
    MAX_MESSAGE_BYTES,
    encode_message,
    parse_message,
    parse_topic,
    topic,
)


def test_topics_roundtrip() -> None:
    name = topic("pi-kitchen-01", "desired")
    assert name == "edgedeploy/devices/pi-kitchen-01/desired"
    assert parse_topic(name) == ("pi-kitchen-01", "desired")
    assert topic("+", "reported", prefix="site/a") == "site/a/devices/+/reported"
    assert parse_topic("site/a/devices/d1/status", prefix="site/a") == ("d1", "status")


@pytest.mark.parametrize("bad", ["edgedeploy/devices/d1", "other/devices/d1/desired",
                                 "edgedeploy/devices/d1/secrets", "edgedeploy/devices/a#b/desired"])
def test_foreign_topics_are_refused(bad: str) -> None:
    with pytest.raises(ValidationError):
        parse_topic(bad)


def test_messages_carry_schema_version_and_required_fields() -> None:
    data = encode_message("status", {"online": True})
    assert json.loads(data) == {"schema": 1, "online": True}
    assert parse_message("status", data)["online"] is True
    with pytest.raises(ValidationError, match="lacks"):
        encode_message("desired", {"deployment_id": "d"})


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"[1,2]", b'{"schema": 2, "online": true}', b'{"online": true}',
     b'{"schema": 1}', b"\xff\xfe", b'{"schema": 1, "online": true, "pad": "' + b"x" * MAX_MESSAGE_BYTES + b'"}'],
)
def test_malformed_messages_are_refused_not_crashing(payload: bytes) -> None:
    with pytest.raises(ValidationError):
        parse_message("status", payload)


@pytest.mark.parametrize("model", ["digits", ["digits"], 3, None])
def test_an_order_whose_model_is_not_an_object_is_refused(model: object) -> None:
    order = {"schema": 1, "deployment_id": "d-1", "bundle_url": "http://x/b.edb", "bundle_sha256": "0" * 64,
             "model": model}
    with pytest.raises(ValidationError, match="'model' must be an object"):
        parse_message("desired", json.dumps(order).encode())
