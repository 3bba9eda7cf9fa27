"""The real agent daemon against a private Mosquitto: online/LWT, reported state, garbage, installs."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.bundle import bundle_sha256
from edge_agent.daemon import outputs_match
from edge_agent.fleet_messages import MAX_MESSAGE_BYTES, encode_message, topic
from edge_agent.orders import sign_order
from packager.keys import SigningKey, export_public_key, generate_key, load_order_key
from packager.targets.base import free_port
from tests.servers import dripping_server
from tests.test_store import script_bundle

ROOT = Path(__file__).resolve().parents[1]
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
BAD_INIT = b"def init():\n    raise RuntimeError('this model cannot start')\n\ndef run(data):\n    return {}\n"
DEVICE = "dev-mqtt-1"



def start_mosquitto(folder: Path, port: int, persistent: bool = False, settings: str = "") -> subprocess.Popen:
    """A private mosquitto on ``port``, accepting connections when this returns.

    ``persistent`` keeps sessions (and queued QoS 0 messages for them) across restarts.
    """
    conf = folder / f"mosquitto-{port}.conf"
    extra = (f"persistence true\npersistence_location {folder}/\nqueue_qos0_messages true\n"
             if persistent else "")
    conf.write_text(f"listener {port} 127.0.0.1\n{settings or 'allow_anonymous true'}\n{extra}")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(10)
            pytest.fail(f"mosquitto did not start with {conf.read_text()!r}")
        time.sleep(0.05)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[int]:
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed")
    port = free_port()
    proc = start_mosquitto(tmp_path, port)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def bundle_http(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    folder = tmp_path / "served"
    folder.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class Observer:
    """A controller-side client recording the device's messages."""

    def __init__(self, port: int, persistent: bool = False, auth: tuple[str, str] | None = None) -> None:
        self.latest: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.seen_telemetry: list[dict[str, Any]] = []
        self.changed = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="observer", protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        if auth:
            self.client.username_pw_set(*auth)
        self.client.on_connect = lambda client, *_: client.subscribe(f"edgedeploy/devices/{DEVICE}/#", qos=1)
        self.client.reconnect_delay_set(1, 1)
        self.ready = threading.Event()  # set when the broker acknowledged our subscription
        self.client.on_subscribe = lambda *_: self.ready.set()
        properties = None
        if persistent:  # the broker keeps our subscription and queues messages while we are away
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 600
        self.client.connect("127.0.0.1", port, clean_start=not persistent, properties=properties)
        self.subscribed = self.client.subscribe(f"edgedeploy/devices/{DEVICE}/#", qos=1)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        kind = message.topic.rsplit("/", 1)[-1]
        if kind == "desired" or not message.payload:
            return
        body = json.loads(message.payload)
        with self.changed:
            self.latest[kind] = body
            if kind == "events":
                self.events.append(body)
            if kind == "telemetry":
                self.seen_telemetry.append(body)
            self.changed.notify_all()

    def wait(self, kind: str, check: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
        with self.changed:
            ok = self.changed.wait_for(lambda: kind in self.latest and check(self.latest[kind]), timeout)
            assert ok, f"no {kind} message matched; latest: {self.latest.get(kind)}"
            return self.latest[kind]

    def desire(self, payload: bytes) -> None:
        self.client.publish(topic(DEVICE, "desired"), payload, qos=1, retain=True).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def signed(body: dict[str, Any], device_id: str = DEVICE, seq: int | None = None, expires_in: float = 3600.0,
           key: SigningKey | None = None, schema: int = 1) -> bytes:
    """A desired message as the controller sends it: addressed, numbered, expiring and signed."""
    message = {"schema": schema, **body, "device_id": device_id, "seq": time.time_ns() if seq is None else seq,
               "expires": time.time() + expires_in}
    return encode_message("desired", sign_order(message, key or load_order_key()))


def order_body(bundle: Path, folder: Path, base: str, version: int, deployment_id: str,
               name: str = "scorer") -> dict[str, Any]:
    sha = bundle_sha256(bundle)
    shutil.copy(bundle, folder / f"{sha}.edb")
    return {"deployment_id": deployment_id, "bundle_url": f"{base}/{sha}.edb", "bundle_sha256": sha,
            "model": {"name": name, "version": version}, "allow_downgrade": False, "rollout_id": None}


def order(bundle: Path, folder: Path, base: str, version: int, deployment_id: str, name: str = "scorer") -> bytes:
    """A signed schema-1 (single model) order, as controllers before schema 2 sent them, now signed."""
    return signed(order_body(bundle, folder, base, version, deployment_id, name))


def _stop(agent: subprocess.Popen, observer: Observer) -> None:
    """Kill the agent a test started (if it still runs) and close the test's broker client."""
    if agent.poll() is None:
        agent.kill()
        agent.wait(10)
    observer.close()


def score(port: int) -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/score", data=b'{"data": [[1.0, 2.0]]}',
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def start_agent(config: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as sink:
        return subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "--config", str(config)],
                                stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)


