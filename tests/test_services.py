"""The services Python API (packager.services) against real ``edge-agent serve`` processes.

One auth-on service is deployed for the module (a deploy costs a process start); the failure
cases deploy nothing or a process that dies, and check that nothing is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import psutil
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.bundle import BundleManifest
from edge_agent.errors import (
    AlreadyExistsError,
    BundleError,
    DeploymentError,
    NotFoundError,
    UsageError,
)
from edge_agent.profiles import load_profile
from edge_agent.tensors import TensorSpec
from packager import services
from packager.bundle import write_bundle
from packager.examples import digits_data
from packager.keys import SigningKey, generate_key
from packager.targets.base import free_port
from tests.servers import unreachable_kubeconfig

SAMPLE = digits_data().x_test[:3]


def make_bundle(
    out: Path, model: Path | bytes, key: SigningKey, version: int = 1, name: str = "digits"
) -> Path:
    """A signed onnxruntime bundle of a digits MLP, the way packaging writes one."""
    manifest = BundleManifest(
        model={"name": name, "version": version},
        profile=load_profile("cpu-x86_64").to_dict(),
        runtime={"backend": "onnxruntime", "model_path": "model/model.onnx", "precision": "fp32",
                 "execution_providers": ["CPUExecutionProvider"], "optimization_level": "extended"},
        inputs=[TensorSpec("input", "FP32", (-1, 64))],
        outputs=[TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 10))],
        samples={"input": "samples/input.json", "output": None},
    )
    sample = json.dumps({"data": SAMPLE[:1].tolist()}).encode()
    payload: dict[str, Path | bytes] = {"model/model.onnx": model, "samples/input.json": sample}
    write_bundle(out, manifest, payload, key)
    return out


def sharper_model(source: Path, out: Path) -> Path:
    """The same MLP with its output layer scaled: same labels, different probabilities."""
    model = onnx.load(str(source))
    last = model.graph.initializer[-2] if len(model.graph.initializer) > 1 else model.graph.initializer[-1]
    weights = onnx.numpy_helper.to_array(last) * 3.0
    last.CopyFrom(onnx.numpy_helper.from_array(weights.astype(np.float32), last.name))
    onnx.save(model, str(out))
    return out


def reference(model: Path, x: np.ndarray) -> list[np.ndarray]:
    """What onnxruntime answers in-process: [label, probabilities]."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.astype(np.float32)})


def probabilities(answer: Any) -> np.ndarray:
    """The probabilities in a /score answer (a dict of outputs, or v2-style outputs)."""
    if isinstance(answer, dict) and "probabilities" in answer:
        return np.asarray(answer["probabilities"], dtype=np.float32)
    if isinstance(answer, dict) and "outputs" in answer:
        for output in answer["outputs"]:
            if output["name"] == "probabilities":
                return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    raise AssertionError(f"no probabilities in {answer!r}")


def no_process(pid: int | None) -> bool:
    """True when ``pid`` is gone (or only a zombie awaiting its reaper)."""
    if pid is None:
        return True
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def force_kill(pid: int | None) -> None:
    """Last-resort cleanup for a test that failed before deleting its service."""
    if pid and not no_process(pid):
        with contextlib.suppress(OSError):
            os.killpg(pid, 9)


def post(url: str, body: Any, key: str | None = None) -> tuple[int, Any]:
    """POST JSON; returns (status, decoded body)."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


@pytest.fixture(scope="module")
def module_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services-home")


@pytest.fixture
def home(module_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test of the module uses one home, so they share the deployed service."""
    monkeypatch.setenv("EDGEDEPLOY_HOME", str(module_home))
    return module_home


