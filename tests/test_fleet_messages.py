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
    assert json.loads(data) == {"schema": 2, "online": True}
    assert parse_message("status", b'{"schema": 1, "online": true}')["online"] is True  # schema 1 still reads
    assert parse_message("status", data)["online"] is True
    with pytest.raises(ValidationError, match="lacks"):
        encode_message("desired", {"deployment_id": "d"})


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"[1,2]", b'{"schema": 3, "online": true}', b'{"schema": true, "online": true}',
     b'{"online": true}', b"[" * 100 + b"]" * 100,
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


def test_desired_state_of_schema_1_and_2_and_reports_of_several_models() -> None:
    from edge_agent.fleet_messages import DeployState, DesiredState, DeviceReport, OrderAction

    one = {"schema": 1, "deployment_id": "d", "bundle_url": "http://b/x.edb", "bundle_sha256": "ab",
           "model": {"name": "digits", "version": 3}, "device_id": "pi-1", "seq": 4, "expires": 9.5}
    desired = DesiredState.from_message(one)
    assert list(desired.models) == ["digits"] and desired.models["digits"].version == 3
    assert (desired.device_id, desired.seq, desired.expires, desired.schema) == ("pi-1", 4, 9.5, 1)
    two = {"schema": 2, **DesiredState(dict(desired.models), "pi-1", 5, 10.0).to_body()}
    two["models"]["ocr-det"] = {"deployment_id": "r", "bundle_url": "", "bundle_sha256": "", "action": "remove"}
    parsed = DesiredState.from_message(parse_message("desired", encode_message("desired", two)))
    assert parsed.models["digits"] == desired.models["digits"]
    assert parsed.models["ocr-det"].action == OrderAction.REMOVE
    for bad in ({"models": []}, {"models": {"../etc": {"bundle_sha256": "x"}}}, {"models": {}, "seq": -1},
                {"models": {"a": {"model": {"name": "b"}, "bundle_sha256": "x"}}}):
        with pytest.raises(ValidationError):
            DesiredState.from_message({"schema": 2, "device_id": "pi-1", "seq": 1, "expires": 1.0, **bad})

    legacy = DeviceReport.from_message({"schema": 1, "device_id": "pi-1", "state": "active", "ts": 1.0,
                                        "active": {"model": {"name": "digits", "version": 2},
                                                   "bundle_sha256": "ab"}})
    assert legacy.models["digits"].state == DeployState.ACTIVE and legacy.models["digits"].active.version == 2
    body = DeviceReport("pi-1", {**legacy.models}, 2.0, {"profile": "cpu-x86_64"}, primary="digits").to_body()
    assert body["active"]["bundle_sha256"] == "ab" and body["models"]["digits"]["state"] == "active"
    assert DeviceReport.from_message(body).models["digits"] == legacy.models["digits"]


@pytest.mark.parametrize("model", ["digits", ["digits"], 3])
def test_a_schema_2_order_whose_model_is_not_an_object_is_refused(model: object) -> None:
    order = {"schema": 2, "device_id": "pi-1", "seq": 1, "expires": 1.0,
             "models": {"digits": {"deployment_id": "d-1", "bundle_url": "http://x/b.edb",
                                   "bundle_sha256": "0" * 64, "model": model}}}
    with pytest.raises(ValidationError, match="'model' must be an object"):
        parse_message("desired", json.dumps(order).encode())