def test_agent_online_garbage_install_failed_health_lwt_and_restart(
        broker: int, bundle_http: tuple[Path, str], signing_key: SigningKey, tmp_path: Path) -> None:
    folder, base = bundle_http
    export_public_key(tmp_path / "publisher.pub")
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "device_id": DEVICE, "profile": "cpu-x86_64", "groups": ["kitchen"], "tags": {"site": "milan"},
        "broker": f"mqtt://127.0.0.1:{broker}", "data_dir": str(tmp_path / "data"),
        "trusted_keys": [str(tmp_path / "publisher.pub")], "http_port": 0, "grpc_port": 0,
        "telemetry_period_s": 0.5}))
    log = tmp_path / "agent.log"
    observer = Observer(broker)
    agent = start_agent(config, log)
    try:
        assert observer.wait("status", lambda m: m["online"] is True)["schema"] == 2
        report = observer.wait("reported", lambda m: m["http_port"] > 0)
        assert report["state"] == "idle" and report["active"] is None and report["groups"] == ["kitchen"]
        assert report["grpc_port"] > 0 and report["tags"] == {"site": "milan"}

        for garbage in (b"not json", b"{" * 300_000, json.dumps({"schema": 9}).encode(),
                        json.dumps({"schema": 1, "deployment_id": "x"}).encode()):
            observer.desire(garbage)
        v1 = script_bundle(tmp_path / "v1.edb", signing_key, 1)
        observer.desire(order(v1, folder, base, 1, "d-1"))
        report = observer.wait("reported", lambda m: m["state"] == "active", timeout=90)
        assert agent.poll() is None  # the garbage did not stop it
        assert report["active"]["bundle_sha256"] == bundle_sha256(v1) and report["active"]["version"] == 1
        assert score(report["http_port"]) == {"version": 1}
        assert [e["to"] for e in observer.events if e["deployment_id"] == "d-1"] == [
            "downloading", "verifying", "installing", "health-checking", "active"]
        observer.wait("telemetry", lambda m: "scorer" in m["models"] and m["memory_rss_mb"] > 0)

        bad = script_bundle(tmp_path / "v2.edb", signing_key, 2, BAD_INIT)
        observer.desire(order(bad, folder, base, 2, "d-2"))
        report = observer.wait("reported", lambda m: m["deployment_id"] == "d-2" and m["state"] == "failed")
        assert "health check" in report["error"] and report["active"]["version"] == 1
        assert score(report["http_port"]) == {"version": 1}

        stranger = generate_key("stranger")  # its public key is not in the device's trusted_keys
        untrusted = script_bundle(tmp_path / "v5.edb", stranger, 5)
        observer.desire(order(untrusted, folder, base, 5, "d-untrusted"))
        report = observer.wait("reported", lambda m: m["deployment_id"] == "d-untrusted" and m["state"] == "failed")
        assert report["active"]["version"] == 1 and "trust" in report["error"].lower()

        older = script_bundle(tmp_path / "v0.edb", signing_key, 0)
        observer.desire(order(older, folder, base, 0, "d-down"))
        report = observer.wait("reported", lambda m: m["deployment_id"] == "d-down" and m["state"] == "failed")
        assert "allow_downgrade" in report["error"] and score(report["http_port"]) == {"version": 1}

        observer.desire(order(v1, folder, base, 1, "d-3"))  # back to v1: nothing to install
        report = observer.wait("reported", lambda m: m["deployment_id"] == "d-3" and m["state"] == "active")
        assert "downloading" not in [e["to"] for e in observer.events if e["deployment_id"] == "d-3"]

        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        observer.wait("status", lambda m: m["online"] is False, timeout=60)  # the last will

        before, restarted = len(observer.events), time.time()
        agent = start_agent(config, log)
        report = observer.wait("reported", lambda m: m["ts"] >= restarted and m["state"] == "active")
        observer.wait("status", lambda m: m["online"] is True)
        assert score(report["http_port"]) == {"version": 1}
        assert not [e for e in observer.events[before:] if e["to"] == "downloading"]  # idempotent after restart

        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0
        observer.wait("status", lambda m: m["online"] is False)
    finally:
        _stop(agent, observer)


