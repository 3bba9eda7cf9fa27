"""Fleet rollouts end to end: a real Mosquitto, ``edgedeploy serve``, the controller and its CLI.

The first tests drive the controller against scripted devices that speak the MQTT contract of
``edge_agent.fleet_messages`` (they download the bundle from the real server and check its sha256),
which pins the controller's side; the tests after them run real ``edge-agent --config`` processes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edge_agent.bundle import BundleManifest
from edge_agent.fleet_messages import (
    BundleRef,
    DeployState,
    DeviceReport,
    ModelOrder,
    ModelReport,
    OrderAction,
    encode_message,
    parse_message,
    topic,
)
from edge_agent.orders import verify_order
from edge_agent.profiles import load_profile
from edge_agent.tensors import TensorSpec
from edge_agent.trust import TrustStore
from packager.bundle import write_bundle
from packager.fleet import FleetController
from packager.keys import SigningKey, load_order_key

pytestmark = pytest.mark.e2e

ENTRY_OK = b"def init():\n    pass\n\ndef run(data):\n    return {'version': %d}\n"
ENTRY_BAD = b"def init():\n    raise RuntimeError('this model cannot start')\n\ndef run(data):\n    return {}\n"


def script_bundle(out: Path, key: SigningKey, version: int, script: bytes = ENTRY_OK, name: str = "scorer") -> Path:
    """A small signed entry-script bundle; ENTRY_BAD's init() raises, so its health check fails."""
    manifest = BundleManifest(
        model={"name": name, "version": version},
        profile=load_profile("cpu-x86_64").to_dict(),
        runtime={"backend": "entry-script", "model_path": "model/params.json", "precision": "fp32",
                 "execution_providers": ["CPUExecutionProvider"], "optimization_level": "basic"},
        inputs=[TensorSpec("data", "FP32", (-1, 2))], outputs=[],
        entry_script={"script": "src/score.py", "source_dir": "src", "requirements": None},
        samples={"input": "samples/input.json", "output": None},
    )
    source = script % version if script is ENTRY_OK else script
    payload: dict[str, Path | bytes] = {"src/score.py": source, "model/params.json": b'{"v": %d}' % version,
                                        "samples/input.json": b'{"data": [[1.0, 2.0]]}'}
    write_bundle(out, manifest, payload, key)
    return out


def edgedeploy(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "packager.cli.main", *args], capture_output=True, text=True,
                            env=os.environ.copy(), timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


class ScriptedDevice:
    """A device at the MQTT protocol level: checks the order's signature, downloads what it is told,
    checks the sha256, reports per model.

    ``broken`` marks bundle sha256s this device fails to start (as a failed health check would).
    """

    def __init__(self, broker_port: int, device_id: str, groups: list[str], broken: set[str]) -> None:
        self.device_id, self.groups, self.broken = device_id, groups, broken
        self.models: dict[str, ModelReport] = {}
        self.controller = TrustStore([load_order_key().public_key])
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id)
        self.client.will_set(topic(device_id, "status"), encode_message("status", {"online": False}), 1, True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 1)
        self.client.connect("127.0.0.1", broker_port)
        self.client.loop_start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.publish(topic(self.device_id, "status"), encode_message("status", {"online": True}), 1, True)
        client.subscribe(topic(self.device_id, "desired"), 1)
        self.report()

    def report(self, model: ModelReport | None = None) -> None:
        if model is not None:
            self.models[model.name] = model
        body = DeviceReport(self.device_id, dict(self.models), time.time(), {"groups": self.groups, "tags": {}},
                            primary=model.name if model else next(iter(self.models), None)).to_body()
        self.client.publish(topic(self.device_id, "reported"), encode_message("reported", body), 1, True)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        desired = verify_order(parse_message("desired", message.payload), self.controller)
        assert desired.device_id == self.device_id
        # Work off the network thread, as a real agent does.
        for order in desired.models.values():
            threading.Thread(target=self._apply, args=(order,), daemon=True).start()

    def _apply(self, order: ModelOrder) -> None:
        current = self.models.get(order.name)
        active = current.active if current else None
        if order.action == OrderAction.REMOVE:
            self.report(ModelReport(order.name, DeployState.IDLE, order.deployment_id))
            return
        if active and active.bundle_sha256 == order.bundle_sha256:
            self.report(ModelReport(order.name, DeployState.ACTIVE, order.deployment_id, active=active))
            return
        with urllib.request.urlopen(order.bundle_url, timeout=10) as response:
            data = response.read()
        if hashlib.sha256(data).hexdigest() != order.bundle_sha256 or order.bundle_sha256 in self.broken:
            self.report(ModelReport(order.name, DeployState.FAILED, order.deployment_id, active=active,
                                    error="health check failed"))
            return
        ref = BundleRef(order.name, order.version, order.bundle_sha256, order.bundle_url, order.deployment_id)
        self.report(ModelReport(order.name, DeployState.ACTIVE, order.deployment_id, active=ref))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def scripted(mqtt_broker: Any) -> Iterator[Any]:
    made: list[ScriptedDevice] = []

    def make(n: int, broken: set[str] | None = None, groups: list[str] | None = None) -> list[ScriptedDevice]:
        devices = [ScriptedDevice(mqtt_broker.port, f"sim-{len(made) + i:03d}", groups or [], broken or set())
                   for i in range(n)]
        made.extend(devices)
        return devices

    yield make
    for device in made:
        device.close()


