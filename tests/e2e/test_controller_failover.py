"""Two ``edgedeploy controller`` processes on one PostgreSQL: one leads; kill -9 it mid-rollout and
the standby finishes the rollout, with no device ever ordered to anything but the rollout's bundle.

Every desired message the broker delivers is recorded by a subscriber of this test, so a second
order to a wrong state (a rollback, another bundle, a sequence number that does not rise) fails it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bench.fleet_sim import FleetSimulator
from edge_agent.errors import EdgeDeployError
from packager.control.client import ControllerClient
from packager.targets.base import free_port, wait_port
from tests.e2e.conftest import Broker, stop_process

SHA = "a" * 64
N = 30


class DesiredLog:
    """Every desired message of every device, in arrival order."""

    def __init__(self, port: int) -> None:
        self.messages: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"desired-log-{os.getpid()}")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("edgedeploy/devices/+/desired", qos=1)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        if message.payload:
            with self.lock:
                self.messages[message.topic.split("/")[2]].append(json.loads(message.payload))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def controller(store_url: str, broker: Broker, port: int, home: Path, log: BinaryIO) -> subprocess.Popen:
    env = dict(os.environ, EDGEDEPLOY_HOME=str(home))
    return subprocess.Popen([sys.executable, "-m", "packager.cli.main", "controller", "--store", store_url,
                             "--broker", broker.url, "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=log)


def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except EdgeDeployError:
            pass  # a controller that is starting or standing by
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout:.0f}s")


@pytest.fixture
def two_controllers(pg_database: str, mqtt_broker: Broker, tmp_path: Path,
                    edgedeploy_home: Path) -> Iterator[tuple[list[subprocess.Popen], list[ControllerClient]]]:
    procs, clients, logs = [], [], []
    for index in range(2):
        port = free_port()
        logs.append(open(tmp_path / f"ctl{index}.log", "wb"))  # noqa: SIM115 - closed below
        procs.append(controller(pg_database, mqtt_broker, port, edgedeploy_home, logs[-1]))
        wait_port(port, timeout=60)
        clients.append(ControllerClient(f"http://127.0.0.1:{port}"))
    yield procs, clients
    for proc, log in zip(procs, logs, strict=True):
        stop_process(proc)
        log.close()


def test_the_standby_finishes_a_rollout_when_the_leader_is_killed(two_controllers, mqtt_broker, tmp_path) -> None:
    procs, clients = two_controllers
    wait(lambda: sum(c.health()["leader"] for c in clients) == 1, 60, "one controller leads")
    assert [c.health()["leader"] for c in clients].count(True) == 1
    leader = next(i for i, c in enumerate(clients) if c.health()["leader"])
    standby = 1 - leader
    with pytest.raises(EdgeDeployError, match="standby"):
        clients[standby].devices()
    desired = DesiredLog(mqtt_broker.port)
    try:
        with FleetSimulator("127.0.0.1", mqtt_broker.port, N, time_to_active=0.05, telemetry_period_s=None) as sim:
            wait(lambda: sum(d["online"] for d in clients[leader].devices()) == N, 60, "the leader sees the fleet")
            rollout_id = clients[leader].start_rollout({
                "bundle_sha256": SHA, "bundle_url": f"http://127.0.0.1:1/bundles/{SHA}.edb",
                "model": {"name": "digits", "version": 1}, "selector": "all",
                "policy": {"canary": "1", "wave": "100%", "rate": "240/min"}})
            wait(lambda: 3 <= len(sim.order_times(SHA)) < N, 60, "the rollout is under way")
            procs[leader].send_signal(signal.SIGKILL)
            procs[leader].wait(10)
            ordered_before = len(sim.order_times(SHA))
            wait(lambda: clients[standby].health()["leader"], 60, "the standby takes the lead")
            wait(lambda: clients[standby].rollout_status(rollout_id)["state"] == "succeeded", 120,
                 "the standby finishes the rollout")
            status = clients[standby].rollout_status(rollout_id)
            assert (status["succeeded"], status["failed"]) == (N, 0)
            assert ordered_before < N and sim.active_count(SHA) == N
        events = [e["message"] for e in clients[standby].events(limit=500)]
        assert sum("leads" in m for m in events) == 2, "both leaderships are in the event log"
    finally:
        desired.close()
    assert len(desired.messages) == N
    for device_id, messages in desired.messages.items():
        seqs = [m["seq"] for m in messages]
        assert seqs == sorted(set(seqs)), f"{device_id} got sequence numbers {seqs}"
        for message in messages:
            order = message["models"]["digits"]
            assert (order["bundle_sha256"], order.get("action"), order["allow_downgrade"]) == (SHA, None, False), \
                f"{device_id} was ordered into another state: {order}"