def test_smoke_outputs_compare_structure_and_numbers_with_tolerance() -> None:
    expected = {"outputs": [{"name": "probs", "data": [0.25, 0.75]}]}
    assert outputs_match({"outputs": [{"name": "probs", "data": [0.25000001, 0.75]}]}, expected)
    assert not outputs_match({"outputs": [{"name": "probs", "data": [0.75, 0.25]}]}, expected)
    assert not outputs_match({"outputs": [{"name": "probs", "data": [0.25]}]}, expected)
    assert not outputs_match({"outputs": [{"name": "other", "data": [0.25, 0.75]}]}, expected)


def test_onnx_bundle_health_check_compares_the_output_sample(
        bundle_http: tuple[Path, str], signing_key: SigningKey, digits_mlp: Path, digits: Any,
        tmp_path: Path) -> None:
    """In-process daemon core (no broker needed): fp32 ONNX passes; a wrong output sample fails."""
    import asyncio

    from edge_agent.config import parse_agent_config
    from edge_agent.daemon import EdgeAgent
    from packager.packaging import package

    folder, base = bundle_http
    export_public_key(tmp_path / "publisher.pub")
    sample_in = tmp_path / "in.json"
    sample_in.write_text(json.dumps({"data": digits.x_test[:2].tolist()}))
    good = package(digits_mlp, "cpu-x86_64", tmp_path / "good.edb", input_sample=sample_in, name="digits").bundle_path
    wrong_out = tmp_path / "out.json"
    first = json.loads(json.dumps(score_local(good, sample_in)))
    wrong_out.write_text(json.dumps({k: (np.abs(np.asarray(v)) + 5).tolist() for k, v in first.items()}))
    bad = package(digits_mlp, "cpu-x86_64", tmp_path / "bad.edb", input_sample=sample_in, output_sample=wrong_out,
                  name="digits", force=True).bundle_path

    config = parse_agent_config({"device_id": "dev-onnx", "broker": "mqtt://127.0.0.1:1", "data_dir": "data",
                                 "trusted_keys": ["publisher.pub"], "http_port": 0, "grpc_port": 0}, base=tmp_path)
    agent = EdgeAgent(config)

    def desired(bundle: Path, deployment_id: str) -> dict:
        return order_body(bundle, folder, base, 1, deployment_id, name="digits")

    async def scenario() -> None:
        store = agent.stores.get("digits")
        await agent.handle(desired(good, "g"))
        assert store.state.value == "active", store.deployment.get("error")
        await agent.handle(desired(bad, "b"))
        assert store.state.value == "failed"
        assert "output sample" in store.deployment["error"]
        assert store.active["bundle_sha256"] == bundle_sha256(good)
        result = await agent.dataplane.score("digits", json.loads(sample_in.read_text()))
        assert outputs_match(result, first)
        await agent.repository.close()

    asyncio.run(scenario())
    agent.link.stop()


def score_local(bundle: Path, sample_in: Path) -> Any:
    """What the bundle's model answers for the sample (through a throwaway repository)."""
    import asyncio

    from edge_agent.dataplane import DataPlane
    from edge_agent.repository import ModelRepository

    async def go() -> Any:
        repository = ModelRepository(bundle.parent / "scratch")
        try:
            await repository.load_bundle(bundle, "probe")
            return await DataPlane(repository).score("probe", json.loads(sample_in.read_text()))
        finally:
            await repository.close()

    return asyncio.run(go())


