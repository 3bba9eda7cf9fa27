"""The fleet simulator (bench/fleet_sim.py) against a real Mosquitto and the real fleet controller code.

The simulator stands in for thousands of agents in the scale bench and the control-plane tests,
so these tests hold it to the agent's side of the contract: the transitions and events an
``edge-agent`` reports, telemetry with the agent's fields, refused orders, per-version failures,
its own connections with last wills, reconnecting after a broker restart, and its command line.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from bench.fleet_sim import FleetSimulator
from bench.sim_devices import VersionBehaviour
from edge_agent.fleet_messages import DeviceReport, parse_message, topic
from edge_agent.metrics import ModelMetrics
from edge_agent.telemetry import sample
from edge_agent.trust import TrustStore
from packager.fleet import FleetController
from packager.keys import SigningKey, load_order_key
from tests.e2e.conftest import ROOT, Broker, stop_process
from tests.e2e.test_fleet import script_bundle

pytestmark = [pytest.mark.e2e, pytest.mark.soak]  # make soak: the simulator checked against the agent

NOWHERE = "http://127.0.0.1:1"  # simulated devices download nothing


class Observer:
    """Collects every message under edgedeploy/devices/ (parsed), as the controller would see it."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("edgedeploy/devices/#", 1)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        _, _, device_id, kind = message.topic.split("/")
        if message.payload:
            with self.lock:
                self.messages.append((device_id, kind, parse_message(kind, message.payload)))

    def of(self, device_id: str, kind: str) -> list[dict[str, Any]]:
        with self.lock:
            return [m for d, k, m in self.messages if d == device_id and k == kind]

    def wait(self, check: Any, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, "the expected messages never arrived"
            time.sleep(0.05)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def observer(mqtt_broker: Broker) -> Iterator[Observer]:
    watching = Observer(mqtt_broker.port)
    yield watching
    watching.close()


def controller_trust() -> TrustStore:
    return TrustStore([load_order_key().public_key])


def test_simulated_devices_report_what_an_agent_reports(mqtt_broker: Broker, observer: Observer,
                                                        signing_key: SigningKey, tmp_path: Path) -> None:
    v1 = script_bundle(tmp_path / "v1.edb", signing_key, 1)
    with FleetSimulator("127.0.0.1", mqtt_broker.port, 4, time_to_active=0.4, telemetry_period_s=0.5,
                        requests_per_s=200.0, groups=["sim"], tags={"site": ["milan", "rome"]},
                        trust=controller_trust()) as sim, FleetController(mqtt_broker.url) as ctl:
        rollout_id = ctl.rollout(v1, "tag:site=milan", NOWHERE, canary=1, wave="1", wait=True, wave_timeout=60)
        status = ctl.status(rollout_id)
        assert status["state"] == "succeeded" and status["succeeded"] == 2, status
        sha = status["bundle_sha256"]
        assert sim.active_count(sha) == 2 and sim.states("scorer") == {"active": 2, "idle": 2}
        rows = {row["device_id"]: row for row in ctl.devices()}
        assert rows["sim-00002"]["model_version"] == 1 and rows["sim-00002"]["tags"] == {"site": "milan"}
        assert rows["sim-00001"]["model"] is None and rows["sim-00001"]["groups"] == ["sim"]

        steps = [(e["from"], e["to"]) for e in observer.of("sim-00000", "events")]
        assert steps == [("idle", "downloading"), ("downloading", "verifying"), ("verifying", "installing"),
                         ("installing", "health-checking"), ("health-checking", "active")]
        reports = [DeviceReport.from_message(m) for m in observer.of("sim-00000", "reported")]
        assert [r.models["scorer"].state.value for r in reports if "scorer" in r.models] == [s for _, s in steps]
        assert reports[-1].models["scorer"].deployment_id == rollout_id and reports[-1].info["last_seq"] >= 0

        def served() -> list[dict[str, Any]]:
            return [m for m in observer.of("sim-00000", "telemetry") if m["models"].get("scorer", {}).get("requests")]

        observer.wait(lambda: served())
    telemetry = served()[-1]
    assert set(telemetry) == set(sample("dev", {}, {})) | {"schema"}  # the agent's fields, no more, no less
    scorer = telemetry["models"]["scorer"]
    assert set(scorer) == set(ModelMetrics().summary()) | {"version", "bundle_sha256"}
    assert scorer["version"] == 1 and scorer["bundle_sha256"] == sha and 9 <= scorer["p95_ms"] <= 11
    assert scorer["p50_ms"] < scorer["p95_ms"] < scorer["p99_ms"] and scorer["errors"] == 0
    assert not observer.of("sim-00001", "telemetry")[-1]["models"]  # nothing runs there
    assert observer.of("sim-00003", "status")[-1]["online"] is False  # stop() said goodbye


def test_a_failing_version_is_rolled_back_and_bad_orders_are_refused(mqtt_broker: Broker, observer: Observer,
                                                                     signing_key: SigningKey, tmp_path: Path) -> None:
    v1 = script_bundle(tmp_path / "v1.edb", signing_key, 1)
    v2 = script_bundle(tmp_path / "v2.edb", signing_key, 2)
    broken = {"2": VersionBehaviour(p95_ms=80.0, fail_share=1.0)}
    with FleetSimulator("127.0.0.1", mqtt_broker.port, 3, behaviour=broken, telemetry_period_s=None,
                        trust=controller_trust()) as sim, FleetController(mqtt_broker.url) as ctl:
        first = ctl.status(ctl.rollout(v1, "all", NOWHERE, canary=0, wave="100%", wait=True, wave_timeout=60))
        second = ctl.status(ctl.rollout(v2, "all", NOWHERE, canary=1, wave="1", wait=True, wave_timeout=60))
        assert first["succeeded"] == 3 and second["state"] == "rolled-back" and second["rolled_back"] == 1, second
        assert "simulated failure of version 2" in second["devices"]["sim-00000"]["error"]
        assert sim.wait_for(lambda: sim.active_count(first["bundle_sha256"]) == 3, 30)
        kept = [e for e in observer.of("sim-00000", "events") if e["to"] == "active"]
        assert kept[-1]["reason"] == "the ordered bundle is already active"

        with ctl._connect().changed:
            order = dict(ctl._connect().desired["sim-00000"])
        sneaked = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        sneaked.connect("127.0.0.1", mqtt_broker.port)
        sneaked.loop_start()
        for device_id, body in (("sim-00001", order), ("sim-00002", {**order, "seq": order["seq"] + 1})):
            sneaked.publish(topic(device_id, "desired"), json.dumps(body), qos=1).wait_for_publish(10)
        sneaked.disconnect()
        sneaked.loop_stop()
        assert sim.wait_for(lambda: sim.reported("sim-00002")["refused"] is not None, 30)
        assert "addressed to 'sim-00000'" in sim.reported("sim-00001")["refused"]
        assert "signature does not match" in sim.reported("sim-00002")["refused"]
        assert sim.active_count(first["bundle_sha256"]) == 3  # refused orders changed nothing
        observer.wait(lambda: any(e["to"] == "refused" for e in observer.of("sim-00002", "events")))


def test_own_connections_reconnect_after_a_broker_restart_and_late_devices_join(
        mqtt_broker: Broker, signing_key: SigningKey, tmp_path: Path) -> None:
    v1 = script_bundle(tmp_path / "v1.edb", signing_key, 1)
    with FleetSimulator("127.0.0.1", mqtt_broker.port, 3, connections=3, telemetry_period_s=None) as sim:
        mqtt_broker.restart(down_for=0.5)
        joined = sim.add_devices(2, groups=["late"], tags={"site": "turin"})
        assert joined == ["sim-00003", "sim-00004"]
        with FleetController(mqtt_broker.url) as ctl:
            deadline = time.monotonic() + 30
            while sum(d["online"] for d in ctl.devices()) < 5:
                assert time.monotonic() < deadline, ctl.devices()
                ctl._connect().wait_change(0.5)
            status = ctl.status(ctl.rollout(v1, "all", NOWHERE, canary=1, wave="2", wait=True, wave_timeout=60))
        assert status["state"] == "succeeded" and status["succeeded"] == 5, status
        assert sim.reported("sim-00004")["tags"] == {"site": "turin"}


def test_the_command_line_runs_until_killed_and_each_device_has_its_last_will(
        mqtt_broker: Broker, observer: Observer) -> None:
    command = [sys.executable, "-m", "bench.fleet_sim", "127.0.0.1", str(mqtt_broker.port), "2",
               "--connections", "2", "--id-prefix", "cli", "--tag", "site=a,b", "--progress", "0"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("ready 2 devices")
        assert observer.of("cli-00001", "reported")[-1]["tags"] == {"site": "b"}
        proc.send_signal(signal.SIGKILL)  # no goodbye: the broker publishes each device's will
        observer.wait(lambda: all(observer.of(d, "status")[-1]["online"] is False for d in ("cli-00000", "cli-00001")))
    finally:
        stop_process(proc)
    for args, code, words in ((["--tag", "oops"], 2, "--tag 'oops'"), ([], 1, "cannot reach the MQTT broker")):
        port = "1" if code == 1 else str(mqtt_broker.port)
        result = subprocess.run([sys.executable, "-m", "bench.fleet_sim", "127.0.0.1", port, "2", *args], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == code and result.stderr.startswith("error: ") and words in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
