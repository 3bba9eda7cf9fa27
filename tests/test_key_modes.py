"""Every key, token and Secret that edgedeploy writes is readable by its owner only (mode 0600).

Public halves (certificates, public keys, the ACL) stay 0644 so a broker or device user reads them.
"""

from __future__ import annotations

import stat
from pathlib import Path

from edge_agent.auth import create_token_file, generate_keys
from packager.fleet_ca import FleetCA
from packager.keys import generate_key
from packager.targets.kubernetes import KubernetesOptions, render_manifests, trusted_public_keys, write_manifests
from packager.targets.store import ServiceStore


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_keys_tokens_and_secrets_are_mode_0600(edgedeploy_home: Path, tmp_path: Path) -> None:
    generate_key("release")
    ca = FleetCA()
    ca.init()
    device = ca.enroll("dev-1", tmp_path / "dev")
    controller = ca.enroll("ops", tmp_path / "ops", role="controller")
    ca.write_broker_config(tmp_path / "broker", ["broker.local"])
    create_token_file(tmp_path / "bundle.token")
    ServiceStore().write_keys("fraud", generate_keys())
    options = KubernetesOptions(name="fraud", image="edgedeploy/fraud:1", bundle_url="http://b/fraud.edb",
                                bundle_sha256="ab" * 32, auth=True, trusted_keys=trusted_public_keys())
    write_manifests(render_manifests(options), tmp_path / "manifests")

    private = [edgedeploy_home / "keys" / "release.key", edgedeploy_home / "keys" / "orders" / "controller.key",
               ca.key_path, device.key, controller.key, tmp_path / "broker" / "server.key", tmp_path / "bundle.token",
               edgedeploy_home / "services" / "fraud" / "keys.json", tmp_path / "manifests" / "all.yaml",
               tmp_path / "manifests" / "kserve.yaml", *(tmp_path / "manifests").glob("*-secret-*.yaml")]
    assert len(private) == 11  # one Secret manifest of its own
    assert {str(p): oct(mode(p)) for p in private} == {str(p): "0o600" for p in private}
    assert mode(ca.folder) == 0o700
    public = [ca.cert_path, device.certificate, device.ca, tmp_path / "broker" / "acl",
              *(tmp_path / "manifests").glob("*-deployment-*.yaml")]
    assert all(mode(p) == 0o644 for p in public), {str(p): oct(mode(p)) for p in public}