def test_rollout_in_waves_then_devices_list_the_new_bundle(mqtt_broker: Any, bundle_server: Any, scripted: Any,
                                                             signing_key: SigningKey, tmp_path: Path) -> None:
    scripted(8, groups=["kitchen"])
    scripted(2, groups=["garage"])
    bundle = script_bundle(tmp_path / "v1.edb", signing_key, 1)
    with FleetController(mqtt_broker.url) as ctl:
        rollout_id = ctl.rollout(bundle, "group:kitchen", bundle_server.url, canary=1, wave="3", wait=True,
                                 wave_timeout=60)
        status = ctl.status(rollout_id)
        devices = {d["device_id"]: d for d in ctl.devices()}
    assert status["state"] == "succeeded" and status["succeeded"] == 8 and status["failed"] == 0
    assert [len(w["devices"]) for w in status["waves"]] == [1, 3, 3, 1]
    sha = status["bundle_sha256"]
    assert sum(d["bundle_sha256"] == sha for d in devices.values()) == 8
    assert devices["sim-008"]["bundle_sha256"] is None  # garage was not selected
    listed = json.loads(edgedeploy("fleet", "--broker", mqtt_broker.url, "devices", "--json").stdout)
    assert {"device_id", "online", "model", "model_version", "bundle_sha256", "state", "last_seen"} <= set(listed[0])
    assert sum(d["model_version"] == 1 and d["online"] for d in listed) == 8


def test_a_failing_canary_halts_and_rolls_back(mqtt_broker: Any, bundle_server: Any, scripted: Any,
                                               signing_key: SigningKey, tmp_path: Path) -> None:
    good = script_bundle(tmp_path / "v1.edb", signing_key, 1)
    bad = script_bundle(tmp_path / "v2.edb", signing_key, 2, ENTRY_BAD)
    bad_sha = hashlib.sha256(bad.read_bytes()).hexdigest()
    scripted(6, broken={bad_sha})
    with FleetController(mqtt_broker.url) as ctl:
        first = ctl.rollout(good, "all", bundle_server.url, canary=0, wave="100%", wait=True, wave_timeout=60)
        assert ctl.status(first)["state"] == "succeeded"
        good_sha = ctl.status(first)["bundle_sha256"]
    result = edgedeploy("fleet", "--broker", mqtt_broker.url, "rollout", str(bad), "--to", "all", "--server",
                        bundle_server.url, "--canary", "2", "--wave", "2", "--wait", "--json", check=False)
    assert result.returncode == 1, result.stderr
    status = json.loads(result.stdout)
    assert status["state"] == "rolled-back" and status["rolled_back"] == 2 and status["pending"] == 4
    with FleetController(mqtt_broker.url) as ctl:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(d["bundle_sha256"] == good_sha and d["state"] == "active" for d in ctl.devices()):
                break
            ctl._connect().wait_change(0.5)
        assert all(d["bundle_sha256"] == good_sha for d in ctl.devices())


