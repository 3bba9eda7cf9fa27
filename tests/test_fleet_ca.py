"""The fleet CA: what it issues, the names it refuses, the broker files and the CLI's error lines.

Mosquitto taking these files, and the ACL holding, is tests/e2e/test_broker_tls.py.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.broker_tls import BrokerTLS
from edge_agent.errors import AlreadyExistsError, NotFoundError, UsageError
from packager.fleet_ca import FleetCA, broker_acl

ROOT = Path(__file__).resolve().parents[1]


def edgedeploy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "packager.cli.main", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def common_name(certificate: x509.Certificate) -> str:
    return str(certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


@pytest.mark.parametrize("key_type", ["p256", "ed25519"])
def test_a_device_certificate_names_the_device_is_signed_by_the_ca_and_only_for_clients(
        key_type: str, edgedeploy_home: Path, tmp_path: Path) -> None:
    ca = FleetCA()
    ca.init(key_type=key_type)
    enrollment = ca.enroll("pi-kitchen-01", tmp_path / "dev", days=30)
    certificate, authority = load(enrollment.certificate), load(ca.cert_path)
    certificate.verify_directly_issued_by(authority)
    assert common_name(certificate) == "pi-kitchen-01"
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (certificate.not_valid_after_utc - certificate.not_valid_before_utc).days == 30
    expected = Ed25519PublicKey if key_type == "ed25519" else ec.EllipticCurvePublicKey
    assert isinstance(certificate.public_key(), expected)
    assert enrollment.ca.read_bytes() == ca.cert_path.read_bytes()
    BrokerTLS(enrollment.ca, enrollment.certificate, enrollment.key).check()  # the key is the certificate's
    assert ca.identities()["pi-kitchen-01"]["role"] == "device"
    assert ca.show()["key_type"] == key_type


def test_one_name_one_role_bad_names_and_no_ca_are_refused(edgedeploy_home: Path, tmp_path: Path) -> None:
    ca = FleetCA()
    with pytest.raises(NotFoundError, match="fleet ca init"):
        ca.enroll("dev-1", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    ca.init()
    with pytest.raises(AlreadyExistsError):
        ca.init()
    ca.enroll("ops", tmp_path / "ops", role="controller")
    with pytest.raises(UsageError, match="enrolled as a controller"):
        ca.enroll("ops", tmp_path / "dev")
    ca.enroll("dev-1", tmp_path / "dev")
    with pytest.raises(UsageError, match="enrolled as a device"):
        ca.enroll("dev-1", tmp_path / "ctl", role="controller")
    for bad in ("a/b", "dev+1", "#", "", "x" * 200):
        with pytest.raises(UsageError, match="invalid device id"):
            ca.enroll(bad, tmp_path / "bad")
    with pytest.raises(UsageError, match="--days"):
        ca.enroll("dev-2", tmp_path / "dev2", days=0)
    again = ca.enroll("dev-1", tmp_path / "dev")  # a new certificate for the same device
    assert ca.identities()["dev-1"]["serial"] == again.serial
    assert ca.controllers() == ["ops"]


def test_the_broker_files_name_its_hosts_and_give_controllers_every_topic(edgedeploy_home: Path,
                                                                          tmp_path: Path) -> None:
    ca = FleetCA()
    ca.init()
    ca.enroll("ops", tmp_path / "ops", role="controller")
    paths = ca.write_broker_config(tmp_path / "broker", ["broker.example.org", "10.0.0.5"], port=8884,
                                   bind="10.0.0.5", prefix="acme", install_dir=Path("/etc/mosquitto/edgedeploy"))
    assert sorted(p.name for p in paths) == ["acl", "ca.crt", "mosquitto.conf", "server.crt", "server.key"]
    server = load(tmp_path / "broker" / "server.crt")
    server.verify_directly_issued_by(load(ca.cert_path))
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["broker.example.org"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]  # it cannot stand in for a client
    conf = (tmp_path / "broker" / "mosquitto.conf").read_text().splitlines()
    for line in ("listener 8884 10.0.0.5", "require_certificate true", "use_identity_as_username true",
                 "allow_anonymous false", "acl_file /etc/mosquitto/edgedeploy/acl",
                 "keyfile /etc/mosquitto/edgedeploy/server.key"):
        assert line in conf
    acl = (tmp_path / "broker" / "acl").read_text().splitlines()
    assert acl[acl.index("user ops") + 1] == "topic readwrite acme/#"
    rules = [line for line in acl if line and not line.startswith("#") and not line.startswith("user ")]
    assert rules == ["topic readwrite acme/#", "pattern read acme/devices/%u/desired",
                     "pattern read acme/devices/%u/requests", "pattern write acme/devices/%u/reported",
                     "pattern write acme/devices/%u/status", "pattern write acme/devices/%u/telemetry",
                     "pattern write acme/devices/%u/events", "pattern write acme/devices/%u/responses"]
    with pytest.raises(UsageError, match="--hostname"):
        ca.write_broker_config(tmp_path / "b2", [])
    with pytest.raises(UsageError, match="bad --hostname"):
        ca.write_broker_config(tmp_path / "b2", ["bad host"])
    with pytest.raises(UsageError, match="topic prefix"):
        broker_acl("a/#")


def test_cli_enroll_prints_the_agent_yaml_lines_and_bad_input_is_one_error_line(edgedeploy_home: Path,
                                                                                 tmp_path: Path) -> None:
    missing = edgedeploy("fleet", "enroll", "dev-1", "-o", str(tmp_path / "d"))
    assert missing.returncode == 1 and missing.stderr.strip().count("\n") == 0
    assert missing.stderr.startswith("error: no fleet CA here yet")
    assert edgedeploy("fleet", "ca", "init", "--key-type", "ed25519").returncode == 0
    done = edgedeploy("fleet", "--broker", "mqtts://broker.local:8883", "enroll", "dev-1", "-o", str(tmp_path / "d"))
    assert done.returncode == 0, done.stderr
    assert "broker: mqtts://broker.local:8883\nca_file: ca.crt\ntls_cert: device.crt\ntls_key: device.key\n" \
        in done.stdout
    for args, code in ((["fleet", "enroll", "-o", str(tmp_path / "e")], 2),
                       (["fleet", "enroll", "dev-2", "--controller", "ops", "-o", str(tmp_path / "e")], 2),
                       (["fleet", "enroll", "no/slash", "-o", str(tmp_path / "e")], 2),
                       (["fleet", "ca", "init"], 1),
                       (["fleet", "broker-config", "-o", str(tmp_path / "b"), "--hostname", "x", "--port", "0"], 2)):
        result = edgedeploy(*args)
        assert result.returncode == code and result.stderr.startswith("error: "), (args, result.stderr)
        assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    shown = json.loads(edgedeploy("fleet", "ca", "show", "--json").stdout)
    assert shown["key_type"] == "ed25519" and [i["name"] for i in shown["identities"]] == ["dev-1"]
    acl = edgedeploy("fleet", "acl")
    assert "pattern write edgedeploy/devices/%u/reported" in acl.stdout
