"""The control plane end to end with 20 real ``edge-agent`` processes, one controller for the module.

``edgedeploy controller`` (SQLite store) over a private Mosquitto, ``edgedeploy serve`` and twenty
agents (tags: ``site`` milan/rome alternating, ``tier`` gold for the first ten, silver after),
driven through the ``fleet`` command line with ``EDGEDEPLOY_CONTROLLER`` set. Each test deploys
its own model, so the tests share the agents without stepping on each other: what a device serves
is checked on the device itself (its REST endpoint answers with the bundle's version), not only in
the controller's view of it.
"""

from __future__ import annotations

import json
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.controller_env import ControllerFleet, controller_fleet, wait_for
from tests.e2e.conftest import Agent, make_agent
from tests.e2e.test_fleet import ENTRY_BAD, score, script_bundle

pytestmark = pytest.mark.e2e

IDS = [f"cp-{i:02d}" for i in range(20)]
TAGS = {d: {"site": "milan" if i % 2 == 0 else "rome", "tier": "gold" if i < 10 else "silver"}
        for i, d in enumerate(IDS)}
GOLD = [d for d in IDS if TAGS[d]["tier"] == "gold"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerFleet]:
    devices = [{"device_id": d, "tags": TAGS[d]} for d in IDS]
    with controller_fleet(tmp_path_factory.mktemp("control-plane"), devices) as running:
        yield running
        for agent in running.agents[len(IDS):]:  # the ones the tests added
            agent.kill()


def rows(fleet: ControllerFleet) -> dict[str, dict[str, Any]]:
    """The controller's device rows by id."""
    return {row["device_id"]: row for row in fleet.get("/api/v1/devices")["devices"]}


def serving(row: dict[str, Any], model: str) -> Any:
    """The version of ``model`` a device row says is active, or None."""
    return next((m["version"] for m in row.get("models") or [] if m["name"] == model and m["state"] == "active"),
                None)


def wait_serving(fleet: ControllerFleet, model: str, expected: dict[str, Any], timeout: float = 150.0) -> None:
    """Wait until each device in ``expected`` serves that version of ``model`` (None: not at all)."""
    def settled() -> bool:
        seen = rows(fleet)
        return all(d in seen and serving(seen[d], model) == v for d, v in expected.items())

    wait_for(settled, f"{model} at {expected}", timeout)


def answers(fleet: ControllerFleet, device_id: str, model: str) -> Any:
    """What the device itself answers for ``model`` (None when it does not serve it)."""
    try:
        return score(rows(fleet)[device_id], model)
    except urllib.error.HTTPError as exc:
        assert exc.code == 404, exc
        return None


def deployment(fleet: ControllerFleet, name: str) -> dict[str, Any]:
    result = fleet.cli("fleet", "deployments", "--json")
    assert result.returncode == 0, result.stderr
    return next(row for row in json.loads(result.stdout) if row["name"] == name)


def deploy(fleet: ControllerFleet, name: str, bundle: Path, target: str, *options: str) -> None:
    result = fleet.cli("fleet", "deploy", name, str(bundle), "--target", target, "--server", fleet.bundle_server,
                       *options)
    assert result.returncode == 0, result.stderr


def undeploy(fleet: ControllerFleet, name: str) -> None:
    result = fleet.cli("fleet", "undeploy", name)
    assert result.returncode == 0, result.stderr


def add_agent(fleet: ControllerFleet, device_id: str, tags: dict[str, str]) -> Agent:
    agent = make_agent(fleet.folder / "agents", device_id, fleet.broker.url, fleet.folder / "publisher.pub",
                       tags=tags, telemetry_period_s=1)
    agent.start()
    fleet.agents.append(agent)
    return agent


def retag(fleet: ControllerFleet, device_id: str, tags: dict[str, str]) -> None:
    """Restart a device's agent with new tags (its installed models stay on disk, as on a real device)."""
    agent = next(a for a in fleet.agents if a.device_id == device_id)
    agent.kill()
    config = yaml.safe_load(agent.config.read_text())
    agent.config.write_text(yaml.safe_dump({**config, "tags": tags}))
    agent.start()


