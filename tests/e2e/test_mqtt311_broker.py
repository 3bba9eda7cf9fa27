"""An MQTT 3.1.1-only broker (amqtt, which leaves an MQTT 5 CONNECT unanswered): agents fall back to
3.1.1 and a rollout still completes."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from packager.examples import DigitsData
from packager.fleet import FleetController
from packager.keys import SigningKey
from tests.e2e.conftest import Agent, BundleServerProcess, free_port, stop_process, wait_port
from tests.servers import digits_bundle, post_json


@pytest.fixture
def amqtt_broker(tmp_path: Path) -> Iterator[str]:
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


def test_agent_falls_back_to_mqtt311_and_takes_a_rollout(
    amqtt_broker: str, bundle_server: BundleServerProcess, trusted_key_file: Path, digits_mlp: Path,
    digits: DigitsData, signing_key: SigningKey, tmp_path: Path,
) -> None:
    folder = tmp_path / "agent"
    folder.mkdir()
    config = folder / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "device_id": "old-broker-01", "profile": "cpu-x86_64", "broker": amqtt_broker,
        "data_dir": str(folder / "data"), "trusted_keys": [str(trusted_key_file)], "http_port": 0, "grpc_port": 0,
    }))
    agent = Agent("old-broker-01", config, folder / "data", folder / "agent.log")
    agent.start()
    controller = FleetController(amqtt_broker)
    try:
        deadline = time.monotonic() + 30
        while not any(d["online"] for d in controller.devices()):
            assert time.monotonic() < deadline, agent.log.read_text()[-2000:]
            time.sleep(0.3)
        assert "using 3.1.1" in agent.log.read_text()
        rollout = controller.rollout(digits_bundle(digits_mlp, digits, tmp_path), "all", server_url=bundle_server.url,
                                     wait=True, wave_timeout=60)
        assert controller.status(rollout)["state"] == "succeeded"
        device = controller.devices()[0]
        body = {"data": digits.x_test[:1].tolist()}
        status, answer = post_json(f"http://127.0.0.1:{device['http_port']}/score", body)
        assert status == 200 and answer["label"] == digits.y_test[:1].tolist()
    finally:
        controller.close()
        agent.kill()
