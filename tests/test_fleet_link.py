"""The fleet controller's broker connection (``packager.fleet._Link``) against a private Mosquitto."""

from __future__ import annotations

import json
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.errors import EdgeDeployError, UsageError
from edge_agent.fleet_messages import encode_message, topic
from packager.fleet import FleetController
from packager.targets.base import free_port
from tests import test_agent_mqtt

broker = test_agent_mqtt.broker  # the private Mosquitto fixture (its port), shared with the agent tests


def publish_retained(port: int, messages: list[tuple[str, bytes]]) -> None:
    """Publish retained QoS 1 messages as some device (or an attacker) would, and wait for each."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="device-side", protocol=paho.MQTTv311)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for name, payload in messages:
            client.publish(name, payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def reported(device_id: str) -> bytes:
    return encode_message("reported", {"device_id": device_id, "state": "idle", "ts": time.time()})


def test_a_deeply_nested_report_is_dropped_and_the_controller_keeps_listening(broker: int) -> None:
    """100,000 nested brackets once raised RecursionError in paho's thread: every later report was lost."""
    deep = b"[" * 100_000 + b"]" * 100_000
    publish_retained(broker, [(topic("evil-1", "reported"), deep), (topic("evil-2", "status"), b"\xff{"),
                                      (topic("good-1", "reported"), reported("good-1"))])
    with FleetController(f"mqtt://127.0.0.1:{broker}") as controller:
        assert [d["device_id"] for d in controller.devices()] == ["good-1"]
        publish_retained(broker, [(topic("good-2", "reported"), reported("good-2"))])  # after the bad ones
        deadline = time.monotonic() + 10
        while len(controller.devices()) < 2:
            assert time.monotonic() < deadline, "the controller stopped taking messages"
            time.sleep(0.1)
        assert [d["device_id"] for d in controller.devices()] == ["good-1", "good-2"]


@pytest.mark.parametrize("version", ["auto", "5", "3.1.1"])
def test_every_mqtt_version_connects_to_mosquitto(broker: int, version: str) -> None:
    publish_retained(broker, [(topic("dev-1", "reported"), reported("dev-1"))])
    with FleetController(f"mqtt://127.0.0.1:{broker}", mqtt_version=version) as controller:
        assert json.loads(json.dumps(controller.devices()))[0]["device_id"] == "dev-1"


def test_a_bad_mqtt_version_or_an_absent_broker_is_one_clear_error() -> None:
    with pytest.raises(UsageError, match="bad MQTT version '4'"):
        FleetController(f"mqtt://127.0.0.1:{free_port()}", mqtt_version="4").devices()
    with pytest.raises(EdgeDeployError, match="is it running"):
        FleetController(f"mqtt://127.0.0.1:{free_port()}").devices()