def test_a_rollout_survives_a_broker_restart_and_a_controller_restart(
        mqtt_broker: Any, bundle_server: Any, scripted: Any, signing_key: SigningKey, tmp_path: Path) -> None:
    scripted(6)
    bundle = script_bundle(tmp_path / "v1.edb", signing_key, 1)
    with FleetController(mqtt_broker.url) as ctl:
        rollout_id = ctl.rollout(bundle, "all", bundle_server.url, canary=1, wave="2", wave_timeout=60)
    mqtt_broker.restart(down_for=0.5)  # the controller process is gone too: only the plan file remains
    listed = json.loads(edgedeploy("fleet", "--broker", mqtt_broker.url, "status", "--json").stdout)
    assert [r["rollout_id"] for r in listed] == [rollout_id]
    with FleetController(mqtt_broker.url) as ctl:
        status = ctl.resume(rollout_id, timeout=90)
    assert status["state"] == "succeeded" and status["succeeded"] == 6


def test_abort_rolls_back_and_bad_input_is_one_error_line(mqtt_broker: Any, bundle_server: Any, scripted: Any,
                                                          signing_key: SigningKey, tmp_path: Path) -> None:
    scripted(3)
    bundle = script_bundle(tmp_path / "v1.edb", signing_key, 1)
    with FleetController(mqtt_broker.url) as ctl:
        rollout_id = ctl.rollout(bundle, "all", bundle_server.url, canary=1, wave="1", wave_timeout=60)
    edgedeploy("fleet", "--broker", mqtt_broker.url, "abort", rollout_id)
    shown = json.loads(edgedeploy("fleet", "--broker", mqtt_broker.url, "status", rollout_id, "--json").stdout)
    assert shown["state"] == "rolled-back" and shown["succeeded"] == 0
    for args in (["status", "r-nope"], ["rollout", str(tmp_path / "missing.edb"), "--to", "all"],
                 ["rollout", str(bundle), "--to", "device:ghost"], ["rollout", str(bundle), "--to", "nonsense"]):
        result = edgedeploy("fleet", "--broker", mqtt_broker.url, *args, check=False)
        assert result.returncode in (1, 2) and result.stderr.startswith("error: "), result.stderr
        assert "Traceback" not in result.stderr
    tampered = tmp_path / "tampered.edb"
    tampered.write_bytes(bundle.read_bytes()[:-40] + b"x" * 40)
    result = edgedeploy("fleet", "--broker", mqtt_broker.url, "rollout", str(tampered), "--to", "all", check=False)
    assert result.returncode == 1 and result.stderr.startswith("error: ")


HAVE_AGENT = importlib.util.find_spec("edge_agent.daemon") is not None
needs_agent = pytest.mark.skipif(not HAVE_AGENT, reason="edge_agent.daemon (edge-agent --config) is not built yet")


def wait_fleet(ctl: FleetController, ids: list[str], check: Any, timeout: float = 90.0) -> list[dict[str, Any]]:
    """Wait until ``check(row)`` holds for every device in ``ids``; returns the rows."""
    link = ctl._connect()
    deadline = time.monotonic() + timeout
    while True:
        rows = [d for d in ctl.devices() if d["device_id"] in ids]
        if len(rows) == len(ids) and all(check(r) for r in rows):
            return rows
        assert time.monotonic() < deadline, f"devices never got there: {rows}"
        link.wait_change(0.5)


