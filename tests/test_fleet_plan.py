"""Rollout plan logic: waves by count and percent, canary, failure threshold, rollback set, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.errors import UsageError
from packager.fleet import DeviceSelector, RolloutPlan, split_waves

TARGET = {"bundle_sha256": "b" * 64, "bundle_url": "http://s/bundles/" + "b" * 64 + ".edb",
          "model": {"name": "digits", "version": 2}}
OLD = {"bundle_sha256": "a" * 64, "bundle_url": "http://s/a.edb", "model": {"name": "digits", "version": 1}}


def ids(n: int) -> list[str]:
    return [f"dev-{i:02d}" for i in range(n)]


def make_plan(n: int = 10, **kwargs) -> RolloutPlan:  # type: ignore[no-untyped-def]
    previous = {d: (OLD if i % 2 == 0 else None) for i, d in enumerate(ids(n))}
    return RolloutPlan.create("r-1", TARGET, "all", previous, **kwargs)


def active(sha: str = TARGET["bundle_sha256"]) -> dict:
    return {"state": "active", "active": {"bundle_sha256": sha}, "deployment_id": "r-1"}


def test_waves_by_percent_after_a_canary() -> None:
    waves = split_waves(ids(20), canary=1, wave="25%")
    assert [len(w) for w in waves] == [1, 5, 5, 5, 4]
    assert sorted(sum(waves, [])) == ids(20)


def test_waves_by_count_without_canary() -> None:
    assert [len(w) for w in split_waves(ids(7), canary=0, wave="3")] == [3, 3, 1]


@pytest.mark.parametrize("wave", ["0", "-2", "0%", "abc", "150%"])
def test_bad_wave_sizes_are_usage_errors(wave: str) -> None:
    with pytest.raises(UsageError):
        split_waves(ids(3), canary=1, wave=wave)


def test_selectors() -> None:
    dev = {"device_id": "pi-1", "groups": ["kitchen"], "tags": {"site": "milan"}}
    assert DeviceSelector.parse("all").matches(dev)
    assert DeviceSelector.parse("device:pi-0,pi-1").matches(dev)
    assert DeviceSelector.parse("group:kitchen").matches(dev)
    assert not DeviceSelector.parse("group:garage").matches(dev)
    assert DeviceSelector.parse("tag:site=milan").matches(dev)
    assert not DeviceSelector.parse("tag:site=rome").matches(dev)
    for bad in ("", "devices:x", "tag:site", "group:", "device:"):
        with pytest.raises(UsageError):
            DeviceSelector.parse(bad)


def test_waves_proceed_only_when_every_device_of_the_wave_reported() -> None:
    plan = make_plan(10, canary=1, wave="50%")
    assert plan.next_action() == ("publish", ["dev-00"])
    plan.start_wave(0.0)
    assert plan.next_action() == ("wait", [])
    assert not plan.record_report("dev-00", active(OLD["bundle_sha256"]))  # still on the old bundle
    assert plan.record_report("dev-00", active())
    action, devices = plan.next_action()
    assert action == "publish" and len(devices) == 5
    plan.start_wave(1.0)
    for d in devices:
        plan.record_report(d, active())
    action, devices = plan.next_action()
    assert action == "publish" and len(devices) == 4
    plan.start_wave(2.0)
    for d in devices:
        plan.record_report(d, active())
    assert plan.next_action() == ("done", [])
    assert plan.status()["succeeded"] == 10


def test_a_failed_canary_rolls_back_only_updated_devices() -> None:
    plan = make_plan(10, canary=2, wave="4")
    plan.start_wave(0.0)
    plan.record_report("dev-00", active())
    assert plan.record_report("dev-01", {"state": "failed", "deployment_id": "r-1", "error": "health check"})
    action, devices = plan.next_action()
    assert action == "rollback" and devices == ["dev-00", "dev-01"]
    plan.finish_rollback(plan.begin_rollback("too many failures"))
    status = plan.status()
    assert status["state"] == "rolled-back" and status["rolled_back"] == 2 and status["pending"] == 8
    assert plan.devices["dev-00"]["previous"] == OLD and plan.devices["dev-01"]["previous"] is None


def test_a_failure_of_an_older_deployment_is_not_counted() -> None:
    plan = make_plan(3, canary=1)
    plan.start_wave(0.0)
    assert not plan.record_report("dev-00", {"state": "failed", "deployment_id": "r-0"})
    assert plan.next_action() == ("wait", [])


def test_failures_under_the_threshold_do_not_halt() -> None:
    plan = make_plan(20, canary=0, wave="100%", max_failures="10%")
    plan.start_wave(0.0)
    for d in ids(20)[:19]:
        plan.record_report(d, active())
    plan.record_report("dev-19", {"state": "rolled-back", "deployment_id": "r-1"})
    assert plan.next_action() == ("done", [])
    assert plan.status()["failed"] == 1


def test_silent_devices_fail_after_the_wave_timeout() -> None:
    plan = make_plan(2, canary=1, wave_timeout=60.0)
    plan.start_wave(100.0)
    assert plan.expire(150.0) == []
    assert plan.expire(161.0) == ["dev-00"]
    assert plan.next_action()[0] == "rollback"


def test_a_plan_resumes_from_its_json(tmp_path: Path) -> None:
    plan = make_plan(6, canary=1, wave="2")
    plan.start_wave(0.0)
    plan.record_report("dev-00", active())
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan.to_dict()))
    again = RolloutPlan.from_dict(json.loads(path.read_text()))
    assert again == plan
    assert again.next_action() == ("publish", ["dev-01", "dev-02"])


def test_no_matching_device_fails_the_plan() -> None:
    plan = RolloutPlan.create("r-2", TARGET, "group:none", {})
    assert plan.state == "failed" and "group:none" in plan.reason
    assert plan.next_action() == ("done", [])


def test_order_sequences_rise_per_device_across_controller_runs_and_above_what_the_device_saw(
        tmp_path: Path) -> None:
    from packager.fleet import SequenceCounter

    first, second = SequenceCounter(tmp_path), SequenceCounter(tmp_path)  # two CLI runs, one home
    assert [first.next("pi-1"), second.next("pi-1"), first.next("pi-2")] == [0, 1, 0]
    assert second.next("pi-1", floor=41) == 42  # the device applied 41 from a home that was lost
    assert json.loads((tmp_path / "fleet" / "sequences.json").read_text()) == {"pi-1": 42, "pi-2": 0}


def test_a_single_model_report_counts_for_the_plans_model() -> None:
    from packager.fleet import model_report

    legacy = {"schema": 1, "device_id": "pi-1", "state": "active", "ts": 1.0, "active": {"bundle_sha256": "b"}}
    assert model_report(legacy, "digits").active.bundle_sha256 == "b"
    several = {"schema": 2, "device_id": "pi-1", "state": "active", "ts": 1.0,
               "models": {"ocr": {"state": "failed", "error": "boom"}}}
    assert model_report(several, "digits") is None and model_report(several, "ocr").error == "boom"
