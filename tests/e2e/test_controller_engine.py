"""The controller's engine over a real Mosquitto and a real store, with simulated devices.

The simulator (bench/fleet_sim.py) speaks the topic contract as the agent does, so these tests
exercise reconciliation, pacing, windows, failure thresholds, telemetry gates and restarts at a
size real agents would make slow; tests/e2e/test_control_plane.py runs the same flows on real agents.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.fleet_sim import FleetSimulator
from bench.sim_devices import VersionBehaviour
from edge_agent.errors import NotFoundError, UsageError
from packager.control.engine import ControlPlane
from packager.control.store import Store
from tests.e2e.conftest import Broker

SHA = {1: "1" * 64, 2: "2" * 64, 3: "3" * 64}


def target(version: int, model: str = "digits") -> dict[str, Any]:
    return {"bundle_sha256": SHA[version], "bundle_url": f"http://127.0.0.1:1/bundles/{SHA[version]}.edb",
            "model": {"name": model, "version": version}}


def wait(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not hold within {timeout:.0f}s")


@pytest.fixture
def plane_factory(mqtt_broker: Broker, tmp_path: Path, edgedeploy_home: Path) -> Iterator[Callable[..., ControlPlane]]:
    planes: list[tuple[ControlPlane, Store]] = []

    def make(store_url: str | None = None, **kwargs: Any) -> ControlPlane:
        store = Store.open(store_url or f"sqlite:///{tmp_path}/ctl.db")
        plane = ControlPlane(store, mqtt_broker.url, home=edgedeploy_home, tick_s=0.05, **kwargs)
        plane.start()
        planes.append((plane, store))
        wait(lambda: plane.leading, 30, "leadership")
        return plane

    yield make
    for plane, store in planes:
        plane.stop()
        store.close()


def simulator(broker: Broker, count: int, **kwargs: Any) -> FleetSimulator:
    kwargs.setdefault("time_to_active", 0.05)
    kwargs.setdefault("telemetry_period_s", None)
    return FleetSimulator("127.0.0.1", broker.port, count, **kwargs)  # `with` starts and stops it


def wait_devices(plane: ControlPlane, count: int) -> None:
    wait(lambda: sum(1 for d in plane.devices() if d["online"]) >= count, 60, f"{count} devices online")


def test_a_deployment_converges_matching_devices_and_late_joiners(plane_factory, mqtt_broker) -> None:
    with simulator(mqtt_broker, 12, tags={"site": ["milan", "rome", "milan"]}) as sim:
        plane = plane_factory()
        wait_devices(plane, 12)
        milan = {d for d in sim.device_ids if sim.reported(d)["tags"]["site"] == "milan"}
        plane.deploy({"name": "digits-milan", **target(1), "target": "tags.site = 'milan'",
                      "policy": {"canary": "1", "wave": "50%"}})
        wait(lambda: sim.active_count(SHA[1]) == len(milan), what="the milan devices converge")
        assert {d for d in sim.device_ids if SHA[1] in _active(sim, d)} == milan
        late = sim.add_devices(1, tags={"site": "milan"})[0]
        wait(lambda: SHA[1] in _active(sim, late), what="the device that joined later converges")
        counts = (len(milan) + 1, len(milan) + 1, 0)
        wait(lambda: _counts(plane, "digits-milan") == counts, what=f"fleet deployments says {counts}")
        # a device whose tags change joins; a second, higher-priority deployment takes rome
        rome = sorted(set(sim.device_ids) - milan - {late})
        sim.set_attributes(rome[:1], tags={"site": "milan"})
        wait(lambda: SHA[1] in _active(sim, rome[0]), what="a device retagged into the condition converges")
        plane.deploy({"name": "digits-all", **target(2), "target": "*", "priority": 10,
                      "policy": {"canary": "0", "wave": "100%"}})
        wait(lambda: sim.active_count(SHA[2]) == len(sim.device_ids), what="the higher priority wins everywhere")
        plane.undeploy("digits-all")
        wait(lambda: sim.active_count(SHA[1]) == len(milan) + 2, what="removing it rolls back to the next match")
        wait(lambda: all(not _active(sim, d) for d in rome[1:]), what="devices that match nothing lose the model")
        events = [e["message"] for e in plane.events(limit=500)]
        assert any("deployment digits-all removed" in m for m in events)


def _counts(plane: ControlPlane, name: str) -> tuple[int, int, int]:
    row = next(d for d in plane.deployments() if d["name"] == name)
    return row["targeted"], row["applied"], row["failed"]


def _active(sim: FleetSimulator, device_id: str) -> set[str]:
    models = sim.reported(device_id).get("models") or {}
    return {(m.get("active") or {}).get("bundle_sha256") for m in models.values() if m.get("state") == "active"}


def test_a_rollout_accounts_for_every_device(plane_factory, mqtt_broker) -> None:
    with simulator(mqtt_broker, 400) as sim:
        plane = plane_factory()
        wait_devices(plane, 400)
        rollout_id = plane.start_rollout({**target(1), "selector": "all", "policy": {"canary": "1", "wave": "25%"}})
        wait(lambda: plane.rollout_status(rollout_id)["state"] == "succeeded", what="the rollout ends")
        status = plane.rollout_status(rollout_id)
        assert status["succeeded"] == 400 == sim.active_count(SHA[1])
        assert [w["size"] for w in status["waves"]] == [1, 100, 100, 100, 99]


def test_an_ended_rollout_leaves_memory_and_the_store_after_the_retention(plane_factory, mqtt_broker) -> None:
    """At 100,000 devices every rollout kept in memory would hold ~50 MB of rows: ended ones keep only counts."""
    with simulator(mqtt_broker, 30) as sim:
        plane = plane_factory(retention_s=3.0)
        wait_devices(plane, 30)
        rollout_id = plane.start_rollout({**target(1), "selector": "all", "policy": {"canary": "1", "wave": "50%"}})
        wait(lambda: plane.rollout_status(rollout_id)["state"] == "succeeded", what="the rollout ends")
        plane.deploy({"name": "digits-all", **target(2), "target": "*", "policy": {"wave": "100%"}})
        wait(lambda: sim.active_count(SHA[2]) == 30, what="the deployment converges")
        ended = plane._rollouts[rollout_id]
        wait(lambda: not ended.loaded, 10, "the ended rollout's rows leave memory")
        assert ended.rows == {} and plane.rollout_status(rollout_id)["succeeded"] == 30  # counts stay
        detail = plane.rollout_status(rollout_id, detail=True)["devices"]  # read back from the store
        assert sorted(detail) == sorted(sim.device_ids) and {d["state"] for d in detail.values()} == {"succeeded"}
        deployment = next(d for d in plane.deployments() if d["name"] == "digits-all")["rollout_id"]
        assert plane._rollouts[deployment].loaded  # a deployment's current rollout takes joiners: it stays

        plane.stop()
        plane.store.close()
        again = plane_factory(retention_s=3.0)  # a new leader reads the ended one as counts, not rows
        assert not again._rollouts[rollout_id].loaded and again.rollout_status(rollout_id)["succeeded"] == 30
        assert again._rollouts[deployment].loaded
        time.sleep(3.5)
        assert again.prune()[1] == 1  # the ended rollout; the deployment's stays however old
        assert rollout_id not in {r["rollout_id"] for r in again.rollouts()}
        assert again.store.rollout(rollout_id) is None and again.store.rollout_devices(rollout_id) == []
        with pytest.raises(NotFoundError):
            again.rollout_status(rollout_id)
        assert again.store.rollout(deployment) is not None


def test_failures_over_the_threshold_halt_and_roll_back(plane_factory, mqtt_broker) -> None:
    bad = {"2": VersionBehaviour(fail_share=1.0)}
    with simulator(mqtt_broker, 20, behaviour=bad) as sim:
        plane = plane_factory()
        wait_devices(plane, 20)
        first = plane.start_rollout({**target(1), "selector": "all", "policy": {"canary": "0", "wave": "100%"}})
        wait(lambda: plane.rollout_status(first)["state"] == "succeeded")
        second = plane.start_rollout({**target(2), "selector": "all",
                                      "policy": {"canary": "2", "wave": "50%", "max_failures": "10%"}})
        wait(lambda: plane.rollout_status(second)["state"] == "rolled-back", what="the rollout rolls back")
        status = plane.rollout_status(second)
        assert status["waves"][0]["size"] == 2 and status["waves"][1]["rolled_back"] == 0
        wait(lambda: sim.active_count(SHA[1]) == 20, what="every device runs the first bundle again")
        assert sim.order_times(SHA[2]) and len(sim.order_times(SHA[2])) <= 2, "only the canary got the bad bundle"
        rollback = [e for e in plane.events(rollout_id=second) if e["kind"] == "rollback"]
        assert rollback and rollback[0]["data"]["failed"] >= 1
        assert "finished devices failed" in rollback[0]["message"]


@pytest.mark.parametrize(("slow", "expected"), [(True, "rolled-back"), (False, "succeeded")])
def test_a_telemetry_gate_compares_the_wave_with_its_previous_version(plane_factory, mqtt_broker, slow,
                                                                      expected) -> None:
    behaviour = {"1": VersionBehaviour(p95_ms=20.0), "2": VersionBehaviour(p95_ms=60.0 if slow else 21.0)}
    with simulator(mqtt_broker, 6, behaviour=behaviour, telemetry_period_s=0.25, requests_per_s=50) as sim:
        plane = plane_factory()
        wait_devices(plane, 6)
        first = plane.start_rollout({**target(1), "selector": "all", "policy": {"canary": "0", "wave": "100%"}})
        wait(lambda: plane.rollout_status(first)["state"] == "succeeded")
        time.sleep(2.5)  # telemetry of version 1, the gate's baseline
        second = plane.start_rollout({**target(2), "selector": "all",
                                      "policy": {"canary": "2", "wave": "100%", "bake": "2",
                                                 "gate": "p95<=1.2x,errors<=1%"}})
        wait(lambda: plane.rollout_status(second)["state"] in ("rolled-back", "succeeded"), 90, "the gate decides")
        assert plane.rollout_status(second)["state"] == expected
        gates = [e for e in plane.events(rollout_id=second) if e["kind"] in ("gate", "rollback")]
        assert gates, "the decision is in the event log"
        # newest first: the verdict; a slow canary halts at wave 0, a good one passes both waves' gates
        assert "p95" in gates[0]["message"] and gates[0]["data"]["wave"] == (0 if slow else 1)
        assert sum("passed its gate" in e["message"] for e in gates) == (0 if slow else 2)
        wait(lambda: sim.active_count(SHA[1 if slow else 2]) == 6, what="every device runs the verdict's bundle")


def test_a_paced_rollout_never_orders_faster_than_its_rate(plane_factory, mqtt_broker) -> None:
    with simulator(mqtt_broker, 8) as sim:
        plane = plane_factory()
        wait_devices(plane, 8)
        rollout_id = plane.start_rollout({**target(1), "selector": "all",
                                          "policy": {"canary": "0", "wave": "100%", "rate": "120/min"}})
        wait(lambda: plane.rollout_status(rollout_id)["state"] == "succeeded", 90)
        times = sorted(sim.order_times(SHA[1]))
        assert len(times) == 8
        assert times[-1] - times[0] >= 7 * 0.5 * 0.9, "8 devices at 2/s span at least 3.5 s"


def test_devices_outside_their_maintenance_window_wait(plane_factory, mqtt_broker) -> None:
    now = time.gmtime()
    minute = now.tm_hour * 60 + now.tm_min
    closed = f"{(minute + 120) // 60 % 24:02d}:{(minute + 120) % 60:02d}-{(minute + 180) // 60 % 24:02d}:" \
             f"{(minute + 180) % 60:02d}"
    with simulator(mqtt_broker, 4) as sim:
        plane = plane_factory()
        wait_devices(plane, 4)
        rollout_id = plane.start_rollout({**target(1), "selector": "all",
                                          "policy": {"canary": "0", "wave": "100%", "window": closed}})
        time.sleep(2.0)
        assert sim.order_times(SHA[1]) == [] and plane.rollout_status(rollout_id)["pending"] == 4
        opened = plane.start_rollout({**target(2, "other"), "selector": "all",
                                      "policy": {"canary": "0", "wave": "100%", "window": "00:00-23:59"}})
        wait(lambda: plane.rollout_status(opened)["state"] == "succeeded")


def test_a_restarted_controller_finishes_the_rollout_without_ordering_twice(plane_factory, mqtt_broker,
                                                                           tmp_path) -> None:
    with simulator(mqtt_broker, 10) as sim:
        plane = plane_factory()
        wait_devices(plane, 10)
        rollout_id = plane.start_rollout({**target(1), "selector": "all",
                                          "policy": {"canary": "0", "wave": "100%", "rate": "300/min"}})
        wait(lambda: 2 <= len(sim.order_times(SHA[1])) < 10, what="the rollout is under way")
        plane.stop()
        plane.store.close()
        again = plane_factory()
        wait(lambda: again.rollout_status(rollout_id)["state"] == "succeeded", what="the new controller finishes")
        status = again.rollout_status(rollout_id, detail=True)
        assert (status["succeeded"], status["failed"], status["rolled_back"]) == (10, 0, 0)
        assert len(sim.order_times(SHA[1])) == 10 and sim.active_count(SHA[1]) == 10
        assert any("leads" in e["message"] for e in again.events(limit=500))


def test_bad_specs_are_one_line_errors(plane_factory, mqtt_broker) -> None:
    plane = plane_factory()
    with pytest.raises(UsageError, match="--target"):
        plane.deploy({"name": "x", **target(1), "target": "tags.site = "})
    with pytest.raises(UsageError, match="--rate"):
        plane.deploy({"name": "x", **target(1), "target": "*", "policy": {"rate": "fast"}})
    with pytest.raises(UsageError, match="bundle_sha256"):
        plane.deploy({"name": "x", **target(1), "bundle_sha256": "nope", "target": "*"})
    with pytest.raises(UsageError, match="name"):
        plane.deploy({"name": "../x", **target(1), "target": "*"})
    with pytest.raises(NotFoundError):
        plane.undeploy("missing")
    with pytest.raises(NotFoundError):
        plane.rollout_status("r-missing")
    assert plane.deployments() == []


def test_a_store_that_drops_every_connection_mid_rollout_loses_no_step(plane_factory, mqtt_broker,
                                                                      pg_database) -> None:
    import psycopg

    with simulator(mqtt_broker, 16) as sim:
        plane = plane_factory(pg_database)
        wait_devices(plane, 16)
        rollout_id = plane.start_rollout({**target(1), "selector": "all",
                                          "policy": {"canary": "0", "wave": "100%", "rate": "300/min"}})
        for ordered in (3, 8):
            wait(lambda n=ordered: len(sim.order_times(SHA[1])) >= n, what=f"{ordered} devices ordered")
            with psycopg.connect(pg_database, autocommit=True) as admin:  # the server ends every session
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        wait(lambda: plane.leading and plane.rollout_status(rollout_id)["state"] == "succeeded", 90,
             "the rollout ends after the store came back")
        status = plane.rollout_status(rollout_id)
        assert (status["succeeded"], status["failed"]) == (16, 0) and sim.active_count(SHA[1]) == 16
