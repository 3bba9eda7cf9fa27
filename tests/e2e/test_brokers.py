"""The fleet flow (rollout, telemetry, last will) against every real broker these machines run.

- Mosquitto: MQTT 5.
- RabbitMQ's MQTT plugin (3.10, as Debian ships it): it closes the connection on an MQTT 5 CONNECT
  without a CONNACK; agent and controller fall back to 3.1.1. The fixture enables the plugin on a
  free loopback port (the default 1883 is Mosquitto's) and starts RabbitMQ when it is not running.
- amqtt (embedded, 3.1.1 only): it leaves an MQTT 5 CONNECT unanswered; both sides fall back too.

RabbitMQ is shared by the machine, so each test uses its own topic prefix and device id, and
deletes the queues its persistent sessions left behind.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from packager.examples import DigitsData
from packager.fleet import FleetController
from packager.keys import SigningKey
from tests.e2e.conftest import MOSQUITTO, Agent, Broker, BundleServerProcess, free_port, stop_process, wait_port
from tests.servers import digits_bundle, post_json

RABBITMQ_CONF = Path("/etc/rabbitmq/rabbitmq.conf")


def _rabbit(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)


def _rabbitmq_mqtt_port() -> int | None:
    """The port RabbitMQ's running MQTT listener is on, or None when the plugin is not running."""
    listeners = _rabbit("rabbitmq-diagnostics", "-q", "listeners").stdout
    match = re.search(r"port: (\d+), protocol: mqtt\b", listeners)
    return int(match.group(1)) if match else None


def _configure_listener() -> int:
    """Put the MQTT listener on a free loopback port in rabbitmq.conf (read when the node boots)."""
    port = free_port()
    lines = [line for line in (RABBITMQ_CONF.read_text().splitlines() if RABBITMQ_CONF.exists() else [])
             if not line.startswith("mqtt.listeners.tcp.")]
    RABBITMQ_CONF.write_text("\n".join([*lines, f"mqtt.listeners.tcp.default = 127.0.0.1:{port}"]) + "\n")
    return port


