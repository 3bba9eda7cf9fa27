"""A locked-down broker, for real: Mosquitto with the TLS listener and ACL that ``fleet broker-config`` writes.

An enrolled agent installs a rollout sent by the controller identity, downloading from a bundle
server that wants a token, with every process at debug level, and no secret reaches a log. Clients
without a certificate, with another CA's or with a self-made one are refused; a device that
presents device A's certificate gets nothing of device B's topics through, either way, while its
own messages flow (so a broken ACL fails the test).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge_agent.broker_tls import BrokerTLS
from edge_agent.fleet_messages import topic
from packager.fleet import FleetController
from packager.fleet_ca import FleetCA
from packager.keys import SigningKey
from packager.targets.base import free_port, wait_port
from tests.e2e.conftest import MOSQUITTO, ROOT, stop_process
from tests.e2e.test_fleet import edgedeploy, script_bundle

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto is not installed")]

PASSWORD = "broker-pass-7c1f9e2a"  # sent by the agent and the CLI; must never reach a log


@dataclass
class TLSBroker:
    """Mosquitto run on the files of ``edgedeploy fleet broker-config`` (plus a log file)."""

    folder: Path
    port: int
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.folder / "mosquitto.log"


def start_tls_broker(folder: Path, edgedeploy_cli: Callable[..., Any]) -> TLSBroker:
    port = free_port()
    edgedeploy_cli("fleet", "broker-config", "-o", str(folder), "--hostname", "127.0.0.1", "--hostname", "localhost",
                   "--port", str(port), "--bind", "127.0.0.1")
    conf = folder / "mosquitto.conf"
    # As root, mosquitto drops to its own user, which cannot read a test's private folder.
    extra = ("user root\n" if os.geteuid() == 0 else "") + f"log_dest file {folder}/mosquitto.log\nlog_type all\n"
    conf.write_text(conf.read_text() + extra)
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return TLSBroker(folder, port, proc)


@pytest.fixture(params=["p256", "ed25519"])
def fleet_ca(request: pytest.FixtureRequest, edgedeploy_home: Path) -> FleetCA:
    """The fleet CA of this test's home, of either key type (Mosquitto takes both)."""
    ca = FleetCA()
    ca.init(key_type=request.param)
    return ca


@pytest.fixture
def tls_broker(fleet_ca: FleetCA, tmp_path: Path) -> Iterator[TLSBroker]:
    folder = tmp_path / "broker"
    fleet_ca.enroll("ops", tmp_path / "ops", role="controller")  # before broker-config: the ACL names it
    broker = start_tls_broker(folder, edgedeploy)
    try:
        yield broker
    finally:
        stop_process(broker.proc)


