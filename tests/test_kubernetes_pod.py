"""What a cluster would start is what is tested: the rendered pod's container run in a real Docker engine.

The Deployment's container (image, command, env, ports, probes) and its ConfigMap and Secret volumes,
mounted where the pod spec mounts them, run with ``docker run``; the probes' paths answer and
tritonclient scores through it. (No API server can be installed on the build machines.)
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.bundle import bundle_sha256
from packager.images import build_image
from packager.targets.base import free_port
from packager.targets.kubernetes import KubernetesOptions, render_manifests, trusted_public_keys
from tests.servers import digits_bundle

pytestmark = [pytest.mark.slow, pytest.mark.docker]


def _by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in docs}


def _volumes(docs: dict[str, dict[str, Any]], pod: dict[str, Any], folder: Path) -> dict[str, dict[str, str]]:
    """The pod's ConfigMap and Secret volumes as host folders bound where the container mounts them."""
    sources = {"config": docs["ConfigMap"]["data"], "keys": docs["Secret"]["stringData"]}
    binds = {}
    for mount in pod["containers"][0]["volumeMounts"]:
        files = sources[mount["name"]]
        host = folder / mount["name"]
        host.mkdir()
        for name, text in files.items():
            (host / name).write_text(text)
        binds[str(host)] = {"bind": mount["mountPath"], "mode": "ro"}
    return binds


def _http(url: str, key: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except urllib.error.URLError:
        return 0  # not listening yet


def test_the_pod_container_spec_runs_and_answers_tritonclient(docker_host: str, digits_mlp: Path, digits,
                                                              signing_key, tmp_path: Path) -> None:
    import docker

    bundle = digits_bundle(digits_mlp, digits, tmp_path)
    client = docker.DockerClient(base_url=docker_host)
    container = None
    try:
        image = build_image(client, bundle, "digits-k8s")  # the bundle baked in, as without --server
        options = KubernetesOptions(name="digits-k8s", image=image.tag, bundle_sha256=bundle_sha256(bundle),
                                    http_port=free_port(), grpc_port=free_port(), keys={
                                        "primary_key": "k8s-primary", "secondary_key": "k8s-secondary"},
                                    trusted_keys=trusted_public_keys())
        docs = _by_kind(render_manifests(options))
        pod = docs["Deployment"]["spec"]["template"]["spec"]
        spec = pod["containers"][0]
        assert "initContainers" not in pod
        container = client.containers.run(
            spec["image"], spec["command"], detach=True, network_mode="host",
            environment={env["name"]: env["value"] for env in spec["env"]},
            volumes=_volumes(docs, pod, tmp_path), labels={"edgedeploy.test": "k8s-pod"})
        port = spec["ports"][0]["containerPort"]
        ready = f"http://127.0.0.1:{port}{spec['readinessProbe']['httpGet']['path']}"
        deadline = time.monotonic() + 90
        while _http(ready) != 200:
            container.reload()
            assert container.status == "running", container.logs().decode(errors="replace")
            assert time.monotonic() < deadline, "the pod's container never became ready"
            time.sleep(0.3)
        assert _http(f"http://127.0.0.1:{port}{spec['livenessProbe']['httpGet']['path']}") == 200

        import tritonclient.grpc as grpcclient
        import tritonclient.http as httpclient

        x = digits.x_test[:4].astype(np.float32)
        http = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{spec['ports'][1]['containerPort']}")
        try:
            headers = {"authorization": "Bearer k8s-primary"}
            http_input = httpclient.InferInput("input", list(x.shape), "FP32")
            http_input.set_data_from_numpy(x)
            grpc_input = grpcclient.InferInput("input", list(x.shape), "FP32")
            grpc_input.set_data_from_numpy(x)
            # copies: tritonclient's HTTP client adds its own entries to the dict it is given
            by_http = http.infer("digits", [http_input], headers=dict(headers)).as_numpy("label")
            by_grpc = grpc.infer("digits", [grpc_input], headers=dict(headers)).as_numpy("label")
        finally:
            http.close()
            grpc.close()
        assert by_http.tolist() == by_grpc.tolist()
        assert (by_http == digits.y_test[:4]).mean() >= 0.75
        assert _http(f"http://127.0.0.1:{port}/v2/models/digits") == 401  # the Secret's keys are enforced
        served = json.loads(docs["ConfigMap"]["data"]["serve.json"])
        assert served["bundle_sha256"] == image.bundle_sha256
    finally:
        if container is not None:
            container.remove(force=True)
        client.close()