def score(row: dict[str, Any], model: str | None = None) -> Any:
    """POST /score (or /v2/models/MODEL/score) on a device's REST port."""
    path = f"/v2/models/{model}/score" if model else "/score"
    request = urllib.request.Request(f"http://127.0.0.1:{row['http_port']}{path}", data=b'{"data": [[1.0, 2.0]]}',
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@needs_agent
def test_twenty_real_agents_waves_failed_health_check_and_tampered_bundle(
        mqtt_broker: Any, bundle_server: Any, agents: Any, signing_key: SigningKey, tmp_path: Path) -> None:
    from packager.bundle_server import publish_bundle

    fleet = agents(20)
    ids = [a.device_id for a in fleet]
    v1 = script_bundle(tmp_path / "v1.edb", signing_key, 1)
    with FleetController(mqtt_broker.url) as ctl:
        wait_fleet(ctl, ids, lambda r: r["online"], timeout=120)
        first = ctl.rollout(v1, "all", bundle_server.url, canary=1, wave="25%", wait=True, wave_timeout=120)
        status = ctl.status(first)
        assert status["state"] == "succeeded" and status["succeeded"] == 20, status
        assert [len(w["devices"]) for w in status["waves"]] == [1, 5, 5, 5, 4]
        rows = wait_fleet(ctl, ids, lambda r: r["state"] == "active" and r["model_version"] == 1)
        assert score(rows[7]) == {"version": 1}

        # A bundle whose init() raises: the canary fails its health check, the rollout stops there.
        bad = script_bundle(tmp_path / "v2.edb", signing_key, 2, ENTRY_BAD)
        second = ctl.rollout(bad, "all", bundle_server.url, canary=1, wave="25%", wait=True, wave_timeout=120)
        status = ctl.status(second)
        assert status["state"] == "rolled-back" and status["rolled_back"] == 1 and status["pending"] == 19
        rows = wait_fleet(ctl, ids, lambda r: r["state"] == "active" and r["model_version"] == 1)
        assert all(score(r) == {"version": 1} for r in rows[:3])

        # The store's copy is corrupted after publishing: the device refuses it and keeps serving v1.
        v3 = script_bundle(tmp_path / "v3.edb", signing_key, 3)
        sha, _ = publish_bundle(v3)
        stored = Path(os.environ["EDGEDEPLOY_HOME"]) / "bundles" / f"{sha}.edb"
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0xFF
        stored.write_bytes(bytes(data))
        third = ctl.rollout(v3, f"device:{ids[0]}", bundle_server.url, canary=1, wait=True, wave_timeout=120)
        assert ctl.status(third)["state"] == "rolled-back"
        row = wait_fleet(ctl, ids[:1], lambda r: r["state"] in ("active", "rolled-back", "failed"))[0]
        assert row["model_version"] == 1 and score(row) == {"version": 1}


@needs_agent
def test_broker_restart_and_an_agent_killed_mid_install(
        mqtt_broker: Any, bundle_server: Any, agents: Any, signing_key: SigningKey, tmp_path: Path) -> None:
    fleet = agents(4)
    ids = [a.device_id for a in fleet]
    v1 = script_bundle(tmp_path / "v1.edb", signing_key, 1)
    v2 = script_bundle(tmp_path / "v2.edb", signing_key, 2)
    with FleetController(mqtt_broker.url) as ctl:
        wait_fleet(ctl, ids, lambda r: r["online"], timeout=120)
        first = ctl.rollout(v1, "all", bundle_server.url, canary=0, wave="100%", wait=True, wave_timeout=120)
        assert ctl.status(first)["state"] == "succeeded"
        rollout_id = ctl.rollout(v2, "all", bundle_server.url, canary=1, wave="1", wave_timeout=120)
        victim = next(a for a in fleet if a.device_id == ctl.status(rollout_id)["waves"][0]["devices"][0])
        victim.kill()  # the canary was just ordered: it is downloading or installing v2
    mqtt_broker.restart(down_for=0.5)  # and the controller is gone: only its plan file remains
    victim.start()
    with FleetController(mqtt_broker.url) as ctl:
        status = ctl.resume(rollout_id, timeout=150)
        assert status["state"] in ("succeeded", "rolled-back"), status
        # Either the interrupted install finished (v2 everywhere) or the rollout stopped and every
        # device is back on v1; in both cases each device serves a whole, good bundle.
        expected = 2 if status["state"] == "succeeded" else 1
        rows = wait_fleet(ctl, ids, lambda r: r["state"] in ("active", "rolled-back", "failed")
                          and r["model_version"] == expected)
        assert all(score(r) == {"version": expected} for r in rows)


def served(row: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """model name -> (version, state) of a ``fleet devices`` row."""
    return {m["name"]: (m["version"], m["state"]) for m in row["models"]}


class Prober(threading.Thread):
    """Scores one model on some devices without pause; counts answers that are not the expected one."""

    def __init__(self, rows: list[dict[str, Any]], model: str, expected: Any) -> None:
        super().__init__(daemon=True)
        self.rows, self.model, self.expected = rows, model, expected
        self.done, self.answers, self.wrong = threading.Event(), 0, []

    def run(self) -> None:
        while not self.done.is_set():
            for row in self.rows:
                try:
                    answer = score(row, self.model)
                except OSError as exc:  # urllib's HTTPError and URLError are OSErrors
                    answer = repr(exc)
                self.answers += 1
                if answer != self.expected:
                    self.wrong.append(answer)

    def stop(self) -> None:
        self.done.set()
        self.join(30)


@needs_agent
def test_two_models_on_the_same_agents_roll_out_and_back_independently(
        mqtt_broker: Any, bundle_server: Any, agents: Any, signing_key: SigningKey, tmp_path: Path) -> None:
    fleet = agents(3)
    ids = [a.device_id for a in fleet]
    scorer = script_bundle(tmp_path / "scorer-1.edb", signing_key, 1)
    detector = {v: script_bundle(tmp_path / f"detector-{v}.edb", signing_key, v, name="detector") for v in (11, 12)}
    recognizer = script_bundle(tmp_path / "recognizer-1.edb", signing_key, 21, name="recognizer")
    with FleetController(mqtt_broker.url) as ctl:
        wait_fleet(ctl, ids, lambda r: r["online"], timeout=120)
        for bundle in (scorer, detector[11]):
            rollout_id = ctl.rollout(bundle, "all", bundle_server.url, canary=0, wave="100%", wait=True,
                                     wave_timeout=120)
            assert ctl.status(rollout_id)["state"] == "succeeded"
        rows = wait_fleet(ctl, ids, lambda r: served(r) == {"scorer": (1, "active"), "detector": (11, "active")})
        assert all(score(r, "scorer") == {"version": 1} and score(r, "detector") == {"version": 11} for r in rows)

        probe = Prober(rows, "scorer", {"version": 1})  # the scorer must answer v1 through all that follows
        probe.start()
        try:
            upgrade = ctl.rollout(detector[12], "all", bundle_server.url, canary=0, wave="100%", wave_timeout=120)
            wait_fleet(ctl, ids, lambda r: served(r)["detector"] == (12, "active"))
            edgedeploy("fleet", "--broker", mqtt_broker.url, "abort", upgrade)  # detector back to 11, per model
            rows = wait_fleet(ctl, ids, lambda r: served(r) == {"scorer": (1, "active"), "detector": (11, "active")})
            assert all(score(r, "detector") == {"version": 11} for r in rows)

            # A model new to one device, aborted: it is removed there and nothing else moves.
            extra = ctl.rollout(recognizer, f"device:{ids[0]}", bundle_server.url, canary=0, wave_timeout=120)
            wait_fleet(ctl, ids[:1], lambda r: served(r).get("recognizer") == (21, "active"))
            ctl.abort(extra)
            wait_fleet(ctl, ids[:1], lambda r: served(r).get("recognizer") == (None, "idle"))
        finally:
            probe.stop()
        assert probe.answers > 20 and probe.wrong == [], probe.wrong[:3]
        rows = wait_fleet(ctl, ids, lambda r: served(r)["detector"] == (11, "active"))
        assert all(score(r, "scorer") == {"version": 1} for r in rows)
    listed = json.loads(edgedeploy("fleet", "--broker", mqtt_broker.url, "devices", "--json").stdout)
    mine = {row["device_id"]: row for row in listed}
    assert {m["name"] for m in mine[ids[1]]["models"]} == {"scorer", "detector"}
    assert {"name", "version", "bundle_sha256", "state"} <= set(mine[ids[1]]["models"][0])
    assert mine[ids[1]]["model"] in ("scorer", "detector") and mine[ids[1]]["state"] == "active"
