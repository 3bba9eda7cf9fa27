"""One bundle, packaged once, runs unchanged as a local service, in a Docker container and on an edge agent.

Each place reports the sha256 of the file it verified and serves; all three must be the digest of the
one file, and all three must give identical answers (bit for bit) to the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from packager import services
from packager.fleet import FleetController
from packager.keys import SigningKey
from tests.e2e.test_fleet import wait_fleet
from tests.servers import digits_bundle

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.slow]


def infer(http_port: int, model: str, x: np.ndarray, key: str | None = None) -> dict[str, list[Any]]:
    """POST /v2/models/MODEL/infer; returns {output name: flat data}."""
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v2/models/{model}/infer",
                                     data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = json.loads(response.read())
    return {output["name"]: output["data"] for output in answer["outputs"]}


def test_one_file_locally_in_a_container_and_on_an_agent(docker_host: str, mqtt_broker: Any, bundle_server: Any,
                                                         agents: Any, digits_mlp: Path, digits,
                                                         signing_key: SigningKey, tmp_path: Path) -> None:
    bundle = digits_bundle(digits_mlp, digits, tmp_path)
    digest = hashlib.sha256(bundle.read_bytes()).hexdigest()
    x = digits.x_test[:16].astype(np.float32)
    answers: dict[str, dict[str, list[Any]]] = {}
    digests: dict[str, str | None] = {}

    local = services.deploy("same-local", bundle, auth=False)
    container = None
    try:
        digests["local"] = local.bundle_sha256
        answers["local"] = infer(int(local.http_port or 0), "digits", x)

        container = services.deploy("same-docker", bundle, target="docker", auth=False, timeout=120)
        digests["docker"] = container.bundle_sha256
        answers["docker"] = infer(int(container.http_port or 0), "digits", x)

        device = agents(1)[0]
        with FleetController(mqtt_broker.url) as ctl:
            wait_fleet(ctl, [device.device_id], lambda r: r["online"], timeout=120)
            rollout = ctl.rollout(bundle, "all", bundle_server.url, canary=0, wave="100%", wait=True,
                                  wave_timeout=120)
            assert ctl.status(rollout)["state"] == "succeeded"
            row = wait_fleet(ctl, [device.device_id], lambda r: r["state"] == "active")[0]
        digests["agent"] = row["bundle_sha256"]
        answers["agent"] = infer(int(row["http_port"]), "digits", x)
    finally:
        services.delete("same-local")
        if container is not None:
            services.delete("same-docker")

    assert digests == {"local": digest, "docker": digest, "agent": digest}
    assert answers["local"] == answers["docker"] == answers["agent"]
    assert (np.asarray(answers["local"]["label"]) == digits.y_test[:16]).mean() >= 0.8
