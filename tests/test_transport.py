"""Fleet transports (edge_agent/transport.py): found by entry points, by the broker URL's scheme."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import parse_agent_config
from edge_agent.errors import UsageError, ValidationError
from edge_agent.transport import (
    CONTROLLER_GROUP,
    DeviceTransport,
    controller_transport,
    device_transport,
    transport_names,
)


class LoopTransport:
    """A device transport that keeps what it is given (what a third-party module would provide)."""

    def __init__(self, config: Any, on_desired: Any, on_connected: Any = None, on_request: Any = None) -> None:
        self.connected = threading.Event()
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def start(self) -> None:
        self.connected.set()

    def stop(self) -> None:
        self.connected.clear()

    def publish(self, kind: str, body: dict[str, Any], qos: int = 1, retain: bool = False) -> bool:
        self.sent.append((kind, body))
        return True


def test_mqtt_is_installed_on_both_sides_and_meets_the_protocols(tmp_path: Path) -> None:
    from edge_agent.mqtt import AgentLink
    from packager.fleet import MQTTControllerLink

    assert {"mqtt", "mqtts"} <= set(transport_names()) and {"mqtt", "mqtts"} <= set(transport_names(CONTROLLER_GROUP))
    assert device_transport("mqtts://broker:8883") is AgentLink
    assert controller_transport("mqtt://127.0.0.1:1883") is MQTTControllerLink
    config = parse_agent_config({"device_id": "pi-1", "broker": "mqtt://127.0.0.1:1", "data_dir": "d"}, base=tmp_path)
    assert isinstance(AgentLink(config, lambda message: None), DeviceTransport)
    assert all(hasattr(MQTTControllerLink, name) for name in ("settle", "wait_change", "publish_desired",
                                                                "publish_request", "on_response", "close"))


def test_an_unknown_scheme_is_one_clear_error_on_both_sides(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"no fleet transport named .pigeon. is installed \(installed: mqtt, mqtts"):
        device_transport("pigeon://loft")
    with pytest.raises(ValidationError, match="broker: no fleet transport for pigeon:// URLs"):
        parse_agent_config({"device_id": "pi-1", "broker": "pigeon://loft", "data_dir": "d"}, base=tmp_path)
    from packager.fleet import FleetController

    with pytest.raises(UsageError, match="no fleet transport"):
        FleetController("pigeon://loft").devices()


def test_a_new_transport_is_one_module_plus_one_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "site" / "edgedeploy_loop-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: edgedeploy-loop\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[edgedeploy.fleet_transports]\nloop = tests.test_transport:LoopTransport\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert "loop" in transport_names()
    config = parse_agent_config({"device_id": "pi-1", "broker": "loop://here", "data_dir": "d"}, base=tmp_path)
    link = device_transport(config.broker)(config, lambda message: None)
    assert isinstance(link, LoopTransport) and isinstance(link, DeviceTransport)
    link.start()
    assert link.publish("reported", {"device_id": "pi-1"}) and link.sent == [("reported", {"device_id": "pi-1"})]
