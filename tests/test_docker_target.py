"""Docker target against a real engine: real image builds, real containers, real requests.

Uses ``DOCKER_HOST`` when it answers, else starts Debian's dockerd on a private socket (root only)
and stops it at the end. The base image's rootfs tar is cached under ~/.cache/edgedeploy.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from packager.errors import DeploymentError
from packager.packaging import package
from packager.targets.base import DeploymentSpec, ServiceState

pytestmark = [pytest.mark.slow, pytest.mark.docker]

docker = pytest.importorskip("docker")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a Docker engine that answers (DOCKER_HOST, or a private dockerd)."""
    from packager.targets.dockerd import engine_answers, start_private_dockerd

    if os.environ.get("DOCKER_HOST") and engine_answers(os.environ["DOCKER_HOST"]):
        yield os.environ["DOCKER_HOST"]
        return
    if shutil.which("dockerd") is None or shutil.which("debootstrap") is None:
        pytest.skip("no Docker engine: dockerd/debootstrap not installed (run .ci/install-docker.sh)")
    if os.geteuid() != 0:
        pytest.skip("no Docker engine: DOCKER_HOST unset and a private dockerd needs root")
    private = start_private_dockerd(tmp_path_factory.mktemp("dockerd"))
    try:
        yield private.base_url
    finally:
        private.stop()


def _score(port: int, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/score", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_container_lifecycle(engine: str, digits_mlp: Path, digits, signing_key,
                             edgedeploy_home: Path, tmp_path: Path) -> None:
    from packager.targets.docker import DockerTarget

    bundle = package(digits_mlp, "cpu-x86_64", tmp_path / "digits.edb", name="digits").bundle_path
    trust = sorted((edgedeploy_home / "trust").glob("*.pub"))[0]
    target = DockerTarget(base_url=engine, trusted_key=trust)
    try:
        service = target.deploy(DeploymentSpec(name="digits-c", bundle=bundle, cpu=1.0, memory_mb=512,
                                               auth=False), timeout=120)
        assert service.state == ServiceState.HEALTHY
        image = target.client.images.get(service.resources["image"])
        import hashlib
        assert image.labels["edgedeploy.bundle.sha256"] == hashlib.sha256(bundle.read_bytes()).hexdigest()
        container = target.client.containers.get(service.resources["container"])
        assert container.attrs["HostConfig"]["NanoCpus"] == 1_000_000_000
        assert container.attrs["HostConfig"]["Memory"] == 512 * 1024 * 1024

        sample = digits.x_test[:2].tolist() if hasattr(digits, "x_test") else [[0.0] * 64] * 2
        answer = _score(service.http_port, {"data": sample})
        assert answer

        import numpy as np
        import tritonclient.http as httpclient
        client = httpclient.InferenceServerClient(f"127.0.0.1:{service.http_port}")
        try:
            infer_input = httpclient.InferInput("input", [2, 64], "FP32")
            infer_input.set_data_from_numpy(np.asarray(sample, dtype=np.float32))
            result = client.infer("digits-c", [infer_input])
            assert result.as_numpy("label").shape[0] == 2
        finally:
            client.close()

        # Rebuild from the same bundle and base: every layer comes from the cache.
        from packager.images import build_image
        again = build_image(target.client, bundle, "digits-c")
        assert again.image_id == image.id

        updated = target.update("digits-c", bundle)
        assert updated.state == ServiceState.HEALTHY
        assert updated.resources["container"] != service.resources["container"]
        assert _score(updated.http_port, {"data": sample}) == answer

        target.delete("digits-c")
        left = target.client.containers.list(all=True, filters={"label": "edgedeploy.service=digits-c"})
        assert left == []
    finally:
        target.close()


def test_tampered_bundle_refused_at_container_start(engine: str, digits_mlp: Path, signing_key,
                                                   edgedeploy_home: Path, tmp_path: Path) -> None:
    from packager.targets.docker import DockerTarget

    bundle = package(digits_mlp, "cpu-x86_64", tmp_path / "digits.edb", name="digits").bundle_path
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "tampered.edb"
    bad.write_bytes(bytes(data))
    trust = sorted((edgedeploy_home / "trust").glob("*.pub"))[0]
    target = DockerTarget(base_url=engine, trusted_key=trust)
    try:
        with pytest.raises(DeploymentError, match="stopped at start"):
            target.deploy(DeploymentSpec(name="digits-bad", bundle=bad, auth=False), timeout=60)
        assert target.client.containers.list(all=True, filters={"label": "edgedeploy.service=digits-bad"}) == []
    finally:
        target.close()