class Client:
    """A paho client over TLS that records every message it receives."""

    def __init__(self, broker: TLSBroker, tls: BrokerTLS, client_id: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.connected = threading.Event()
        self.lost = threading.Event()
        self.changed = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.tls_set_context(tls.context())
        self.client.on_connect = lambda c, u, f, rc, p: self.connected.set() if not rc.is_failure else None
        self.client.on_disconnect = lambda *_: self.lost.set()
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", broker.port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self.changed:
            self.messages.append((message.topic, bytes(message.payload)))
            self.changed.notify_all()

    def subscribe(self, *filters: str) -> None:
        acked = threading.Event()
        self.client.on_subscribe = lambda *_: acked.set()
        self.client.subscribe([(f, 1) for f in filters])
        assert acked.wait(30), "no SUBACK"

    def publish(self, name: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(name, payload, qos=1, retain=retain).wait_for_publish(30)

    def wait_for(self, name: str, payload: bytes, timeout: float = 30.0) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: (name, payload) in self.messages, timeout), self.messages

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(broker: TLSBroker, tls: BrokerTLS, client_id: str) -> Client:
        made.append(Client(broker, tls, client_id))
        return made[-1]

    yield make
    for client in made:
        client.close()


def identity(folder: Path, role: str = "device") -> BrokerTLS:
    return BrokerTLS(folder / "ca.crt", folder / f"{role}.crt", folder / f"{role}.key")


def self_made_identity(folder: Path, common_name: str, ca_file: Path) -> BrokerTLS:
    """A certificate that claims ``common_name`` but is signed by no CA the broker knows."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now)
                   .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    folder.mkdir(parents=True)
    (folder / "device.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / "device.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    return BrokerTLS(ca_file, folder / "device.crt", folder / "device.key")


def pem_lines(path: Path) -> list[str]:
    """The base64 lines of a PEM key (what a leak would show), without the BEGIN/END lines."""
    return [line for line in path.read_text().splitlines() if line and not line.startswith("-----")]


def test_clients_without_a_certificate_of_the_fleet_ca_are_refused(
        tls_broker: TLSBroker, fleet_ca: FleetCA, clients: Callable[..., Client], tmp_path: Path,
        trusted_key_file: Path) -> None:
    fleet_ca.enroll("dev-a", tmp_path / "a")
    other = FleetCA(tmp_path / "other-home")
    other.init()
    other.enroll("dev-a", tmp_path / "other")
    ca_file = tmp_path / "a" / "ca.crt"
    refused = {
        "no certificate": BrokerTLS(ca_file),
        "another CA's certificate": BrokerTLS(ca_file, tmp_path / "other" / "device.crt",
                                              tmp_path / "other" / "device.key"),
        "a self-made certificate for dev-a": self_made_identity(tmp_path / "forged", "dev-a", ca_file),
    }
    attempts = {what: clients(tls_broker, tls, f"try-{i}") for i, (what, tls) in enumerate(refused.items())}
    enrolled = clients(tls_broker, identity(tmp_path / "a"), "dev-a")
    assert enrolled.connected.wait(30), "the enrolled device could not connect"
    for what, client in attempts.items():
        assert client.lost.wait(30), f"{what}: the broker kept the connection"
        assert not client.connected.is_set(), f"{what}: the broker accepted it"

    # A real agent with another CA's certificate says why in one line and keeps trying.
    config = tmp_path / "other" / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "device_id": "dev-a", "broker": tls_broker.url, "ca_file": str(ca_file),
        "tls_cert": "device.crt", "tls_key": "device.key", "data_dir": str(tmp_path / "other" / "data"),
        "trusted_keys": [str(trusted_key_file)], "http_port": 0, "grpc_port": 0}))
    log = tmp_path / "other" / "agent.log"
    with open(log, "wb") as sink:
        agent = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "--config", str(config)],
                                 stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 90
        while "the broker refused the TLS connection" not in log.read_text():
            assert agent.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert agent.poll() is None
    finally:
        stop_process(agent)


def test_a_device_reads_and_writes_only_its_own_topics_and_the_controller_all(
        tls_broker: TLSBroker, fleet_ca: FleetCA, clients: Callable[..., Client], tmp_path: Path) -> None:
    fleet_ca.enroll("dev-a", tmp_path / "a")
    fleet_ca.enroll("dev-b", tmp_path / "b")
    ops = clients(tls_broker, identity(tmp_path / "ops", "controller"), "ops")
    # device A, calling itself B's agent, asks for B's topics and for everything
    a = clients(tls_broker, identity(tmp_path / "a"), "edge-agent-dev-b")
    for client in (ops, a):
        assert client.connected.wait(30)
    ops.subscribe("edgedeploy/#")
    a.subscribe(topic("dev-b", "desired"), topic("+", "desired"), "edgedeploy/devices/dev-b/#", "#")

    ops.publish(topic("dev-b", "desired"), b"order for b", retain=True)
    ops.publish(topic("dev-a", "desired"), b"order for a", retain=True)
    a.wait_for(topic("dev-a", "desired"), b"order for a")  # sent after B's: had B's come through, it was first
    a.publish(topic("dev-b", "reported"), b"forged report of b")
    a.publish(topic("dev-b", "desired"), b"forged order for b", retain=True)
    a.publish(topic("dev-b", "status"), b"forged status of b")
    a.publish(topic("dev-a", "reported"), b"report of a")
    ops.wait_for(topic("dev-a", "reported"), b"report of a")  # one publisher's QoS 1 messages keep their order
    ops.wait_for(topic("dev-b", "desired"), b"order for b")

    late = clients(tls_broker, identity(tmp_path / "a"), "dev-a-late")  # retained messages, on a new subscription
    assert late.connected.wait(30)
    late.subscribe(topic("dev-b", "desired"), topic("dev-a", "desired"))
    late.wait_for(topic("dev-a", "desired"), b"order for a")
    b = clients(tls_broker, identity(tmp_path / "b"), "dev-b")
    assert b.connected.wait(30)
    b.subscribe(topic("dev-b", "desired"))
    b.wait_for(topic("dev-b", "desired"), b"order for b")  # B's retained order is still the controller's

    time.sleep(1.0)  # a generous moment more for anything that should not come
    assert all(not name.startswith("edgedeploy/devices/dev-b/") for name, _ in a.messages + late.messages), \
        a.messages + late.messages
    assert not [m for m in ops.messages if m[1].startswith(b"forged")], ops.messages
    assert [m for m in b.messages if m[0] == topic("dev-b", "desired")] == [(topic("dev-b", "desired"), b"order for b")]


def test_an_enrolled_agent_installs_a_rollout_over_tls_and_tokens_and_no_secret_reaches_a_log(
        signing_key: SigningKey, trusted_key_file: Path, tmp_path: Path) -> None:
    device, ops = tmp_path / "device", tmp_path / "ops"
    edgedeploy("fleet", "ca", "init")
    edgedeploy("fleet", "enroll", "dev-tls-1", "-o", str(device))
    edgedeploy("fleet", "enroll", "--controller", "ops", "-o", str(ops))
    broker = start_tls_broker(tmp_path / "broker", edgedeploy)
    serve_port = free_port()
    token_file = tmp_path / "bundle.token"
    serve_log = tmp_path / "serve.log"
    with open(serve_log, "wb") as sink:
        serve = subprocess.Popen([sys.executable, "-m", "packager.cli.main", "-vv", "serve", "--port", str(serve_port),
                                  "--token-file", str(token_file)], stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
    agent = None
    try:
        wait_port(serve_port, timeout=60)
        (device / "bundle.token").write_bytes(token_file.read_bytes())
        config = device / "agent.yaml"
        config.write_text(yaml.safe_dump({
            "device_id": "dev-tls-1", "broker": broker.url, "ca_file": "ca.crt", "tls_cert": "device.crt",
            "tls_key": "device.key", "bundle_token_file": "bundle.token", "username": "dev-tls-1",
            "password": PASSWORD, "log_level": "debug", "data_dir": str(device / "data"),
            "trusted_keys": [str(trusted_key_file)], "http_port": 0, "grpc_port": 0}))
        check = subprocess.run([sys.executable, "-m", "edge_agent.cli", "--config", str(config), "--check"],
                               capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert check.returncode == 0, check.stderr
        agent_log = device / "agent.log"
        with open(agent_log, "wb") as sink:
            agent = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "--config", str(config)],
                                     stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
        controller_tls = identity(ops, "controller")
        with FleetController(broker.url, tls=controller_tls) as ctl:
            deadline = time.monotonic() + 120
            while not any(d["device_id"] == "dev-tls-1" and d["online"] for d in ctl.devices()):
                assert time.monotonic() < deadline and agent.poll() is None, agent_log.read_text()
                ctl._connect().wait_change(0.5)

        bundle = script_bundle(tmp_path / "v1.edb", signing_key, 1)
        env = dict(os.environ, EDGEDEPLOY_BROKER_CA=str(ops / "ca.crt"),
                   EDGEDEPLOY_BROKER_CERT=str(ops / "controller.crt"),
                   EDGEDEPLOY_BROKER_KEY=str(ops / "controller.key"))
        rollout = subprocess.run(
            [sys.executable, "-m", "packager.cli.main", "-vv", "fleet", "rollout", str(bundle),
             "--to", "device:dev-tls-1", "--broker", f"mqtts://ops:{PASSWORD}@127.0.0.1:{broker.port}",
             "--server", f"http://127.0.0.1:{serve_port}", "--wait", "--wave-timeout", "120", "--json"],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert rollout.returncode == 0, rollout.stderr
        assert json.loads(rollout.stdout)["state"] == "succeeded"
        with FleetController(broker.url, tls=controller_tls) as ctl:
            row = next(d for d in ctl.devices() if d["device_id"] == "dev-tls-1")
        request = urllib.request.Request(f"http://127.0.0.1:{row['http_port']}/score", data=b'{"data": [[1.0, 2.0]]}',
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read()) == {"version": 1}
    finally:
        if agent is not None:
            stop_process(agent)
        stop_process(serve, signal.SIGINT)
        stop_process(broker.proc)

    logs = {"agent": agent_log.read_text(), "serve": serve_log.read_text(), "cli": rollout.stderr,
            "mosquitto": broker.log.read_text()}
    # the logs are the debug ones, and hold the lines where a secret would show
    assert "connected to mqtts://ops:***@127.0.0.1" in logs["cli"], logs["cli"]
    assert re.search(r"DEBUG .*GET /bundles/[0-9a-f]{64}\.edb", logs["serve"]), logs["serve"]
    assert "DEBUG" in logs["agent"] and "connected to mqtts://127.0.0.1" in logs["agent"], logs["agent"]
    secrets = {"the bundle token": [token_file.read_text().strip()], "the broker password": [PASSWORD]}
    for key in (device / "device.key", ops / "controller.key", tmp_path / "broker" / "server.key", FleetCA().key_path):
        secrets[f"a line of {key.name}"] = pem_lines(key)
    for name, text in logs.items():
        for what, values in secrets.items():
            assert not [v for v in values if v in text], f"{what} is in the {name} log"
