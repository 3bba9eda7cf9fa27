"""Offline export and install (packager/offline.py, edge_agent/offline.py) without a broker: a bare bundle
on a device without tuf_root, the data_dir lock, and the folders a device with tuf_root refuses. The
install through the real daemon, with the report when the broker returns, is in tests/e2e/test_tuf_attacks.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.config import AgentConfig, parse_agent_config
from edge_agent.errors import AlreadyExistsError, DeploymentError, UpdateMetadataError
from edge_agent.fleet_messages import DeployState
from edge_agent.offline import install
from edge_agent.outbox import DataDirLock, event_outbox
from packager.keys import SigningKey, export_public_key
from packager.offline import export_offline
from packager.tuf_repo import TufRepository
from tests.test_store import script_bundle


def device(tmp_path: Path, **settings: object) -> AgentConfig:
    export_public_key(tmp_path / "publisher.pub")
    return parse_agent_config({"device_id": "dev-offline", "broker": "mqtt://127.0.0.1:1", "data_dir": "data",
                               "trusted_keys": ["publisher.pub"], "http_port": 0, "grpc_port": 0, **settings},
                              base=tmp_path)


def test_a_bare_bundle_installs_on_a_device_without_tuf_root_and_waits_in_the_outbox(
        signing_key: SigningKey, tmp_path: Path) -> None:
    config = device(tmp_path)
    report = install(config, script_bundle(tmp_path / "v1.edb", signing_key, 1))
    assert report.state == DeployState.ACTIVE and report.active is not None and report.active.version == 1
    queued = event_outbox(config.data_dir).peek()
    assert [e["to"] for e in queued] == ["downloading", "verifying", "installing", "health-checking", "active"]
    assert {e["deployment_id"] for e in queued} == {report.deployment_id}
    with pytest.raises(DeploymentError, match="lower than the active version 1"):
        install(config, script_bundle(tmp_path / "v0.edb", signing_key, 0))
    assert install(config, tmp_path / "v0.edb", allow_downgrade=True).active.version == 0  # type: ignore[union-attr]


def test_install_refuses_while_the_daemon_holds_the_data_dir(signing_key: SigningKey, tmp_path: Path) -> None:
    config = device(tmp_path)
    with DataDirLock(config.data_dir, "the edge agent daemon dev-offline"), \
            pytest.raises(DeploymentError, match="in use by the edge agent daemon dev-offline .pid"):
        install(config, script_bundle(tmp_path / "v1.edb", signing_key, 1))
    assert not (config.data_dir / "models" / "scorer").exists()


def test_a_device_with_tuf_root_refuses_a_bare_bundle_and_an_export_without_metadata(
        signing_key: SigningKey, tmp_path: Path) -> None:
    bundle = script_bundle(tmp_path / "v1.edb", signing_key, 1)
    without = export_offline(bundle, tmp_path / "no-repo")  # no `repo init` here: the folder says so
    assert without["metadata"] is None and "refuses this folder" in (tmp_path / "no-repo" / "README.txt").read_text()
    repo = TufRepository.init()
    repo.export_root(tmp_path / "root.json")
    config = device(tmp_path, tuf_root="root.json")
    for source in (bundle, tmp_path / "no-repo"):
        with pytest.raises(UpdateMetadataError, match="requires TUF metadata"):
            install(config, source)
    refusals = event_outbox(config.data_dir).peek()
    assert [e["to"] for e in refusals] == ["refused", "refused"] and refusals[0]["model"] is None
    with pytest.raises(AlreadyExistsError, match="not empty"):
        export_offline(bundle, tmp_path / "no-repo")
    exported = export_offline(bundle, tmp_path / "stick")
    manifest = json.loads((tmp_path / "stick" / "manifest.json").read_text())
    assert manifest == exported and manifest["metadata"] == "metadata" and manifest["model"]["version"] == 1
    assert install(config, tmp_path / "stick").state == DeployState.ACTIVE
