"""The real agent against an attacker's server: each TUF attack is refused and the current model keeps serving.

Every test runs an ``edge-agent --config`` process that trusts the repository's first root, a private
Mosquitto, the honest bundle server and the attacker's mirror: a static ``http.server`` over a copy
of the repository folder, tampered as each attack needs. The controller's orders are genuine (the
attacker holds no order key); they name the mirror, as a compromised CDN or a spoofed host would be.
Each refusal must be one line in the reported state and the event log, with the previous version
still answering over REST. The offline tests export a folder and install it with ``edge-agent install``.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata

from edge_agent.bundle import bundle_sha256
from packager.keys import SigningKey
from packager.tuf_repo import TufRepository
from tests.e2e.tuf_helpers import (
    Device,
    Mirror,
    forge,
    release,
    run_cli,
    running_device,
    serve_mirror,
    serve_origin,
    signers,
)
from tests.test_agent_mqtt import score
from tests.test_store import script_bundle

pytestmark = pytest.mark.e2e


@pytest.fixture
def repo(signing_key: SigningKey, edgedeploy_home: Path) -> TufRepository:
    """A TUF repository with the defaults (targets: 2 of 3 keys) beside the bundle store."""
    return TufRepository.init()


@pytest.fixture
def origin(repo: TufRepository) -> Iterator[str]:
    with serve_origin(repo.home) as url:
        yield url


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Mirror]:
    with serve_mirror(tmp_path / "mirror") as served:
        yield served


@pytest.fixture
def device(mqtt_broker: Any, repo: TufRepository, tmp_path: Path) -> Iterator[Device]:
    with running_device(mqtt_broker, repo, tmp_path / "device") as agent:
        yield agent


@pytest.fixture
def serving_v1(device: Device, origin: str, signing_key: SigningKey, tmp_path: Path) -> Path:
    """Version 1, installed from the honest server: the device now holds the repository's metadata."""
    v1 = release(tmp_path, signing_key, 1)
    device.install(origin, v1, 1, "d-1")
    return v1


def wait_expired(metadata_file: Path) -> None:
    """Until the metadata in ``metadata_file`` has expired (its lifetime was set to seconds)."""
    expires = Metadata.from_file(str(metadata_file)).signed.expires
    deadline = time.monotonic() + 60
    while datetime.now(UTC) <= expires:
        assert time.monotonic() < deadline, f"{metadata_file} never expired ({expires})"
        time.sleep(0.2)


def test_freeze_an_expired_timestamp_kept_served_is_refused(
        device: Device, serving_v1: Path, repo: TufRepository, origin: str, mirror: Mirror,
        signing_key: SigningKey, tmp_path: Path) -> None:
    v2 = release(tmp_path, signing_key, 2)
    repo.publish({"timestamp": timedelta(seconds=2)})
    mirror.copy(repo.home)  # the attacker keeps this copy, v2 listed, while its timestamp runs out
    repo.publish()
    wait_expired(mirror.metadata / "timestamp.json")
    device.refused(mirror.url, v2, 2, "d-2", 1, "timestamp.json is expired", "frozen")
    device.install(origin, v2, 2, "d-3")  # the honest server, re-signed in time, still works


def test_rollback_to_older_validly_signed_metadata_is_refused(
        device: Device, serving_v1: Path, repo: TufRepository, origin: str, mirror: Mirror,
        signing_key: SigningKey, tmp_path: Path) -> None:
    mirror.copy(repo.home)  # the attacker's copy from the days of version 1: signed, not expired
    v2 = release(tmp_path, signing_key, 2)
    device.install(origin, v2, 2, "d-2")  # the device has seen newer metadata since
    v3 = release(tmp_path, signing_key, 3)
    error = device.refused(mirror.url, v3, 3, "d-3", 2, "timestamp version", "rollback")
    assert "must be >=" in error


def test_mix_and_match_a_snapshot_or_targets_from_another_release_is_refused(
        device: Device, serving_v1: Path, repo: TufRepository, mirror: Mirror, signing_key: SigningKey,
        tmp_path: Path) -> None:
    v2 = release(tmp_path, signing_key, 2)
    mirror.copy(repo.home)
    snapshot, targets = repo.snapshot().signed, repo.targets().signed
    current = mirror.metadata / f"{snapshot.version}.snapshot.json"
    kept = current.read_bytes()
    current.write_bytes((mirror.metadata / f"{snapshot.version - 1}.snapshot.json").read_bytes())
    device.refused(mirror.url, v2, 2, "d-2", 1, "snapshot", "mix-and-match")
    current.write_bytes(kept)  # the right snapshot, but the targets of the release before
    listed = mirror.metadata / f"{targets.version}.targets.json"
    listed.write_bytes((mirror.metadata / f"{targets.version - 1}.targets.json").read_bytes())
    device.refused(mirror.url, v2, 2, "d-3", 1, "mix-and-match")


