"""The control plane with 3,000 simulated devices: every targeted device is accounted for.

One controller (SQLite) for the module, over a private Mosquitto that queues without limit (one
connection carries the whole simulated fleet, see bench/fleet_sim.py), and the fleet simulator in
this process. A rollout to all must report ``succeeded == N``; failures under the threshold are
counted, not lost; a declarative deployment converges exactly the devices its condition matches,
including devices that join afterwards. The simulator counts what each device runs, so the
controller's figures are checked against the devices' own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from bench.fleet_sim import FleetSimulator
from bench.sim_devices import VersionBehaviour
from tests.controller_env import ControllerFleet, controller_fleet, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.soak]  # make soak: thousands of simulated devices

N = 3000
FAILING_VERSION = 3  # 4 % of the devices fail its health check


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerFleet]:
    with controller_fleet(tmp_path_factory.mktemp("control-plane-sim"),
                          broker_settings="max_queued_messages 0\n") as running:
        yield running


@pytest.fixture(scope="module")
def sim(plane: ControllerFleet) -> Iterator[FleetSimulator]:
    behaviour = {str(FAILING_VERSION): VersionBehaviour(fail_share=0.04)}
    with FleetSimulator("127.0.0.1", plane.broker.port, N, time_to_active=0.2, telemetry_period_s=None,
                        tags={"site": ["a", "b"]}, behaviour=behaviour) as running:
        query = "/api/v1/devices?limit=1&q=online%20%3D%20true"
        wait_for(lambda: plane.get(query)["total"] >= N, f"{N} simulated devices online in the controller", 180, 1.0)
        yield running


def status_of(plane: ControllerFleet, rollout_id: str) -> dict[str, Any]:
    result = plane.cli("fleet", "status", rollout_id, "--json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def deployment(plane: ControllerFleet, name: str) -> dict[str, Any]:
    result = plane.cli("fleet", "deployments", "--json")
    assert result.returncode == 0, result.stderr
    return next(row for row in json.loads(result.stdout) if row["name"] == name)


def test_a_rollout_to_all_accounts_for_every_simulated_device(plane: ControllerFleet, sim: FleetSimulator) -> None:
    bundle = plane.bundle("scorer", 1)
    result = plane.cli("fleet", "rollout", str(bundle), "--to", "all", "--server", plane.bundle_server,
                       "--canary", "1", "--wave", "25%", "--wait", "--json", timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    status = json.loads(result.stdout)
    assert (status["state"], status["succeeded"], status["failed"], status["pending"]) == ("succeeded", N, 0, 0)
    assert sum(w["succeeded"] for w in status["waves"]) == N and status["waves"][0]["succeeded"] == 1
    assert sim.wait_for(lambda: sim.states("scorer") == {"active": N}, 60), sim.states("scorer")


def test_failures_under_the_threshold_are_counted_and_nothing_is_lost(plane: ControllerFleet,
                                                                      sim: FleetSimulator) -> None:
    bundle = plane.bundle("scorer", FAILING_VERSION)
    result = plane.cli("fleet", "deploy", "flaky", str(bundle), "--target", "*", "--server", plane.bundle_server,
                       "--canary", "0", "--wave", "50%", "--max-failures", "10%", "--min-sample", "300")
    assert result.returncode == 0, result.stderr
    rollout_id = wait_for(lambda: deployment(plane, "flaky").get("rollout_id"), "the rollout of flaky")
    status = wait_for(lambda: (s := status_of(plane, rollout_id))["state"] in ("succeeded", "rolled-back", "failed")
                      and s, "the flaky rollout to end", 300, 1.0)
    failed = sim.states("scorer")["failed"]
    assert status["state"] == "succeeded", status
    assert 0.02 * N < failed < 0.06 * N and status["failed"] == failed
    assert status["succeeded"] + status["failed"] == N and status["pending"] == 0
    counts = deployment(plane, "flaky")
    assert (counts["targeted"], counts["applied"], counts["failed"]) == (N, N - failed, failed), counts
    result = plane.cli("fleet", "undeploy", "flaky")
    assert result.returncode == 0, result.stderr


def test_a_deployment_converges_its_condition_and_devices_that_join_later(plane: ControllerFleet,
                                                                          sim: FleetSimulator) -> None:
    bundle = plane.bundle("detector", 1)
    result = plane.cli("fleet", "deploy", "site-a", str(bundle), "--target", "tags.site = 'a'", "--server",
                       plane.bundle_server, "--wave", "50%")
    assert result.returncode == 0, result.stderr
    assert sim.wait_for(lambda: sim.states("detector")["active"] == N // 2, 300), sim.states("detector")
    joined = sim.add_devices(50, tags={"site": ["a", "b"]})
    assert sim.wait_for(lambda: sim.states("detector")["active"] == N // 2 + 25, 120), sim.states("detector")
    assert all(sim.reported(d)["models"].get("detector") is None for d in joined[1::2])  # site b: untouched
    wait_for(lambda: deployment(plane, "site-a")["applied"] == N // 2 + 25, "fleet deployments to count them")
