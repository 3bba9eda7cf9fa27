"""TLS on both servers, with a self-signed certificate made in the test."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from packager.examples import DigitsData
from packager.keys import SigningKey
from tests.servers import digits_bundle, serving


def _self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    cert, private = folder / "server.crt", folder / "server.key"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, private


def test_grpc_and_rest_over_tls(digits_mlp: Path, digits: DigitsData, signing_key: SigningKey,
                                tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    bundle = digits_bundle(digits_mlp, digits, tmp_path)
    x = digits.x_test[:2]
    with serving(tmp_path / "work", [bundle], tls_cert=cert, tls_key=key) as running:
        context = ssl.create_default_context(cafile=str(cert))
        request = urllib.request.Request(f"https://127.0.0.1:{running.http_port}/score",
                                         data=json.dumps({"data": x.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            assert json.loads(response.read())["label"] == digits.y_test[:2].tolist()
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP is not served
            urllib.request.urlopen(f"http://127.0.0.1:{running.http_port}/v2/health/live", timeout=5)

        client = grpcclient.InferenceServerClient(f"localhost:{running.grpc_port}", ssl=True,
                                                  root_certificates=str(cert))
        try:
            tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            np.testing.assert_array_equal(client.infer("digits", [tensor]).as_numpy("label"), digits.y_test[:2])
        finally:
            client.close()