def test_telemetry_is_queued_on_disk_while_the_broker_is_down_and_sent_in_order_when_it_returns(
        tmp_path: Path) -> None:
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed")
    port = free_port()
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "device_id": DEVICE, "broker": f"mqtt://127.0.0.1:{port}", "data_dir": str(tmp_path / "data"),
        "http_port": 0, "grpc_port": 0, "telemetry_period_s": 0.2, "reconnect_min_s": 1, "reconnect_max_s": 2}))
    broker = start_mosquitto(tmp_path, port, persistent=True)
    observer = Observer(port, persistent=True)  # subscribed before the outage; its session outlives it
    assert observer.ready.wait(10), "the observer's subscription was not acknowledged"
    broker.terminate()
    broker.wait(10)
    agent = start_agent(config, tmp_path / "agent.log")
    queue = tmp_path / "data" / "telemetry"
    try:
        deadline = time.monotonic() + 30
        while len(list(queue.glob("*.json"))) < 3:  # nobody to send to: samples pile up on disk
            assert agent.poll() is None and time.monotonic() < deadline, "no telemetry was queued"
            time.sleep(0.1)
        broker_up = time.time()
        broker = start_mosquitto(tmp_path, port, persistent=True)
        with observer.changed:
            observer.changed.wait_for(lambda: len(observer.seen_telemetry) >= 4, 60)
            stamps = [m["ts"] for m in observer.seen_telemetry]
        assert len(stamps) >= 4 and stamps == sorted(stamps)
        assert sum(ts < broker_up for ts in stamps) >= 3  # the queued ones came first, oldest first
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
        observer.close()
        broker.terminate()
        broker.wait(10)


def test_username_and_password_are_used_and_a_refusal_does_not_stop_the_agent(tmp_path: Path) -> None:
    if not Path(MOSQUITTO).exists() or not shutil.which("mosquitto_passwd"):
        pytest.skip("mosquitto / mosquitto_passwd are not installed")
    passwords = tmp_path / "passwords"
    passwords.touch(mode=0o600)
    for user, secret in (("device", "s3cret"), ("observer", "watch")):
        subprocess.run(["mosquitto_passwd", "-b", str(passwords), user, secret], check=True, capture_output=True)
    port = free_port()
    # As root, mosquitto drops to its own user and could not read our private tmp folder.
    as_root = "user root\n" if os.geteuid() == 0 else ""
    broker = start_mosquitto(tmp_path, port, settings=f"{as_root}allow_anonymous false\npassword_file {passwords}")
    observer = Observer(port, auth=("observer", "watch"))
    agents: list[subprocess.Popen] = []
    try:
        for name, secret in (("wrong", "nope"), ("right", "s3cret")):
            config = tmp_path / f"{name}.yaml"
            config.write_text(yaml.safe_dump({
                "device_id": DEVICE if name == "right" else "dev-wrong", "broker": f"mqtt://127.0.0.1:{port}",
                "username": "device", "password": secret, "data_dir": str(tmp_path / name),
                "http_port": 0, "grpc_port": 0}))
            agents.append(start_agent(config, tmp_path / f"{name}.log"))
        observer.wait("status", lambda m: m["online"] is True and m["device_id"] == DEVICE)
        deadline = time.monotonic() + 30
        while "refused the connection" not in (tmp_path / "wrong.log").read_text():
            assert time.monotonic() < deadline, "the wrong password was not refused"
            time.sleep(0.1)
        assert agents[0].poll() is None  # it keeps retrying instead of dying
    finally:
        for agent in agents:
            agent.send_signal(signal.SIGTERM)
            agent.wait(30)
        observer.close()
        broker.terminate()
        broker.wait(10)


def write_agent_config(tmp_path: Path, port: int, **settings: Any) -> Path:
    """agent.yaml for DEVICE on the broker at ``port``, trusting the test signing key."""
    export_public_key(tmp_path / "publisher.pub")
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "device_id": DEVICE, "broker": f"mqtt://127.0.0.1:{port}", "data_dir": str(tmp_path / "data"),
        "trusted_keys": [str(tmp_path / "publisher.pub")], "http_port": 0, "grpc_port": 0, **settings}))
    return config


