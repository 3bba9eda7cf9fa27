"""Signing keys and the trust store (packager/keys.py) through the API and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.errors import AlreadyExistsError, NotFoundError, UsageError, ValidationError
from packager import keys


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "packager.cli.main", *args], capture_output=True, text=True)


def test_generated_key_is_private_and_trusted_locally(edgedeploy_home: Path) -> None:
    key = keys.generate_key()
    key_file = edgedeploy_home / "keys" / "default.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key.key_id in keys.TrustStore.local()
    signature = key.sign(b"manifest")
    assert keys.TrustStore.local().verify(key.key_id, signature, b"manifest")
    assert not keys.TrustStore.local().verify(key.key_id, signature, b"manifest!")


def test_signatures_are_deterministic() -> None:
    key = keys.generate_key("ci")
    assert key.sign(b"same bytes") == keys.load_signing_key("ci").sign(b"same bytes")


def test_generate_refuses_to_overwrite_and_bad_names() -> None:
    keys.generate_key("release")
    with pytest.raises(AlreadyExistsError):
        keys.generate_key("release")
    with pytest.raises(UsageError):
        keys.generate_key("../escape")


def test_missing_signing_key_fails_closed() -> None:
    with pytest.raises(NotFoundError, match="keys generate"):
        keys.load_signing_key()


def test_export_and_trust_on_another_machine(tmp_path: Path) -> None:
    publisher = keys.generate_key("publisher")
    exported = tmp_path / "publisher.pub"
    assert keys.export_public_key(exported, "publisher") == publisher.key_id
    device_home = tmp_path / "device-home"
    assert publisher.key_id not in keys.TrustStore.local(device_home)
    assert keys.trust_key(exported, device_home) == publisher.key_id
    assert publisher.key_id in keys.TrustStore.local(device_home)
    assert publisher.key_id in keys.TrustStore.from_files([exported])


def test_trusting_a_file_that_is_not_a_key_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key")
    with pytest.raises(ValidationError):
        keys.trust_key(junk)
    with pytest.raises(NotFoundError):
        keys.trust_key(tmp_path / "absent.pub")


def test_cli_keys_roundtrip(tmp_path: Path) -> None:
    assert cli("keys", "generate", "--name", "lab").returncode == 0
    listed = json.loads(cli("keys", "list", "--json").stdout)
    kinds = sorted((row["kind"], row["name"]) for row in listed)
    assert ("signing", "lab") in kinds
    assert any(kind == "trusted" for kind, _ in kinds)
    out = tmp_path / "lab.pub"
    assert cli("keys", "export", "--name", "lab", "-o", str(out)).returncode == 0
    assert out.read_text().startswith("edgedeploy-role: publisher\n-----BEGIN PUBLIC KEY-----")
    assert ("orders", "controller") in sorted((row["kind"], row["name"]) for row in
                                              json.loads(cli("keys", "list", "--json").stdout))


def test_export_writes_publisher_and_order_keys_by_role_and_neither_stands_in_for_the_other(
        tmp_path: Path) -> None:
    from edge_agent.trust import ORDERS, PUBLISHER, load_role_keys

    publisher = keys.generate_key()
    orders = keys.load_order_key()
    assert orders.key_id != publisher.key_id and keys.load_order_key().key_id == orders.key_id
    exported = tmp_path / "device.pub"
    keys.export_public_key(exported)
    assert [role for role, _ in load_role_keys(exported)] == [PUBLISHER, ORDERS]
    bundles = keys.TrustStore.from_files([exported])
    order_trust = keys.TrustStore.from_files([exported], role=ORDERS)
    assert bundles.key_ids == [publisher.key_id] and order_trust.key_ids == [orders.key_id]
    assert orders.key_id not in keys.TrustStore.local()  # the order key never signs bundles here
    device_home = tmp_path / "device-home"
    assert keys.trust_key(exported, device_home) == publisher.key_id
    assert keys.TrustStore.local(device_home).key_ids == [publisher.key_id]
    legacy = tmp_path / "legacy.pub"  # exported before roles: one unmarked block, a publisher key
    legacy.write_bytes(exported.read_bytes().split(b"edgedeploy-role: orders")[0].split(b"\n", 1)[1])
    assert keys.TrustStore.from_files([legacy]).key_ids == [publisher.key_id]
    assert keys.TrustStore.from_files([legacy], role=ORDERS).key_ids == []
    odd = tmp_path / "odd.pub"
    odd.write_bytes(exported.read_bytes().replace(b"role: orders", b"role: root"))
    with pytest.raises(ValidationError, match="unknown key role 'root'"):
        keys.TrustStore.from_files([odd])


def test_cli_key_errors_are_one_line() -> None:
    result = cli("keys", "export", "--name", "nobody", "-o", "/tmp/x.pub")
    assert result.returncode == 1
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1
    result = cli("keys", "trust", "/definitely/not/here.pub")
    assert result.returncode == 1 and "not found" in result.stderr