def test_arbitrary_bytes_under_the_target_name_or_an_unlisted_bundle_are_refused(
        device: Device, serving_v1: Path, repo: TufRepository, origin: str, mirror: Mirror,
        signing_key: SigningKey, tmp_path: Path) -> None:
    v2 = release(tmp_path, signing_key, 2)
    mirror.copy(repo.home)
    served = mirror.folder / "bundles" / f"{bundle_sha256(v2)}.edb"
    served.write_bytes(os.urandom(served.stat().st_size))  # exactly the target's length
    device.refused(mirror.url, v2, 2, "d-2", 1, "sha256", "refused")
    served.write_bytes(serving_v1.read_bytes())  # an older bundle, validly signed, under the new name
    device.refused(mirror.url, v2, 2, "d-3", 1, "refused")
    unlisted = script_bundle(tmp_path / "v3.edb", signing_key, 3)  # signed, and on the server, never listed
    shutil.copyfile(unlisted, repo.home / "bundles" / f"{bundle_sha256(unlisted)}.edb")
    device.refused(origin, unlisted, 3, "d-4", 1, "is not a target")


def test_endless_data_is_cut_off_at_the_target_length(
        device: Device, serving_v1: Path, repo: TufRepository, mirror: Mirror, signing_key: SigningKey,
        tmp_path: Path) -> None:
    v2 = release(tmp_path, signing_key, 2)
    mirror.copy(repo.home)
    mirror.endless.add(f"/bundles/{bundle_sha256(v2)}.edb")  # no length, never ends
    length = repo.targets().signed.targets[f"bundles/{bundle_sha256(v2)}.edb"].length
    device.refused(mirror.url, v2, 2, "d-2", 1, f"runs past the {length} bytes", "endless data")


def test_after_rotating_targets_keys_metadata_signed_by_a_revoked_key_is_refused(
        device: Device, serving_v1: Path, repo: TufRepository, mirror: Mirror, signing_key: SigningKey,
        tmp_path: Path) -> None:
    stolen = signers(repo.home, "targets")  # the attacker copied the targets keys
    rotated = run_cli("packager.cli.main", "keys", "rotate", "targets")
    assert rotated.returncode == 0, rotated.stderr
    assert not {s.public_key.keyid for s in stolen} & set(repo.root().signed.roles["targets"].keyids)
    v2 = release(tmp_path, signing_key, 2)
    mirror.copy(repo.home)  # an honest static copy: the device learns root v2 through it
    device.install(mirror.url, v2, 2, "d-2")
    withdrawn = script_bundle(tmp_path / "v3.edb", signing_key, 3)  # signed, never released
    forge(mirror, withdrawn, stolen, repo.home)
    device.refused(mirror.url, withdrawn, 3, "d-3", 2, "targets was signed by 0/2 keys", "revoked")


def test_targets_signed_by_one_of_the_two_keys_required_is_refused(
        device: Device, serving_v1: Path, repo: TufRepository, mirror: Mirror, signing_key: SigningKey,
        tmp_path: Path) -> None:
    keys = signers(repo.home, "targets")
    unreleased = script_bundle(tmp_path / "v2.edb", signing_key, 2)
    mirror.copy(repo.home)
    forge(mirror, unreleased, keys[:1], repo.home)  # one stolen key is not enough
    device.refused(mirror.url, unreleased, 2, "d-2", 1, "targets was signed by 1/2 keys")
    forge(mirror, unreleased, keys[:2], repo.home)  # with the threshold of keys, the same forgery passes
    device.install(mirror.url, unreleased, 2, "d-3")