def test_a_target_condition_converges_its_agents_a_late_one_and_retagged_ones(fleet: ControllerFleet) -> None:
    milan = {d for d in IDS if TAGS[d]["site"] == "milan"}
    deploy(fleet, "alpha-milan", fleet.bundle("alpha", 1), "tags.site = 'milan'")
    wait_serving(fleet, "alpha", {d: 1 if d in milan else None for d in IDS})
    assert answers(fleet, "cp-02", "alpha") == {"version": 1} and answers(fleet, "cp-03", "alpha") is None
    counts = deployment(fleet, "alpha-milan")
    assert (counts["targeted"], counts["applied"], counts["failed"]) == (10, 10, 0), counts

    add_agent(fleet, "cp-late", {"site": "milan", "tier": "silver"})  # joins after the deployment
    wait_serving(fleet, "alpha", {"cp-late": 1})
    retag(fleet, "cp-01", {**TAGS["cp-01"], "site": "milan"})  # rome -> milan: gets the model
    retag(fleet, "cp-00", {**TAGS["cp-00"], "site": "rome"})  # milan -> rome: loses it
    wait_serving(fleet, "alpha", {"cp-01": 1, "cp-00": None, "cp-02": 1, "cp-03": None})
    assert answers(fleet, "cp-01", "alpha") == {"version": 1} and answers(fleet, "cp-00", "alpha") is None
    counts = deployment(fleet, "alpha-milan")
    assert (counts["targeted"], counts["applied"]) == (11, 11), counts

    undeploy(fleet, "alpha-milan")  # nothing else matches: the model is removed
    wait_serving(fleet, "alpha", {d: None for d in [*IDS, "cp-late"]})


def test_removing_a_deployment_rolls_its_devices_to_the_next_priority_match(fleet: ControllerFleet) -> None:
    everyone = sorted(d for d, row in rows(fleet).items() if row["online"])
    assert set(IDS) <= set(everyone)
    deploy(fleet, "beta-all", fleet.bundle("beta", 1), "*", "--priority", "1")
    deploy(fleet, "beta-gold", fleet.bundle("beta", 2), "tags.tier = 'gold'", "--priority", "10")
    wait_serving(fleet, "beta", {d: 2 if d in GOLD else 1 for d in everyone})
    gold, rest = deployment(fleet, "beta-gold"), deployment(fleet, "beta-all")
    assert (gold["targeted"], gold["applied"]) == (10, 10), gold
    assert (rest["targeted"], rest["applied"]) == (len(everyone) - 10, len(everyone) - 10), rest

    undeploy(fleet, "beta-gold")  # gold devices go back to the next match: beta-all's version 1
    wait_serving(fleet, "beta", {d: 1 for d in everyone})
    assert answers(fleet, GOLD[0], "beta") == {"version": 1}
    assert deployment(fleet, "beta-all")["applied"] == len(everyone)
    undeploy(fleet, "beta-all")


def test_a_failing_bundle_halts_at_the_canary_and_rolls_back(fleet: ControllerFleet) -> None:
    everyone = sorted(d for d, row in rows(fleet).items() if row["online"])
    deploy(fleet, "gamma-good", fleet.bundle("gamma", 1), "*")
    wait_serving(fleet, "gamma", {d: 1 for d in everyone})
    bad = script_bundle(fleet.folder / "gamma-2-bad.edb", fleet.key, 2, ENTRY_BAD, name="gamma")
    deploy(fleet, "gamma-bad", bad, "*", "--priority", "5", "--canary", "1", "--wave", "25%",
           "--max-failures", "10%")
    rollout_id = wait_for(lambda: deployment(fleet, "gamma-bad").get("rollout_id"), "the rollout of gamma-bad")

    def ended() -> dict[str, Any] | None:
        result = fleet.cli("fleet", "status", rollout_id, "--json")
        doc = json.loads(result.stdout) if result.returncode == 0 else {}
        return doc if doc.get("state") in ("rolled-back", "failed") else None

    status = wait_for(ended, f"rollout {rollout_id} to stop", 150)
    assert status["state"] == "rolled-back" and status["rolled_back"] == 1 and status["succeeded"] == 0, status
    canary = [d for d, row in status["devices"].items() if row["wave"] == 0]
    assert len(canary) == 1 and "health check failed" in status["devices"][canary[0]]["error"]
    assert all(row["state"] == "pending" for d, row in status["devices"].items() if d not in canary)  # never ordered
    wait_serving(fleet, "gamma", {d: 1 for d in everyone})  # nobody runs the bad bundle, everyone the good one
    assert all(answers(fleet, d, "gamma") == {"version": 1} for d in everyone[:3])
    assert deployment(fleet, "gamma-bad")["state"] == "rolled-back"
    undeploy(fleet, "gamma-bad")
    undeploy(fleet, "gamma-good")


def test_a_rollout_through_the_controller_reaches_every_selected_agent(fleet: ControllerFleet) -> None:
    result = fleet.cli("fleet", "rollout", str(fleet.bundle("delta", 1)), "--to", "tag:tier=gold", "--server",
                       fleet.bundle_server, "--canary", "1", "--wave", "25%", "--wait", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["state"] == "succeeded" and status["succeeded"] == 10 and status["failed"] == 0, status
    assert [w["size"] for w in status["waves"]] == [1, 3, 3, 3]
    wait_serving(fleet, "delta", {d: 1 if d in GOLD else None for d in IDS})
    assert answers(fleet, GOLD[-1], "delta") == {"version": 1}