@pytest.fixture(scope="module")
def bundles(module_home: Path, digits_mlp: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """v1 and v2 bundles (and their models) signed by a key trusted in the module's home."""
    out = tmp_path_factory.mktemp("bundles")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEDEPLOY_HOME", str(module_home))
        key = generate_key()
        model_v2 = sharper_model(digits_mlp, out / "digits_v2.onnx")
        return {
            "v1": make_bundle(out / "digits-v1.edb", digits_mlp, key, version=1),
            "v2": make_bundle(out / "digits-v2.edb", model_v2, key, version=2),
            "model_v1": digits_mlp,
            "model_v2": model_v2,
            "broken": make_bundle(out / "broken.edb", b"not an onnx graph", key, version=9),
        }


@pytest.fixture(scope="module")
def service(module_home: Path, bundles: dict[str, Path]) -> Iterator[services.Service]:
    """One service with auth on, deleted (or killed) at the end whatever happened."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEDEPLOY_HOME", str(module_home))
        deployed = services.deploy("digits-api", bundles["v1"], auth=True, cpu=0.5, memory_mb=256)
        try:
            yield deployed
        finally:
            with contextlib.suppress(NotFoundError):
                services.delete("digits-api")
            force_kill(deployed.pid)


def test_deploy_answers_with_the_service_shape(home: Path, service: services.Service) -> None:
    shown = services.get_service("digits-api").to_dict()
    for field in ("name", "state", "scoring_uri", "swagger_uri", "grpc_target", "auth_enabled"):
        assert field in shown
    assert shown["state"] == "healthy"
    assert shown["auth_enabled"] is True
    assert shown["scoring_uri"].startswith("http://127.0.0.1:") and shown["scoring_uri"].endswith("/score")
    assert shown["grpc_target"].startswith("127.0.0.1:")
    assert shown["model"] == "digits" and shown["version"] == 1
    assert shown["resources"] == {"cpu": 0.5, "memory_mb": 256, "replicas": None}
    assert [s.name for s in services.list_services()] == ["digits-api"]
    keys_file = home / "services" / "digits-api" / "keys.json"
    assert keys_file.stat().st_mode & 0o777 == 0o600


def test_run_answers_like_onnxruntime(
    home: Path, service: services.Service, bundles: dict[str, Path]
) -> None:
    answer = services.run("digits-api", {"data": SAMPLE.tolist()})
    expected = reference(bundles["model_v1"], SAMPLE)[1]
    np.testing.assert_allclose(probabilities(answer), expected, rtol=1e-4, atol=1e-5)


def test_keys_primary_secondary_and_regenerate(home: Path, service: services.Service) -> None:
    uri = services.get_service("digits-api").scoring_uri
    body = {"data": SAMPLE[:1].tolist()}
    assert post(uri, body)[0] == 401
    assert post(uri, body, "wrong-key")[0] == 401
    keys = services.get_keys("digits-api")
    assert post(uri, body, keys["primary_key"])[0] == 200
    assert post(uri, body, keys["secondary_key"])[0] == 200
    fresh = services.regenerate_key("digits-api", "primary")
    assert fresh["primary_key"] != keys["primary_key"]
    assert fresh["secondary_key"] == keys["secondary_key"]
    assert post(uri, body, keys["primary_key"])[0] == 401
    assert post(uri, body, fresh["primary_key"])[0] == 200
    with pytest.raises(UsageError):
        services.regenerate_key("digits-api", "tertiary")


def test_health_stays_open_with_auth(home: Path, service: services.Service) -> None:
    base = services.get_service("digits-api").scoring_uri.removesuffix("/score")
    with urllib.request.urlopen(base + "/v2/health/ready", timeout=5) as response:
        assert response.status == 200


def test_update_hot_swaps_without_failed_requests(
    home: Path, service: services.Service, bundles: dict[str, Path]
) -> None:
    uri = services.get_service("digits-api").scoring_uri
    key = services.get_keys("digits-api")["primary_key"]
    body = {"data": SAMPLE[:1].tolist()}
    failures: list[Any] = []
    sent = [0]
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            status, answer = post(uri, body, key)
            sent[0] += 1
            if status != 200:
                failures.append((status, answer))

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        updated = services.update("digits-api", bundles["v2"])
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    assert sent[0] > 0
    assert updated.version == 2 and updated.state == "healthy"
    answer = services.run("digits-api", body)
    expected = reference(bundles["model_v2"], SAMPLE[:1])[1]
    np.testing.assert_allclose(probabilities(answer), expected, rtol=1e-4, atol=1e-5)
    assert len(list((home / "services" / "digits-api" / "bundles").glob("*.edb"))) == 1


def test_update_refuses_a_tampered_bundle_and_keeps_serving(
    home: Path, service: services.Service, bundles: dict[str, Path], tmp_path: Path
) -> None:
    tampered = tmp_path / "tampered.edb"
    data = bytearray(bundles["v1"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    before = services.get_service("digits-api")
    with pytest.raises(BundleError):
        services.update("digits-api", tampered)
    after = services.get_service("digits-api")
    assert after.bundle_sha256 == before.bundle_sha256 and after.state == "healthy"


def test_update_to_a_bundle_that_cannot_load_keeps_the_old_model(
    home: Path, service: services.Service, bundles: dict[str, Path]
) -> None:
    before = services.get_service("digits-api")
    with pytest.raises(DeploymentError, match="refused the new bundle"):
        services.update("digits-api", bundles["broken"])
    after = services.get_service("digits-api")
    assert (after.version, after.bundle_sha256) == (before.version, before.bundle_sha256)
    assert after.state == "healthy"
    assert probabilities(services.run("digits-api", {"data": SAMPLE[:1].tolist()})).shape == (1, 10)
    assert len(list((home / "services" / "digits-api" / "bundles").glob("*.edb"))) == 1


def test_logs_show_the_agent_output(home: Path, service: services.Service) -> None:
    text = services.logs("digits-api")
    assert "serving on http://127.0.0.1:" in text
    assert len(services.logs("digits-api", tail=1).splitlines()) == 1


def test_deploying_an_existing_name_is_refused(
    home: Path, service: services.Service, bundles: dict[str, Path]
) -> None:
    with pytest.raises(AlreadyExistsError, match="service update"):
        services.deploy("digits-api", bundles["v1"])
    assert services.get_service("digits-api").state == "healthy"


def test_run_without_auth_on_a_stopped_or_unknown_service(home: Path) -> None:
    with pytest.raises(NotFoundError):
        services.run("no-such-service", {"data": []})
    with pytest.raises(NotFoundError):
        services.get_keys("no-such-service")
    with pytest.raises(NotFoundError):
        services.logs("no-such-service")


def test_run_maps_a_bad_request_to_an_error(home: Path, service: services.Service) -> None:
    from edge_agent.errors import InvalidInputError

    with pytest.raises(InvalidInputError):
        services.run("digits-api", {"data": [[1.0, 2.0]]})


def test_a_crashed_service_shows_stopped_and_is_still_deleted(
    home: Path, service: services.Service, bundles: dict[str, Path]
) -> None:
    pid = services.get_service("digits-api").pid
    assert pid is not None and not no_process(pid)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not no_process(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    crashed = services.get_service("digits-api")
    assert crashed.state == "stopped" and crashed.pid is None
    with pytest.raises(DeploymentError, match="not running"):
        services.update("digits-api", bundles["v2"])
    services.delete("digits-api")
    assert no_process(pid)
    assert not (home / "services" / "digits-api").exists()
    with pytest.raises(NotFoundError):
        services.delete("digits-api")
    assert services.list_services() == []


# --- failures that must leave nothing behind -----------------------------------------------------


def test_deployment_options_are_checked_before_anything_starts(
    home: Path, bundles: dict[str, Path]
) -> None:
    for options in ({"replicas": 0}, {"memory_mb": -1}, {"cpu": 0}, {"port": 70000},
                    {"port": 8123, "grpc_port": 8123}):
        with pytest.raises(UsageError):
            services.deploy("checked", bundles["v1"], **options)
    assert not (home / "services" / "checked").exists()


def test_kubernetes_without_a_cluster_is_a_clear_error(home: Path, bundles: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to the API server for real: no kubeconfig, then a kubeconfig whose server is not there."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    with pytest.raises(UsageError, match="no kubeconfig found"):
        services.deploy("elsewhere", bundles["v1"], target="kubernetes", image="registry.example/edge:1")
    closed = free_port()
    kubeconfig = unreachable_kubeconfig(tmp_path / "kubeconfig", closed)
    with pytest.raises(DeploymentError, match=f"cannot reach the Kubernetes API at http://127.0.0.1:{closed}"):
        services.deploy("elsewhere", bundles["v1"], target="kubernetes", kubeconfig=kubeconfig,
                        image="registry.example/edge:1")
    assert not (home / "services" / "elsewhere").exists()


def test_docker_without_an_engine_is_a_clear_error(home: Path, bundles: dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    with pytest.raises(DeploymentError, match="no Docker engine answers"):
        services.deploy("elsewhere", bundles["v1"], target="docker")
    assert not (home / "services" / "elsewhere").exists()


def test_bad_name_and_missing_bundle(home: Path, bundles: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        services.deploy("Bad Name!", bundles["v1"])
    with pytest.raises(NotFoundError):
        services.deploy("missing", tmp_path / "nope.edb")
    assert not (home / "services" / "missing").exists()


def test_untrusted_bundle_fails_before_starting(
    home: Path, digits_mlp: Path, tmp_path: Path
) -> None:
    stranger = SigningKey("stranger", Ed25519PrivateKey.generate())
    bundle = make_bundle(tmp_path / "stranger.edb", digits_mlp, stranger)
    with pytest.raises(BundleError):
        services.deploy("stranger", bundle)
    assert not (home / "services" / "stranger").exists()


def test_port_in_use_is_a_clear_error(home: Path, bundles: dict[str, Path]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(DeploymentError, match=f"127.0.0.1:{port}"):
            services.deploy("busy", bundles["v1"], port=port)
    assert not (home / "services" / "busy").exists()


def test_process_dying_during_start_reports_its_log(home: Path, bundles: dict[str, Path]) -> None:
    with pytest.raises(DeploymentError) as caught:
        services.deploy("broken", bundles["broken"], timeout=60)
    message = str(caught.value)
    assert "'broken'" in message and ("exited while starting" in message or "failed to start" in message)
    assert not (home / "services" / "broken").exists()
    assert not [p for p in psutil.process_iter(["cmdline"])
                if "--state-file" in (p.info["cmdline"] or []) and str(home) in " ".join(p.info["cmdline"])]