def wait_for_log(log: Path, text: str, count: int = 1, timeout: float = 30) -> None:
    """Block until ``text`` appears ``count`` times in the agent's log."""
    deadline = time.monotonic() + timeout
    while log.read_text(errors="replace").count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged; log ends: {log.read_text()[-2000:]}"
        time.sleep(0.1)


def test_a_deeply_nested_desired_message_is_dropped_acknowledged_and_the_next_order_installs(
        broker: int, bundle_http: tuple[Path, str], signing_key: SigningKey, tmp_path: Path) -> None:
    """200 KB of nested brackets (under the size limit) once killed paho's thread for good."""
    folder, base = bundle_http
    config, log = write_agent_config(tmp_path, broker), tmp_path / "agent.log"
    observer = Observer(broker)
    agent = start_agent(config, log)
    try:
        observer.wait("status", lambda m: m["online"] is True)
        deep = b"[" * 100_000 + b"]" * 100_000
        observer.client.publish(topic(DEVICE, "desired"), deep, qos=1).wait_for_publish(10)  # not retained
        wait_for_log(log, "nests deeper than")
        # A clean restart: an unacknowledged message would come back from the persistent session.
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0
        restarted = time.time()
        agent = start_agent(config, log)
        observer.wait("status", lambda m: m["online"] is True and m["ts"] >= restarted)
        v1 = script_bundle(tmp_path / "v1.edb", signing_key, 1)
        observer.desire(order(v1, folder, base, 1, "after-deep"))
        report = observer.wait("reported", lambda m: m["deployment_id"] == "after-deep" and m["state"] == "active")
        assert score(report["http_port"]) == {"version": 1}
        assert log.read_text().count("nests deeper than") == 1  # acknowledged: not redelivered
    finally:
        _stop(agent, observer)


def test_an_order_too_large_to_report_in_full_is_reported_shortened_and_the_next_order_installs(
        broker: int, bundle_http: tuple[Path, str], signing_key: SigningKey, tmp_path: Path) -> None:
    """Identifiers that make ``reported`` exceed 256 KiB once left the controller waiting forever."""
    folder, base = bundle_http
    config, log = write_agent_config(tmp_path, broker), tmp_path / "agent.log"
    observer = Observer(broker)
    agent = start_agent(config, log)
    try:
        observer.wait("status", lambda m: m["online"] is True)
        with socket.socket() as sock:  # a port nobody listens on: the download fails at once
            sock.bind(("127.0.0.1", 0))
            closed = sock.getsockname()[1]
        body = {"deployment_id": "huge-", "rollout_id": "", "allow_downgrade": False, "bundle_sha256": "a" * 64,
                "bundle_url": f"http://127.0.0.1:{closed}/b.edb", "model": {"name": "scorer", "version": 1}}
        fill = (MAX_MESSAGE_BYTES - 100 - len(signed(body))) // 2  # just under the limit
        body.update(deployment_id="huge-" + "d" * fill, rollout_id="r" * fill)
        observer.desire(signed(body))  # its reported state, with both ids and an error, is not
        report = observer.wait("reported", lambda m: str(m["deployment_id"]).startswith("huge-")
                               and m["state"] == "failed")
        assert len(report["deployment_id"]) < 2000 and len(report["error"]) < 2000
        deployment = json.loads((tmp_path / "data" / "models" / "scorer" / "deployment.json").read_text())
        assert len(deployment["error"]) < 2000
        v1 = script_bundle(tmp_path / "v1.edb", signing_key, 1)
        observer.desire(order(v1, folder, base, 1, "after-huge"))
        report = observer.wait("reported", lambda m: m["deployment_id"] == "after-huge" and m["state"] == "active")
        assert score(report["http_port"]) == {"version": 1}
    finally:
        _stop(agent, observer)


