"""Whole flow through the command line: ``edgedeploy deploy`` a signed bundle, score it, inspect,
rotate keys, hot-swap a new version under load, read logs and delete; and bad input on every command.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from packager.keys import generate_key
from packager.packaging import package
from tests.test_services import (
    SAMPLE,
    force_kill,
    make_bundle,
    no_process,
    post,
    probabilities,
    reference,
    sharper_model,
)

pytestmark = pytest.mark.e2e


def edgedeploy(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``edgedeploy`` as users do, in this test's EDGEDEPLOY_HOME."""
    result = subprocess.run([sys.executable, "-m", "packager.cli.main", *args],
                            capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def edge_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent.cli", *args],
                          capture_output=True, text=True, timeout=60)


def assert_one_error_line(result: subprocess.CompletedProcess[str], code: int = 1) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def bundles(edgedeploy_home: Path, digits_mlp: Path, tmp_path: Path) -> dict[str, Path]:
    """v1 made by the packager itself (``edgedeploy package``'s twin), v2 a re-trained stand-in."""
    key = generate_key()
    model_v2 = sharper_model(digits_mlp, tmp_path / "v2.onnx")
    v1 = package(digits_mlp, "cpu-x86_64", tmp_path / "digits-v1.edb", name="digits").bundle_path
    return {
        "v1": v1,
        "v2": make_bundle(tmp_path / "digits-v2.edb", model_v2, key, version=2),
        "model_v1": digits_mlp,
        "model_v2": model_v2,
    }


@pytest.fixture
def deployed(bundles: dict[str, Path]) -> Iterator[dict[str, Any]]:
    """``edgedeploy deploy`` with free ports and auth off (loopback); always cleaned up."""
    result = edgedeploy("deploy", "digits", "--bundle", str(bundles["v1"]), "--port", "0")
    shown = json.loads(edgedeploy("service", "show", "digits", "--json").stdout)
    try:
        assert result.stdout.strip() == shown["scoring_uri"]
        yield shown
    finally:
        edgedeploy("service", "delete", "digits", check=False)
        force_kill(shown.get("pid"))


def test_cli_lifecycle(deployed: dict[str, Any], bundles: dict[str, Path], edgedeploy_home: Path) -> None:
    assert deployed["state"] == "healthy" and deployed["auth_enabled"] is False
    assert deployed["swagger_uri"].endswith("/swagger.json")
    listed = json.loads(edgedeploy("service", "list", "--json").stdout)
    assert [row["name"] for row in listed] == ["digits"]
    assert set(listed[0]) >= {"name", "state", "scoring_uri", "swagger_uri", "grpc_target", "auth_enabled"}

    status, answer = post(deployed["scoring_uri"], {"data": SAMPLE.tolist()})
    assert status == 200
    np.testing.assert_allclose(probabilities(answer), reference(bundles["model_v1"], SAMPLE)[1],
                               rtol=1e-4, atol=1e-5)

    keys = json.loads(edgedeploy("service", "keys", "digits", "--json").stdout)
    assert set(keys) == {"primary_key", "secondary_key"}
    rotated = json.loads(
        edgedeploy("service", "keys", "digits", "--regenerate", "secondary", "--json").stdout
    )
    assert rotated["primary_key"] == keys["primary_key"] and rotated["secondary_key"] != keys["secondary_key"]

    _update_under_load(deployed["scoring_uri"], bundles["v2"])
    status, answer = post(deployed["scoring_uri"], {"data": SAMPLE.tolist()})
    np.testing.assert_allclose(probabilities(answer), reference(bundles["model_v2"], SAMPLE)[1],
                               rtol=1e-4, atol=1e-5)
    assert json.loads(edgedeploy("service", "show", "digits", "--json").stdout)["version"] == 2

    logs = edgedeploy("service", "logs", "digits", "--tail", "3").stdout
    assert 0 < len(logs.splitlines()) <= 3

    pid = deployed["pid"]
    assert edgedeploy("service", "delete", "digits").returncode == 0
    assert no_process(pid)
    assert not (edgedeploy_home / "services" / "digits").exists()
    assert json.loads(edgedeploy("service", "list", "--json").stdout) == []


def _update_under_load(uri: str, bundle: Path) -> None:
    """``service update`` while a thread scores continuously: not one request may fail."""
    failures: list[Any] = []
    sent = [0]
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            status, answer = post(uri, {"data": SAMPLE[:1].tolist()})
            sent[0] += 1
            if status != 200:
                failures.append((status, answer))

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        result = edgedeploy("service", "update", "digits", "--bundle", str(bundle))
    finally:
        stop.set()
        thread.join()
    assert "version 2" in result.stdout
    assert failures == [] and sent[0] > 0


def test_cli_bad_input_is_one_error_line(
    bundles: dict[str, Path], tmp_path: Path, edgedeploy_home: Path
) -> None:
    assert_one_error_line(edgedeploy("service", "show", "ghost", check=False))
    assert_one_error_line(edgedeploy("service", "delete", "ghost", check=False))
    assert_one_error_line(edgedeploy("service", "logs", "ghost", check=False))
    assert_one_error_line(edgedeploy("deploy", "x", "--bundle", str(tmp_path / "nope.edb"), check=False))
    assert_one_error_line(edgedeploy("deploy", "x", "--bundle", str(bundles["v1"]), "--port", "99999",
                                     check=False), code=2)
    os.environ["KUBECONFIG"] = str(tmp_path / "no-kubeconfig")  # no cluster: a usage error, exit 2
    try:
        assert_one_error_line(edgedeploy("deploy", "x", "--bundle", str(bundles["v1"]), "--target", "kubernetes",
                                         check=False), code=2)
    finally:
        del os.environ["KUBECONFIG"]
    assert_one_error_line(edgedeploy("service", "keys", "x", "--regenerate", "third", check=False), code=2)

    tampered = tmp_path / "tampered.edb"
    data = bytearray(bundles["v1"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    assert_one_error_line(edgedeploy("deploy", "x", "--bundle", str(tampered), check=False))

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        result = edgedeploy("deploy", "x", "--bundle", str(bundles["v1"]), "--port", port, check=False)
    assert_one_error_line(result)
    assert port in result.stderr
    assert not (edgedeploy_home / "services" / "x").exists()


def test_edge_agent_usage_and_print_config(tmp_path: Path) -> None:
    assert_one_error_line(edge_agent(), code=2)
    assert_one_error_line(edge_agent("serve", "--bundle", str(tmp_path / "nope.edb")))
    assert_one_error_line(edge_agent("serve", "--bundle", "b.edb", "--host", "0.0.0.0"), code=2)
    printed = edge_agent("serve", "--bundle", "b.edb", "--host", "0.0.0.0", "--keys-file", "k.json",
                         "--print-config")
    assert printed.returncode == 0
    config = json.loads(printed.stdout)
    assert config["auth_enabled"] is True and config["host"] == "0.0.0.0"