def _ensure_rabbitmq_running() -> None:
    if _rabbit("rabbitmq-diagnostics", "-q", "ping", timeout=30).returncode == 0:
        return
    _configure_listener()  # the plugin may be enabled already: it must not go for 1883 at boot
    # no pipes: the detached node would hold them open for as long as it runs
    subprocess.run(["rabbitmq-server", "-detached"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=60, check=False)
    deadline = time.monotonic() + 120
    while _rabbit("rabbitmq-diagnostics", "-q", "ping", timeout=30).returncode != 0:
        assert time.monotonic() < deadline, "RabbitMQ did not start (see /var/log/rabbitmq)"
        time.sleep(1)
    _rabbit("rabbitmqctl", "await_startup")


def _enable_rabbitmq_mqtt() -> int:
    """Enable the MQTT plugin on a free loopback port, now and (in rabbitmq.conf) after a restart."""
    port = _configure_listener()
    # The running node read its config at boot: give the plugin its listener before it starts
    # (persistent: the setting survives the plugin's application being loaded).
    setting = _rabbit("rabbitmqctl", "eval", "application:set_env(rabbitmq_mqtt, tcp_listeners, "
                      f'[{{"127.0.0.1", {port}}}], [{{persistent, true}}]).')
    assert setting.returncode == 0, setting.stderr
    enabled = _rabbit("rabbitmq-plugins", "enable", "rabbitmq_mqtt")
    assert enabled.returncode == 0, enabled.stderr + enabled.stdout
    return port


@pytest.fixture(scope="session")
def rabbitmq_mqtt_port() -> int:
    """RabbitMQ's MQTT listener, set up from a machine where RabbitMQ may be stopped and the plugin off."""
    if not shutil.which("rabbitmq-server") and not Path("/usr/sbin/rabbitmq-server").exists():
        pytest.skip("RabbitMQ is not installed (apt-get install rabbitmq-server)")
    _ensure_rabbitmq_running()
    port = _rabbitmq_mqtt_port() or _enable_rabbitmq_mqtt()
    wait_port(port, timeout=30)
    return port


def _delete_rabbitmq_queues(token: str) -> None:
    """Persistent MQTT sessions are durable queues: drop the ones this test made."""
    names = _rabbit("rabbitmqctl", "-q", "list_queues", "name").stdout.split()
    for name in (n for n in names if token in n):
        _rabbit("rabbitmqctl", "-q", "delete_queue", name)


@pytest.fixture
def amqtt_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    config = tmp_path / "amqtt.yaml"
    config.write_text(yaml.safe_dump({
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }))
    with open(tmp_path / "amqtt.log", "wb") as log:
        broker = subprocess.Popen([sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(config)],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        stop_process(broker)


@pytest.fixture(params=["mosquitto", "rabbitmq", "amqtt"])
def any_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(name, URL) of a running broker of each kind."""
    if request.param == "mosquitto":
        if not Path(MOSQUITTO).exists():
            pytest.skip("mosquitto is not installed")
        folder = tmp_path / "mosquitto"
        folder.mkdir()
        broker = Broker(folder)
        broker.start()
        try:
            yield "mosquitto", broker.url
        finally:
            broker.stop()
    elif request.param == "rabbitmq":
        yield "rabbitmq", f"mqtt://127.0.0.1:{request.getfixturevalue('rabbitmq_mqtt_port')}"
    else:
        yield "amqtt", request.getfixturevalue("amqtt_url")


class TelemetryWatcher:
    """A plain 3.1.1 subscriber (every broker takes it) to one device's telemetry."""

    def __init__(self, url: str, prefix: str, device_id: str) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.samples: list[dict[str, Any]] = []
        self.arrived = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{secrets.token_hex(4)}",
                                  protocol=paho.MQTTv311)
        wanted = f"{prefix}/devices/{device_id}/telemetry"
        self.client.on_connect = lambda client, *_: client.subscribe(wanted, qos=0)
        self.client.on_message = self._on_message
        self.client.connect(host, int(port))
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self.samples.append(json.loads(message.payload))
        self.arrived.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _wait_online(controller: FleetController, online: bool, agent: Agent, timeout: float = 40) -> None:
    deadline = time.monotonic() + timeout
    while not any(d["online"] is online for d in controller.devices()):
        assert time.monotonic() < deadline, agent.log.read_text()[-3000:]
        controller._connect().wait_change(0.3)


def test_rollout_telemetry_and_last_will_on_every_broker(
    any_broker: tuple[str, str], bundle_server: BundleServerProcess, trusted_key_file: Path, digits_mlp: Path,
    digits: DigitsData, signing_key: SigningKey, tmp_path: Path,
) -> None:
    name, url = any_broker
    token = secrets.token_hex(4)
    device_id, prefix = f"{name}-{token}", f"t{token}"
    folder = tmp_path / "agent"
    folder.mkdir()
    config = folder / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "device_id": device_id, "profile": "cpu-x86_64", "broker": url, "topic_prefix": prefix,
        "data_dir": str(folder / "data"), "trusted_keys": [str(trusted_key_file)], "http_port": 0, "grpc_port": 0,
        "telemetry_period_s": 0.5,
    }))
    agent = Agent(device_id, config, folder / "data", folder / "agent.log")
    # Connected first: RabbitMQ 3.10 sends no retained messages to a wildcard subscription, so the
    # controller learns of a device only from what it publishes after the controller subscribed.
    controller = FleetController(url, prefix=prefix)
    assert controller.devices() == []
    watcher = TelemetryWatcher(url, prefix, device_id)
    agent.start()
    try:
        _wait_online(controller, True, agent)
        assert ("using 3.1.1" in agent.log.read_text()) is (name != "mosquitto")
        rollout = controller.rollout(digits_bundle(digits_mlp, digits, tmp_path), "all", server_url=bundle_server.url,
                                     wait=True, wave_timeout=60)
        assert controller.status(rollout)["state"] == "succeeded", agent.log.read_text()[-3000:]
        device = controller.devices()[0]
        status, answer = post_json(f"http://127.0.0.1:{device['http_port']}/score",
                                   {"data": digits.x_test[:1].tolist()})
        assert status == 200 and answer["label"] == digits.y_test[:1].tolist()
        assert watcher.arrived.wait(20), "no telemetry arrived"
        assert watcher.samples[-1]["device_id"] == device_id
        agent.kill()  # SIGKILL: only the broker can say it is gone, with the device's last will
        _wait_online(controller, False, agent)
    finally:
        watcher.close()
        controller.close()
        agent.kill()
        if name == "rabbitmq":
            _delete_rabbitmq_queues(token)


def test_fleet_cli_takes_mqtt_version_before_and_after_the_action(rabbitmq_mqtt_port: int) -> None:
    """RabbitMQ 3.10 drops an MQTT 5 CONNECT: ``--mqtt-version 5`` is one clear error, 3.1.1 and auto work."""
    url = f"mqtt://127.0.0.1:{rabbitmq_mqtt_port}"
    prefix = ["--broker", url]

    def fleet(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "packager.cli.main", "fleet", *args], capture_output=True,
                              text=True, timeout=60, check=False)

    refused = fleet(*prefix, "devices", "--json", "--mqtt-version", "5")
    assert refused.returncode != 0 and refused.stderr.count("error:") == 1 and "MQTT 5" in refused.stderr
    assert "Traceback" not in refused.stderr
    for args in ((*prefix, "--mqtt-version", "3.1.1", "devices", "--json"), (*prefix, "devices", "--json")):
        listed = fleet(*args)
        assert listed.returncode == 0 and "error" not in listed.stderr.lower(), listed.stderr
        assert isinstance(json.loads(listed.stdout), list)
    bad = fleet(*prefix, "devices", "--mqtt-version", "4")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