def test_the_worker_outlives_an_order_that_raises_outside_its_deployment_steps(
        bundle_http: tuple[Path, str], signing_key: SigningKey, tmp_path: Path) -> None:
    """In-process daemon core: deployment.json cannot be replaced (a folder sits there), then can."""
    import asyncio

    from edge_agent.config import parse_agent_config
    from edge_agent.daemon import EdgeAgent

    folder, base = bundle_http
    export_public_key(tmp_path / "publisher.pub")
    config = parse_agent_config({"device_id": DEVICE, "broker": "mqtt://127.0.0.1:1", "data_dir": "data",
                                 "trusted_keys": ["publisher.pub"], "http_port": 0, "grpc_port": 0}, base=tmp_path)
    agent = EdgeAgent(config)
    blocker = tmp_path / "data" / "models" / "scorer" / "deployment.json"
    v1 = script_bundle(tmp_path / "v1.edb", signing_key, 1)

    async def scenario() -> None:
        worker = asyncio.create_task(agent._worker())
        blocker.mkdir(parents=True)
        (blocker / "keep").touch()  # os.replace cannot put a file over a non-empty folder
        agent._queue_desired(json.loads(order(v1, folder, base, 1, "blocked")))
        while agent._pending or agent._current is not None:
            await asyncio.sleep(0.05)
        shutil.rmtree(blocker)
        agent._queue_desired(json.loads(order(v1, folder, base, 1, "unblocked")))
        store = agent.stores.get("scorer")
        for _ in range(400):
            if store.state.value == "active" or worker.done():
                break
            await asyncio.sleep(0.05)
        assert not worker.done(), "the worker task ended"
        assert store.state.value == "active" and store.deployment["deployment_id"] == "unblocked"
        agent.stop()
        await asyncio.wait_for(worker, 10)
        await agent.repository.close()

    asyncio.run(scenario())


def test_a_newer_order_preempts_a_download_from_a_stuck_server(
        broker: int, bundle_http: tuple[Path, str], signing_key: SigningKey, tmp_path: Path) -> None:
    """A server dripping one byte at a time once held the only worker while a good order waited."""
    folder, base = bundle_http
    stack = contextlib.ExitStack()
    blob = os.urandom(300_000)
    sha = hashlib.sha256(blob).hexdigest()
    config = write_agent_config(tmp_path, broker, download_deadline_s=600, download_min_bytes_per_s=0)
    observer = Observer(broker)
    agent = start_agent(config, tmp_path / "agent.log")
    try:
        drip = stack.enter_context(dripping_server(blob))
        observer.wait("status", lambda m: m["online"] is True)
        observer.desire(signed({
            "deployment_id": "stuck", "bundle_url": f"{drip}/{sha}.edb", "bundle_sha256": sha,
            "model": {"name": "scorer", "version": 1}, "allow_downgrade": False}))
        observer.wait("reported", lambda m: m["deployment_id"] == "stuck" and m["state"] == "downloading")
        time.sleep(1)  # well into the transfer
        v1 = script_bundle(tmp_path / "v1.edb", signing_key, 1)
        ordered = time.monotonic()
        observer.desire(order(v1, folder, base, 1, "newer"))
        report = observer.wait("reported", lambda m: m["deployment_id"] == "newer" and m["state"] == "active",
                               timeout=30)
        assert time.monotonic() - ordered < 20 and score(report["http_port"]) == {"version": 1}
        stuck = [e for e in observer.events if e["deployment_id"] == "stuck" and e["to"] == "failed"]
        assert stuck and "newer order" in stuck[0]["reason"]
        assert not list((tmp_path / "data").rglob("*.part"))  # the abandoned order's bytes were reclaimed
    finally:
        stack.close()
        _stop(agent, observer)


def test_download_deadline_from_agent_yaml_ends_a_stuck_download_in_failed(
        broker: int, signing_key: SigningKey, tmp_path: Path) -> None:
    """``download_deadline_s`` reaches the download: the order fails, saying why, instead of hanging."""
    blob = os.urandom(100_000)
    sha = hashlib.sha256(blob).hexdigest()
    config = write_agent_config(tmp_path, broker, download_deadline_s=1.5)
    observer = Observer(broker)
    agent = start_agent(config, tmp_path / "agent.log")
    try:
        with dripping_server(blob) as drip:
            observer.wait("status", lambda m: m["online"] is True)
            observer.desire(signed({
                "deployment_id": "slow", "bundle_url": f"{drip}/{sha}.edb", "bundle_sha256": sha,
                "model": {"name": "scorer", "version": 1}, "allow_downgrade": False}))
            report = observer.wait("reported", lambda m: m["deployment_id"] == "slow" and m["state"] == "failed",
                                   timeout=20)
        assert "took over 1.5s" in report["error"] and "resumes" in report["error"]
        assert 0 < (tmp_path / "data" / "downloads" / f"{sha}.part").stat().st_size < len(blob)
    finally:
        _stop(agent, observer)


