"""A client's broker TLS files are checked before use: each problem is one line naming the file.

These run through agent.yaml (``parse_agent_config``, ``edge-agent --check``) and the controller's
options; connecting with the files to a real Mosquitto is tests/e2e/test_broker_tls.py.
"""

from __future__ import annotations

import datetime
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge_agent.broker_tls import BrokerTLS, redact_url
from edge_agent.config import parse_agent_config
from edge_agent.errors import UsageError, ValidationError
from packager.fleet import FleetController, broker_tls
from packager.fleet_ca import Enrollment, FleetCA

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def enrolled(edgedeploy_home: Path, tmp_path: Path) -> Enrollment:
    ca = FleetCA()
    ca.init()
    return ca.enroll("dev-1", tmp_path / "dev")


def agent(folder: Path, **settings: Any) -> dict[str, Any]:
    return {"device_id": "dev-1", "broker": "mqtts://broker.local:8883", "data_dir": str(folder / "data"),
            "ca_file": "ca.crt", "tls_cert": "device.crt", "tls_key": "device.key", **settings}


def refusal(document: dict[str, Any], folder: Path) -> str:
    with pytest.raises(ValidationError) as caught:
        parse_agent_config(document, base=folder, source="agent.yaml")
    return str(caught.value)


def expired_certificate(key_file: Path, out: Path) -> None:
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(1).not_valid_before(now - datetime.timedelta(days=10))
                   .not_valid_after(now - datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    out.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def test_an_enrolled_identity_passes_and_its_paths_resolve_beside_agent_yaml(enrolled: Enrollment) -> None:
    folder = enrolled.certificate.parent
    (folder / "token").write_text("# the bundle server's token\nsecret-token\n")
    config = parse_agent_config(agent(folder, bundle_token_file="token"), base=folder)
    assert config.tls_cert == enrolled.certificate and config.tls_key == enrolled.key
    assert config.broker_identity.identity() == "dev-1"
    assert config.broker_identity.context().verify_mode.name == "CERT_REQUIRED"


def test_each_bad_file_is_one_error_naming_it(enrolled: Enrollment, tmp_path: Path) -> None:
    folder = enrolled.certificate.parent
    other = FleetCA(tmp_path / "other-home")
    other.init()
    stranger = other.enroll("dev-1", tmp_path / "other")
    (folder / "garbage.pem").write_text("not a certificate\n")
    encrypted = serialization.load_pem_private_key(enrolled.key.read_bytes(), password=None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw"))
    (folder / "encrypted.key").write_bytes(encrypted)
    expired_certificate(enrolled.key, folder / "expired.crt")
    (folder / "empty.token").write_text("\n# nothing\n")
    cases = {
        "tls_key .*missing.key does not exist": {"tls_key": "missing.key"},
        "tls_cert .*data cannot be read": {"tls_cert": "data"},  # a folder: unreadable as a file
        "tls_cert .*garbage.pem holds no PEM certificate": {"tls_cert": "garbage.pem"},
        "ca_file .*garbage.pem holds no PEM certificate": {"ca_file": "garbage.pem"},
        "tls_key .*device.key is not the key of tls_cert .*device.crt": {"tls_key": str(stranger.key)},
        "tls_key .*encrypted.key is encrypted": {"tls_key": "encrypted.key"},
        "tls_cert .*expired.crt expired on": {"tls_cert": "expired.crt"},
        "tls_key .*holds no PEM private key": {"tls_key": "device.crt"},
        "tls_cert and tls_key go together": {"tls_key": None},
        "tls_cert and tls_key need an mqtts:// broker": {"broker": "mqtt://broker.local:1883"},
        "password as the password key, not in the URL": {"broker": "mqtts://dev-1:pw@broker.local:8883"},
        "token file .*empty.token holds no token": {"bundle_token_file": "empty.token"},
        "token file .*absent does not exist": {"bundle_token_file": "absent"},
    }
    (folder / "data").mkdir()
    for expected, settings in cases.items():
        message = refusal(agent(folder, **settings), folder)
        assert message.startswith("agent.yaml: ") and "\n" not in message, message
        assert re.search(expected, message), (expected, message)


def test_edge_agent_check_prints_one_error_line_for_a_key_that_is_not_the_certificates(
        enrolled: Enrollment, tmp_path: Path) -> None:
    folder = enrolled.certificate.parent
    other = FleetCA(tmp_path / "other-home")
    other.init()
    stranger = other.enroll("dev-2", tmp_path / "other")
    config = folder / "agent.yaml"
    config.write_text(yaml.safe_dump(agent(folder, tls_key=str(stranger.key))))
    result = subprocess.run([sys.executable, "-m", "edge_agent.cli", "--config", str(config), "--check"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.strip().count("\n") == 0, result.stderr
    assert "is not the key of tls_cert" in result.stderr
    assert stranger.key.read_text().splitlines()[1] not in result.stderr
    config.write_text(yaml.safe_dump(agent(folder)))
    good = subprocess.run([sys.executable, "-m", "edge_agent.cli", "--config", str(config), "--check"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert good.returncode == 0, good.stderr


def test_the_controller_takes_its_files_from_options_or_the_environment(enrolled: Enrollment,
                                                                        tmp_path: Path) -> None:
    folder = enrolled.certificate.parent
    env = {"EDGEDEPLOY_BROKER_CA": str(enrolled.ca), "EDGEDEPLOY_BROKER_CERT": str(enrolled.certificate),
           "EDGEDEPLOY_BROKER_KEY": str(enrolled.key)}
    assert broker_tls(environ=env) == BrokerTLS(enrolled.ca, enrolled.certificate, enrolled.key)
    assert broker_tls(ca_file=folder / "other.crt", environ=env).ca_file == folder / "other.crt"
    with pytest.raises(ValidationError, match="--tls-cert and --tls-key go together"):
        FleetController("mqtts://127.0.0.1:1", tls=broker_tls(key_file=None, environ={
            "EDGEDEPLOY_BROKER_CERT": str(enrolled.certificate)})).devices()
    with pytest.raises(UsageError, match="use mqtts://"):
        FleetController("mqtt://127.0.0.1:1", tls=broker_tls(environ=env)).devices()


def test_redact_url_hides_only_the_password() -> None:
    assert redact_url("mqtts://ops:s3cret@broker:8883/x") == "mqtts://ops:***@broker:8883/x"
    assert redact_url("mqtts://ops@broker:8883") == "mqtts://ops@broker:8883"
    assert redact_url("mqtt://broker:1883") == "mqtt://broker:1883"
    assert redact_url("mqtts://o:p:q@h") == "mqtts://o:***@h"
