"""Docker target against a real engine: real image builds, real containers, real requests.

The engine comes from the ``docker_engine`` fixture (``DOCKER_HOST``, or Debian's dockerd on a private
socket). The base image's rootfs tar and the wheelhouse are cached under ~/.cache/edgedeploy, so only
the first run on a machine pays for debootstrap.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.errors import DeploymentError
from packager.packaging import package
from packager.targets.base import ServiceState
from tests.servers import digits_bundle

pytestmark = [pytest.mark.slow, pytest.mark.docker]

EDGEDEPLOY = Path(sys.executable).parent / "edgedeploy"


def edgedeploy(*args: str, timeout: float = 600) -> Any:
    """Run the CLI as a user would (DOCKER_HOST comes from the environment); JSON out."""
    result = subprocess.run([str(EDGEDEPLOY), *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if "--json" in args else result.stdout


def score(uri: str, body: dict, key: str | None = None) -> dict:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(uri, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _engine_client(docker_host: str) -> Any:
    import docker

    return docker.DockerClient(base_url=docker_host)


def test_deploy_score_update_under_load_delete(docker_host: str, digits_mlp: Path, digits, signing_key,
                                               tmp_path: Path) -> None:
    bundle = digits_bundle(digits_mlp, digits, tmp_path)
    service = edgedeploy("deploy", "digits-c", "--bundle", str(bundle), "--target", "docker", "--cpu", "1",
                         "--memory-mb", "512", "--auth", "--timeout", "120", "--json")
    client = _engine_client(docker_host)
    try:
        assert service["state"] == ServiceState.HEALTHY and service["auth_enabled"] is True
        container = client.containers.get(service["resources"]["container"])
        assert container.attrs["HostConfig"]["NanoCpus"] == 1_000_000_000
        assert container.attrs["HostConfig"]["Memory"] == 512 * 1024 * 1024
        image = client.images.get(service["resources"]["image"])
        assert image.labels["edgedeploy.bundle.sha256"] == hashlib.sha256(bundle.read_bytes()).hexdigest()

        keys = edgedeploy("service", "keys", "digits-c", "--json")
        sample = {"data": digits.x_test[:2].tolist()}
        with pytest.raises(urllib.error.HTTPError) as refused:
            score(service["scoring_uri"], sample)
        assert refused.value.code == 401
        answer = score(service["scoring_uri"], sample, keys["primary_key"])
        assert answer

        import tritonclient.grpc as grpcclient
        triton = grpcclient.InferenceServerClient(service["grpc_target"])
        try:
            infer_input = grpcclient.InferInput("input", [2, 64], "FP32")
            infer_input.set_data_from_numpy(digits.x_test[:2].astype(np.float32))
            result = triton.infer("digits", [infer_input],
                                  headers={"authorization": f"Bearer {keys['primary_key']}"})
            assert result.as_numpy("label").tolist() == answer["label"]
        finally:
            triton.close()

        assert "serving on" in edgedeploy("service", "logs", "digits-c")
        assert [s["name"] for s in edgedeploy("service", "list", "--json")] == ["digits-c"]

        # a rotated key reaches the running container (its service folder is mounted, not the file)
        rotated = edgedeploy("service", "keys", "digits-c", "--regenerate", "primary", "--json")
        _eventually(lambda: score(service["scoring_uri"], sample, rotated["primary_key"]) == answer)

        # update to a new bundle while clients keep scoring at the same address
        v2 = package(digits_mlp, "cpu-x86_64", tmp_path / "v2.edb", name="digits", quantize="fp16",
                     force=True).bundle_path
        outcomes = _load(service["scoring_uri"], sample, rotated["primary_key"],
                         lambda: edgedeploy("service", "update", "digits-c", "--bundle", str(v2)))
        assert outcomes["failed"] == [] and outcomes["ok"] > 20
        updated = edgedeploy("service", "show", "digits-c", "--json")
        assert updated["scoring_uri"] == service["scoring_uri"]
        assert updated["resources"]["container"] != service["resources"]["container"]
        assert client.images.get(updated["resources"]["image"]).labels["edgedeploy.bundle.sha256"] == \
            hashlib.sha256(v2.read_bytes()).hexdigest()

        edgedeploy("service", "delete", "digits-c")
        assert client.containers.list(all=True, filters={"label": "edgedeploy.service=digits-c"}) == []
    finally:
        for leftover in client.containers.list(all=True, filters={"label": "edgedeploy.service=digits-c"}):
            leftover.remove(force=True)
        client.close()


def _eventually(check: Any, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # retried until the deadline, then re-raised
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.2)


def _load(uri: str, body: dict, key: str, action: Any, clients: int = 4) -> dict[str, Any]:
    """Score from ``clients`` threads (a new connection per request) while ``action`` runs."""
    outcomes: dict[str, Any] = {"ok": 0, "failed": []}
    stop = threading.Event()
    lock = threading.Lock()

    def client() -> None:
        while not stop.is_set():
            try:
                score(uri, body, key)
                with lock:
                    outcomes["ok"] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is recorded and asserted on
                with lock:
                    outcomes["failed"].append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        action()
        import time

        time.sleep(1.0)  # keep scoring after the old container is gone
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
    return outcomes


def test_rebuild_from_the_same_bundle_reuses_cached_layers(docker_host: str, digits_mlp: Path, digits,
                                                           signing_key, tmp_path: Path) -> None:
    from packager.images import build_image

    bundle = digits_bundle(digits_mlp, digits, tmp_path)
    client = _engine_client(docker_host)
    try:
        first = build_image(client, bundle, "digits-cache")
        again = build_image(client, bundle, "digits-cache")
        assert again.image_id == first.image_id
        client.images.remove(first.tag, force=True)
    finally:
        client.close()


def test_tampered_bundle_refused_at_container_start(docker_host: str, digits_mlp: Path, signing_key,
                                                   edgedeploy_home: Path, tmp_path: Path) -> None:
    from packager.targets.base import DeploymentSpec
    from packager.targets.docker import DockerTarget

    bundle = package(digits_mlp, "cpu-x86_64", tmp_path / "digits.edb", name="digits").bundle_path
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "tampered.edb"
    bad.write_bytes(bytes(data))
    target = DockerTarget()
    try:
        with pytest.raises(DeploymentError, match="stopped at start"):
            target.deploy(DeploymentSpec(name="digits-bad", bundle=bad, auth=False), timeout=60)
        assert target.client.containers.list(all=True, filters={"label": "edgedeploy.service=digits-bad"}) == []
        assert not (edgedeploy_home / "services" / "digits-bad").exists()
    finally:
        target.close()


def test_a_private_engine_takes_the_next_storage_driver_when_dockerd_refuses_one(tmp_path: Path) -> None:
    from packager.targets.dockerd import start_private_dockerd

    if shutil.which("dockerd") is None or os.geteuid() != 0:
        pytest.skip("a private dockerd needs dockerd and root")
    engine = start_private_dockerd(tmp_path / "dockerd", storage_drivers=("no-such-driver", "vfs"))
    try:
        assert engine.storage_driver == "vfs"
        client = _engine_client(engine.base_url)
        try:
            assert client.info()["Driver"] == "vfs"
        finally:
            client.close()
    finally:
        engine.stop()
    with pytest.raises(DeploymentError, match="no-such-driver: dockerd exited"):
        start_private_dockerd(tmp_path / "again", storage_drivers=("no-such-driver",))
    # dockerd bind-mounts its data root on itself: neither the refused start nor the stop leaves it mounted
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(tmp_path) not in mounts
