"""Operations over MQTT end to end: logs, run-time parameters, restarts, and the requests a device refuses.

One private Mosquitto and two real ``edge-agent`` processes serve the whole module (starting them
is most of its run time); an Azure ML-style entry script with ``configure(params)`` is rolled out
to both first. Each test leaves the parameters it set behind, so each one sets what it checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.bundle import BundleManifest
from edge_agent.errors import NotFoundError, UnavailableError, ValidationError
from edge_agent.fleet_messages import OperationRequest, encode_message, topic
from edge_agent.orders import sign_order
from edge_agent.profiles import load_profile
from edge_agent.tensors import TensorSpec
from edge_agent.timezones import utc_offset_min
from packager.bundle import write_bundle
from packager.bundle_server import BundleServer
from packager.fleet import FleetController
from packager.fleet_ops import FleetOps
from packager.keys import SigningKey, export_public_key, generate_key, load_order_key, load_signing_key
from tests.e2e.conftest import MOSQUITTO, ROOT, Agent, Broker, make_agent

pytestmark = pytest.mark.e2e

DEVICES = ("ops-1", "ops-2")
ZONE = "America/St_Johns"  # an offset of -150 or -210 minutes: not a whole hour, never this machine's
WAIT = 60.0  # seconds a device may take to answer on two loaded cores (the CLI's default is 10)
SCORE = b'''import json
import os
import uuid

weights = None
params = {"scale": 1.0}
instance = None


def init():
    global weights, instance
    with open(os.path.join(os.environ["AZUREML_MODEL_DIR"], "weights.json")) as handle:
        weights = json.load(handle)
    instance = uuid.uuid4().hex


def configure(new):
    if not isinstance(new.get("scale", 1.0), (int, float)):
        raise ValueError("scale must be a number")
    params.clear()
    params.update({"scale": 1.0, **new})


def run(raw_data):
    rows = json.loads(raw_data)["data"]
    total = [sum(row) * weights["w"] * params["scale"] for row in rows]
    return {"total": total, "params": dict(params), "instance": instance}
'''


@dataclass
class Fleet:
    broker: Broker
    home: Path
    agents: dict[str, Agent]
    controller: FleetController

    @property
    def ops(self) -> FleetOps:
        return self.controller.operations()

    def reported(self, device_id: str) -> dict[str, Any]:
        link = self.controller._connect()
        with link.changed:
            return dict(link.reported.get(device_id) or {})

    def wait_reported(self, device_id: str, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + 90
        while not check(report := self.reported(device_id)):
            assert time.monotonic() < deadline, f"no report of {device_id} matched; latest: {report}"
            self.controller._connect().wait_change(0.5)
        return report

    def score(self, device_id: str) -> dict[str, Any]:
        port = self.reported(device_id)["http_port"]
        request = urllib.request.Request(f"http://127.0.0.1:{port}/score", data=b'{"data": [[1.0, 2.0]]}',
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return dict(json.loads(response.read()))

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, EDGEDEPLOY_HOME=str(self.home), EDGEDEPLOY_BROKER=self.broker.url)
        wait = [] if "--timeout" in args else ["--timeout", str(WAIT)]
        return subprocess.run([sys.executable, "-m", "packager.cli.main", "fleet", *args, *wait],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=180)


def scorer_bundle(out: Path, key: SigningKey) -> Path:
    manifest = BundleManifest(
        model={"name": "scorer", "version": 1}, profile=load_profile("cpu-x86_64").to_dict(),
        runtime={"backend": "entry-script", "model_path": "model/weights.json", "precision": "fp32",
                 "execution_providers": ["CPUExecutionProvider"], "optimization_level": "basic"},
        inputs=[TensorSpec("data", "FP32", (-1, 2))], outputs=[],
        entry_script={"script": "src/score.py", "source_dir": "src", "requirements": None},
        samples={"input": "samples/input.json", "output": None})
    write_bundle(out, manifest, {"src/score.py": SCORE, "model/weights.json": b'{"w": 2.0}',
                                 "samples/input.json": b'{"data": [[1.0, 2.0]]}'}, key)
    return out


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed")
    root = tmp_path_factory.mktemp("fleet-ops")
    home = root / "home"
    key = generate_key(home=home)
    export_public_key(root / "publisher.pub", home=home)
    (root / "broker").mkdir()
    broker = Broker(root / "broker")
    broker.start()
    agents: dict[str, Agent] = {}
    server = BundleServer(home=home)
    server.start()
    controller = FleetController(broker.url, home=home)
    try:
        for device_id in DEVICES:
            agents[device_id] = make_agent(root, device_id, broker.url, root / "publisher.pub", ["ops"],
                                           timezone=ZONE)
            agents[device_id].start()
        made = Fleet(broker, home, agents, controller)
        for device_id in DEVICES:
            made.wait_reported(device_id, lambda r: r.get("http_port", 0) > 0)
        rollout = controller.rollout(scorer_bundle(root / "scorer.edb", key), "group:ops", server.url, canary=0,
                                     wave="2", wait=True)
        assert controller.status(rollout, advance=False)["state"] == "succeeded"
        yield made
    finally:
        controller.close()
        for agent in agents.values():
            agent.kill()
        server.stop()
        broker.stop()


class Wire:
    """A client on the broker as anyone with broker access: publishes requests, records what devices send."""

    def __init__(self, port: int, device_id: str) -> None:
        self.device_id = device_id
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.changed = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="wire", protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        for kind in ("responses", "events"):
            self.client.subscribe(topic(device_id, kind), qos=1)
        self.send_and_wait({"request_id": "q-subscribed", "device_id": device_id}, lambda kind, m: kind == "events"
                           and m.get("request_id") == "q-subscribed")  # an unsigned one: the event says we listen

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self.changed:
            self.messages.append((message.topic.rsplit("/", 1)[-1], json.loads(message.payload)))
            self.changed.notify_all()

    def publish(self, message: dict[str, Any]) -> None:
        payload = encode_message("requests", {"op": "get-config", "model": "scorer", **message})
        self.client.publish(topic(self.device_id, "requests"), payload, qos=1).wait_for_publish(10)

    def send_and_wait(self, message: dict[str, Any], check: Callable[[str, dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + 60
        while True:  # the first request may go out before the broker took our subscription: send again
            self.publish(message)
            with self.changed:
                if self.changed.wait_for(lambda: any(check(k, m) for k, m in self.messages), 5):
                    return next(m for k, m in self.messages if check(k, m))
            assert time.monotonic() < deadline, f"nothing matched; got {self.messages}"

    def wait(self, check: Callable[[str, dict[str, Any]], bool]) -> dict[str, Any]:
        with self.changed:
            assert self.changed.wait_for(lambda: any(check(k, m) for k, m in self.messages), 60), self.messages
            return next(m for k, m in self.messages if check(k, m))

    def responses(self, request_id: str) -> list[dict[str, Any]]:
        with self.changed:
            return [m for k, m in self.messages if k == "responses" and m["request_id"] == request_id]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def request(device_id: str, request_id: str, key: SigningKey | None, expires_in: float = 60.0,
            **fields: Any) -> dict[str, Any]:
    """A request as the controller sends it (``key=None``: unsigned), with ``fields`` overriding."""
    body = OperationRequest(request_id, fields.pop("op", "config"), device_id, time.time() + expires_in,
                            fields.pop("model", "scorer"), fields.pop("args", {})).to_body()
    message = {"schema": 2, **body, **fields}
    return sign_order(message, key) if key is not None else message


def test_logs_return_the_agents_recent_lines(fleet: Fleet) -> None:
    lines = fleet.ops.logs("ops-1", tail=2000, timeout=WAIT)
    assert any("connected to mqtt://127.0.0.1" in line for line in lines), lines[-20:]
    assert any("scorer deployment" in line and "-> active" in line for line in lines)
    result = fleet.cli("logs", "ops-1", "--tail", "3")
    assert result.returncode == 0, result.stderr
    printed = result.stdout.splitlines()
    assert len(printed) == 3 and all(" INFO " in line or " WARNING " in line for line in printed), printed
    with pytest.raises(ValidationError, match="ops-1: logs: 'tail' must be a whole number from 1 to 2000"):
        fleet.ops.logs("ops-1", tail=5000, timeout=WAIT)


def test_config_reaches_configure_is_reported_and_survives_an_agent_restart(fleet: Fleet) -> None:
    assert fleet.score("ops-1")["total"] == [6.0]  # (1 + 2) * w 2.0 * scale 1.0
    result = fleet.cli("config", "ops-1", "scorer", "scale=3", "label=fast", "limits=[1,2]")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ops-1: scorer {") and '"scale": 3' in result.stdout
    answer = fleet.score("ops-1")
    assert answer["total"] == [18.0] and answer["params"]["label"] == "fast" and answer["params"]["limits"] == [1, 2]
    report = fleet.wait_reported("ops-1", lambda r: (r["models"]["scorer"].get("params") or {}).get("scale") == 3)
    assert report["models"]["scorer"]["params"] == {"scale": 3, "label": "fast", "limits": [1, 2]}
    assert report["timezone"] == ZONE and report["utc_offset_min"] == utc_offset_min(ZONE)

    shown = fleet.cli("config", "ops-1", "scorer")
    assert shown.returncode == 0 and json.loads(shown.stdout) == {"scale": 3, "label": "fast", "limits": [1, 2]}

    refused = fleet.cli("config", "ops-1", "scorer", "scale=abc")  # not JSON: the string "abc"
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("error: ops-1: configure() refused the parameters: ValueError: scale must be")
    assert fleet.score("ops-1")["total"] == [18.0]  # the old parameters stay, in the script and on record
    assert fleet.ops.get_config("ops-1", "scorer", timeout=WAIT) == {"scale": 3, "label": "fast", "limits": [1, 2]}

    assert fleet.ops.configure("ops-1", "scorer", {"label": None, "limits": None}, WAIT)["params"] == {"scale": 3}
    agent = fleet.agents["ops-1"]
    agent.kill(15)  # SIGTERM: a clean stop
    started = time.time()
    agent.start()
    report = fleet.wait_reported("ops-1", lambda r: r["ts"] >= started and r["models"]["scorer"]["state"] == "active")
    assert report["models"]["scorer"]["params"] == {"scale": 3}
    answer = fleet.score("ops-1")
    assert answer["total"] == [18.0] and answer["params"] == {"scale": 3}  # configure() ran at load


def test_restart_keeps_the_model_serving(fleet: Fleet) -> None:
    fleet.ops.configure("ops-2", "scorer", {"scale": 2}, WAIT)
    before = fleet.score("ops-2")
    answers: list[dict[str, Any]] = []
    failures: list[BaseException] = []
    done = threading.Event()

    def hammer() -> None:
        while not done.is_set() or not answers:
            try:
                answers.append(fleet.score("ops-2"))
            except Exception as exc:  # noqa: BLE001 - every failure is recorded and fails the test
                failures.append(exc)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        result = fleet.cli("restart", "ops-2", "scorer")
    finally:
        done.set()
        thread.join(60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ops-2: scorer restarted (version 1)"
    assert not failures and answers
    after = fleet.score("ops-2")
    assert after["instance"] != before["instance"] and after["total"] == [12.0]  # a new instance, same params
    assert {a["total"][0] for a in answers} == {12.0}


def test_requests_the_device_must_not_run_are_refused_and_change_nothing(fleet: Fleet) -> None:
    controller, publisher = load_order_key(fleet.home), load_signing_key(home=fleet.home)  # the device trusts both
    fleet.ops.configure("ops-1", "scorer", {"scale": 4}, WAIT)
    last_seq = fleet.reported("ops-1")["last_seq"]
    wire = Wire(fleet.broker.port, "ops-1")
    try:
        ignored = {
            "q-unsigned": request("ops-1", "q-unsigned", None, args={"params": {"scale": 99}}),
            "q-publisher": request("ops-1", "q-publisher", publisher, args={"params": {"scale": 99}}),
            "q-elsewhere": request("ops-2", "q-elsewhere", controller, args={"params": {"scale": 99}}),
            "q-altered": {**request("ops-1", "q-altered", controller, args={"params": {"scale": 1}}),
                          "args": {"params": {"scale": 99}}},
        }
        for request_id, message in ignored.items():
            wire.publish(message)
            event = wire.wait(lambda k, m, rid=request_id: k == "events" and m.get("request_id") == rid)
            assert event["to"] == "refused" and event["reason"].startswith(f"ignored request {request_id}")
        first = request("ops-1", "q-first", controller, args={"params": {"scale": 5}})
        wire.publish(first)
        assert wire.wait(lambda k, m: k == "responses" and m["request_id"] == "q-first")["ok"] is True
        wire.publish(request("ops-1", "q-second", controller, args={"params": {"scale": 6}}))
        assert wire.wait(lambda k, m: k == "responses" and m["request_id"] == "q-second")["ok"] is True
        refused = {"q-first": (first, "replayed"),
                   "q-expired": (request("ops-1", "q-expired", controller, expires_in=-5,
                                         args={"params": {"scale": 99}}), "expired"),
                   "q-op": (request("ops-1", "q-op", controller, op="format-disk"), "unknown operation")}
        for request_id, (message, reason) in refused.items():
            wire.publish(message)
            answer = wire.wait(lambda k, m, rid=request_id: k == "responses" and m["request_id"] == rid
                               and m["ok"] is False)
            assert reason in answer["error"] and answer["error_type"] == "invalid"
        for request_id in ignored:
            assert wire.responses(request_id) == []  # answered after them, so theirs would be here by now
    finally:
        wire.close()
    assert fleet.ops.get_config("ops-1", "scorer", WAIT) == {"scale": 6}
    assert fleet.score("ops-1")["total"] == [36.0]
    assert fleet.reported("ops-1")["last_seq"] == last_seq  # requests never touch the order sequence


def test_unknown_model_and_offline_device_are_one_clear_error(fleet: Fleet) -> None:
    with pytest.raises(NotFoundError, match=r"ops-1: no model named 'nosuch' on this device \(models: scorer\)"):
        fleet.ops.restart("ops-1", "nosuch", WAIT)
    result = fleet.cli("config", "ops-1", "nosuch", "k=1")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "error: ops-1: no model named 'nosuch' on this device (models: scorer)\n"
    offline = fleet.cli("logs", "ghost-9", "--timeout", "1.5")
    assert offline.returncode == 1
    assert offline.stderr == "error: device ghost-9 did not answer within 1.5 s; is it online?\n"
    with pytest.raises(UnavailableError, match="device ghost-9 did not answer within 0.5 s"):
        fleet.ops.get_config("ghost-9", "scorer", timeout=0.5)


def test_a_selector_fans_out_with_a_line_per_device(fleet: Fleet) -> None:
    result = fleet.cli("config", "group:ops", "scorer", "mode=batch")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["ops-1", "ops-2"]
    assert all('"mode": "batch"' in line for line in lines)
    assert {fleet.score(d)["params"]["mode"] for d in DEVICES} == {"batch"}
    nobody = fleet.cli("config", "group:nobody", "scorer", "mode=x")
    assert nobody.returncode == 1 and nobody.stderr == (
        "error: no online device matches 'group:nobody'; see `edgedeploy fleet devices`\n")