def test_fleet_rollout_through_edgedeploy_serve_lists_the_bundle_and_devices_fetch_it_through_tuf(
        repo: TufRepository, bundle_server: Any, agents: Any, mqtt_broker: Any, signing_key: SigningKey,
        tmp_path: Path) -> None:
    from packager.fleet import FleetController
    from tests.e2e.test_fleet import score as score_row
    from tests.e2e.test_fleet import wait_fleet

    repo.export_root(tmp_path / "root.json")
    fleet = agents(2, tuf_root=str(tmp_path / "root.json"))
    ids = [a.device_id for a in fleet]
    v1 = script_bundle(tmp_path / "v1.edb", signing_key, 1)
    with FleetController(mqtt_broker.url) as ctl:
        wait_fleet(ctl, ids, lambda r: r["online"], timeout=120)
        rollout_id = ctl.rollout(v1, "all", bundle_server.url, canary=0, wave="100%", wait=True, wave_timeout=120)
        assert ctl.status(rollout_id)["state"] == "succeeded"
        rows = wait_fleet(ctl, ids, lambda r: r["state"] == "active" and r["model_version"] == 1)
        assert all(score_row(row) == {"version": 1} for row in rows)
    listed = {t["sha256"]: t["model"] for t in repo.status()["targets"]}
    assert listed == {bundle_sha256(v1): {"name": "scorer", "version": 1}}
    assert all((a.data_dir / "tuf" / "timestamp.json").is_file() for a in fleet)  # fetched through TUF


# --- offline install ------------------------------------------------------------------------------

def agent_install(source: Path, device: Device) -> tuple[int, list[str], str]:
    """``edge-agent install SOURCE --config agent.yaml``: (exit code, stderr lines, stdout)."""
    result = run_cli("edge_agent.cli", "install", str(source), "--config", str(device.config))
    return result.returncode, result.stderr.strip().splitlines(), result.stdout


def test_offline_export_install_refusals_and_the_report_when_the_broker_returns(
        device: Device, serving_v1: Path, repo: TufRepository, origin: str, mqtt_broker: Any,
        signing_key: SigningKey, tmp_path: Path) -> None:
    v2 = script_bundle(tmp_path / "v2.edb", signing_key, 2)
    device.stop()
    mqtt_broker.stop()  # the device is cut off: a USB stick is the way in
    running = (device.config.parent / "data" / "models" / "scorer" / "store.json").read_bytes()

    stale = tmp_path / "stale"
    assert run_cli("packager.cli.main", "bundle", "export", str(v2), "--for-offline", "-o", str(stale),
                   "--valid-for", "2s").returncode == 0
    repo.publish()
    stick = tmp_path / "stick"
    exported = run_cli("packager.cli.main", "bundle", "export", str(v2), "--for-offline", "-o", str(stick))
    assert exported.returncode == 0, exported.stderr
    assert {p.name for p in stick.iterdir()} == {"README.txt", "manifest.json", "bundles", "metadata"}

    tampered = tmp_path / "tampered"
    shutil.copytree(stick, tampered)
    bundle = next((tampered / "bundles").iterdir())
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bundle.write_bytes(bytes(data))
    code, errors, _ = agent_install(tampered, device)
    assert code == 1 and len(errors) == 1 and errors[0].startswith("error: refused") and "tampered" in errors[0]
    wait_expired(stale / "metadata" / "timestamp.json")
    code, errors, _ = agent_install(stale, device)
    assert code == 1 and len(errors) == 1 and "timestamp.json is expired" in errors[0], errors
    store = device.config.parent / "data" / "models" / "scorer" / "store.json"
    assert store.read_bytes() == running  # neither refusal touched the installed model

    code, errors, out = agent_install(stick, device)
    assert code == 0, errors
    assert out.startswith("installed scorer version 2")

    device.observer.ready.clear()
    mqtt_broker.start()
    assert device.observer.ready.wait(60)  # the test's observer is back before the device reports
    restarted = time.time()
    device.start()
    report = device.observer.wait("reported", lambda m: m["ts"] >= restarted and m["state"] == "active"
                                  and m["deployment_id"].startswith("offline-"), timeout=120)
    assert report["active"]["version"] == 2 and report["refused"] is None
    assert score(report["http_port"]) == {"version": 2}
    offline_id = report["deployment_id"]
    assert device.events(offline_id, "active") == [None]  # the install's own events, sent on reconnect
    refusals = device.events(None, "refused")
    assert any("tampered" in (reason or "") for reason in refusals)

    v3 = release(tmp_path, signing_key, 3)  # the controller's next order applies as usual
    device.install(origin, v3, 3, "d-3")
    with device.observer.changed:  # the retained order of v1 was redelivered, and not applied again
        assert not [e for e in device.observer.events if e["deployment_id"] == "d-1" and e["ts"] >= restarted]