def test_unsigned_replayed_expired_misaddressed_and_forged_orders_are_refused_and_the_model_keeps_serving(
        broker: int, bundle_http: tuple[Path, str], signing_key: SigningKey, tmp_path: Path) -> None:
    folder, base = bundle_http
    export_public_key(tmp_path / "device.pub")  # the publisher key and the controller's order key, by role
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "device_id": DEVICE, "broker": f"mqtt://127.0.0.1:{broker}", "data_dir": str(tmp_path / "data"),
        "trusted_keys": [str(tmp_path / "device.pub")], "http_port": 0, "grpc_port": 0}))
    log = tmp_path / "agent.log"
    observer = Observer(broker)
    agent = start_agent(config, log)
    v1, v2 = (script_bundle(tmp_path / f"v{v}.edb", signing_key, v) for v in (1, 2))
    old = signed(order_body(v1, folder, base, 1, "d-1"), seq=10)
    try:
        observer.desire(old)
        observer.wait("reported", lambda m: m["state"] == "active" and m["active"]["version"] == 1, timeout=90)
        current = signed({"models": {"scorer": order_body(v2, folder, base, 2, "d-2")}}, seq=11, schema=2)
        observer.desire(current)
        report = observer.wait("reported", lambda m: m["state"] == "active" and m["active"]["version"] == 2)
        assert report["models"]["scorer"]["active"]["version"] == 2 and report["last_seq"] == 11
        port = report["http_port"]

        downgrade = dict(order_body(v1, folder, base, 1, "evil-1"), allow_downgrade=True)
        forged = json.loads(signed(downgrade, seq=12))
        forged["deployment_id"] = "evil-forged"  # changed after signing
        expired = signed(dict(downgrade, deployment_id="evil-expired"), seq=13, expires_in=-60)
        cases = [
            (encode_message("desired", {"schema": 1, **downgrade}), "unsigned"),
            (encode_message("desired", {"schema": 1, "deployment_id": "evil-2", "bundle_url": "", "bundle_sha256": "",
                                        "model": {"name": "scorer", "version": None}, "action": "remove"}),
             "unsigned"),
            (old, "replayed (sequence 10 is not above 11"),
            (expired, "expired"),
            (signed(dict(downgrade, deployment_id="evil-other"), device_id="dev-other", seq=14),
             "addressed to 'dev-other'"),
            (signed(dict(downgrade, deployment_id="evil-publisher"), seq=15, key=signing_key),
             "not a controller key"),
            (json.dumps(forged).encode(), "signature does not match"),
        ]
        for payload, reason in cases:
            observer.desire(payload)
            observer.wait("events", lambda m, r=reason: m["to"] == "refused" and r in m["reason"])
            report = observer.wait("reported", lambda m, r=reason: r in (m.get("refused") or ""))
            assert report["refused"].startswith("refused order ") and "\n" not in report["refused"]
            assert report["state"] == "active" and report["active"]["version"] == 2
            assert score(port) == {"version": 2}
        refusals = [e for e in observer.events if e["to"] == "refused"]
        assert len(refusals) == len(cases) and all(e["reason"].startswith("refused order") for e in refusals)
        assert "refused order evil-1: unsigned" in log.read_text()

        observer.desire(current)  # the order applied last, again: nothing to do and nothing to report
        before = len(observer.events)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0
        restarted = time.time()
        agent = start_agent(config, log)  # the retained order (sequence 11) is redelivered on connect
        report = observer.wait("reported", lambda m: m["ts"] >= restarted and m["state"] == "active")
        assert report["last_seq"] == 11 and report["refused"] is None and score(report["http_port"]) == {"version": 2}
        observer.desire(old)  # the sequence survived the restart: still a replay
        observer.wait("events", lambda m: m["to"] == "refused" and m["ts"] >= restarted and "replayed" in m["reason"])
        assert [e["to"] for e in observer.events[before:]] == ["refused"]  # the redelivery did nothing
    finally:
        _stop(agent, observer)
