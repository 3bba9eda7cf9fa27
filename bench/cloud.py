"""Cloud targets: image build cold and cached, image size, container cold start, container vs local throughput.

One run, one engine, one model (the digits MLP): the same signed bundle is served by a local
``edge-agent serve`` process and by a container built from it; both are loaded with the same
tritonclient gRPC load on the same 2 cores, so the ratio is what the container costs. "Cold" builds
start from an engine with no layers of ours (the base image imported from the cached debootstrap tar);
"cached" rebuilds the same bundle and base. Needs a Docker engine: ``DOCKER_HOST``, or root to start
Debian's dockerd privately (as the tests do).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import print_table, write_results
from bench.serving import _Agent, _bundle, _grpc_call, _load, _rest_call
from packager.examples import build_digits_mlp, digits_data

SECONDS = 5.0
CONCURRENCY = 8


def _engine(folder: Path) -> tuple[str, Any]:
    from packager.targets.dockerd import engine_answers, start_private_dockerd

    if os.environ.get("DOCKER_HOST") and engine_answers(os.environ["DOCKER_HOST"]):
        return os.environ["DOCKER_HOST"], None
    private = start_private_dockerd(folder / "dockerd")
    return private.base_url, private


def _builds(client: Any, bundle: Path) -> list[dict[str, Any]]:
    from packager.images import BASE_IMAGE, build_image, ensure_base_image

    started = time.monotonic()
    ensure_base_image(client, BASE_IMAGE)
    base_s = time.monotonic() - started
    cold = build_image(client, bundle, "bench-cloud")
    cached = build_image(client, bundle, "bench-cloud")
    base_size = int(client.images.get(BASE_IMAGE).attrs.get("Size", 0))
    return [
        {"step": "base image import (cached rootfs tar)", "seconds": base_s, "size_mb": base_size / 1e6},
        {"step": "image build, cold", "seconds": cold.seconds, "size_mb": cold.size / 1e6},
        {"step": "image build, cached", "seconds": cached.seconds, "size_mb": cached.size / 1e6,
         "same_image": cached.image_id == cold.image_id},
    ]


def _serve_rows(name: str, http_port: int, grpc_port: int, x: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    for protocol, call in (("grpc", _grpc_call(f"127.0.0.1:{grpc_port}", "digits", x, "input")),
                           ("rest", _rest_call(f"http://127.0.0.1:{http_port}", "digits", x, "input"))):
        result = _load(call, CONCURRENCY, SECONDS)
        rows.append({"where": name, "protocol": protocol, **result})
    return rows


def _mean_rps(rows: list[dict[str, Any]], where: str, protocol: str) -> float:
    values = [r["rps"] for r in rows if r["where"] == where and r["protocol"] == protocol]
    return sum(values) / len(values)


def _restart_to_ready(client: Any, service: Any) -> float:
    """Seconds from restarting the service's container to its readiness answering (a cold start)."""
    from bench.serving import _wait_ready

    container = client.containers.get(service.resources["container"])
    started = time.monotonic()
    container.restart(timeout=10)
    _wait_ready(f"http://127.0.0.1:{service.http_port}/v2/health/ready")
    return time.monotonic() - started


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="bench-cloud-"))
    os.environ["EDGEDEPLOY_HOME"] = str(folder / "home")
    model = build_digits_mlp(folder / "digits_mlp.onnx")
    bundle = _bundle(model, folder, None)
    x = digits_data().x_test[:1].astype(np.float32)
    base_url, private = _engine(folder)
    os.environ["DOCKER_HOST"] = base_url
    import docker

    client = docker.DockerClient(base_url=base_url)
    try:
        builds = _builds(client, bundle)
        print_table(builds, ["step", "seconds", "size_mb", "same_image"])

        from packager import services

        started = time.monotonic()
        service = services.deploy("bench-cloud", bundle, target="docker", auth=False, cpu=2.0, timeout=120)
        deploy_s = time.monotonic() - started
        container_ready_s = _restart_to_ready(client, service)
        local = _Agent(bundle, folder / "local-work")
        rows = []
        try:
            for _round in range(2):  # interleaved, so neither side always runs on a warmer machine
                rows += _serve_rows("local process", local.http, local.grpc, x)
                rows += _serve_rows("container", int(service.http_port or 0), int(service.grpc_port or 0), x)
        finally:
            local.stop()
            services.delete("bench-cloud")
        ratios = {p: _mean_rps(rows, "container", p) / _mean_rps(rows, "local process", p) for p in ("grpc", "rest")}
        print_table(rows, ["where", "protocol", "rps", "p50_ms", "p99_ms", "errors"])
        print(f"deploy --target docker (image cached) to ready: {deploy_s:.2f} s; container cold start (restart "
              f"to ready): {container_ready_s:.2f} s; local process cold start {local.cold_start_s:.2f} s")
        print(f"container / local throughput: gRPC {ratios['grpc']:.2f}x, REST {ratios['rest']:.2f}x "
              f"(concurrency {CONCURRENCY}, {SECONDS:.0f} s each)")
        write_results("cloud", {"builds": builds, "serving": rows, "container_over_local": ratios,
                                "deploy_to_ready_s": deploy_s, "container_cold_start_s": container_ready_s,
                                "local_cold_start_s": local.cold_start_s, "concurrency": CONCURRENCY,
                                "seconds": SECONDS})
    finally:
        client.close()
        if private is not None:
            private.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
