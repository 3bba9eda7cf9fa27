"""Memory of ``edge-agent serve`` under a burst of large gRPC requests, and what it keeps afterwards.

A burst of ``BENCH_MEMORY_CALLS`` (100) concurrent ``ModelInfer`` calls of ``BENCH_MEMORY_MB`` (10) MB
each goes to the digits MLP. For each variant the agent's RSS is read before, at the peak (sampled
every 20 ms) and 3 s after the burst, with the number of calls served and refused. Variants:

- ``unbounded``: ``--max-inflight-bytes`` far above the burst (the behaviour before the bound);
- ``unbounded, no trim``: the same with ``EDGEDEPLOY_MALLOC_TRIM=0`` (the agent does not hand freed
  heap back to the system when it goes idle);
- ``MALLOC_ARENA_MAX=2, no trim``: glibc limited to two malloc arenas instead of eight per core;
- ``default bound``: ``--max-inflight-bytes`` at its default (256 MiB).

Run: ``python -m bench memory``. Figures vary with the machine; the README quotes one run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.common import print_table, write_results
from bench.serving import _bundle, _wait_ready
from packager.examples import build_digits_mlp
from packager.targets.base import free_port

CALLS = int(os.environ.get("BENCH_MEMORY_CALLS", "100"))
MEGABYTES = float(os.environ.get("BENCH_MEMORY_MB", "10"))
_UNBOUNDED = str(1 << 40)
VARIANTS: list[tuple[str, list[str], dict[str, str]]] = [
    ("unbounded", ["--max-inflight-bytes", _UNBOUNDED], {}),
    ("unbounded, no trim", ["--max-inflight-bytes", _UNBOUNDED], {"EDGEDEPLOY_MALLOC_TRIM": "0"}),
    ("MALLOC_ARENA_MAX=2, no trim", ["--max-inflight-bytes", _UNBOUNDED],
     {"MALLOC_ARENA_MAX": "2", "EDGEDEPLOY_MALLOC_TRIM": "0"}),
    ("default bound", [], {}),
]


def _start(bundle: Path, workdir: Path, options: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    http, grpc_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "serve", "--bundle", str(bundle), "--http-port", str(http),
         "--grpc-port", str(grpc_port), "--no-auth", "--workdir", str(workdir), *options],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_ready(f"http://127.0.0.1:{http}/v2/health/ready")
    return process, grpc_port


def _burst(grpc_port: int, x: np.ndarray) -> tuple[int, int]:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    def call(_: int) -> bool:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        try:
            tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            client.infer("digits", [tensor], outputs=[grpcclient.InferRequestedOutput("label")])
            return True
        except InferenceServerException as exc:
            if exc.status() != "StatusCode.RESOURCE_EXHAUSTED":
                raise
            return False
        finally:
            client.close()

    with ThreadPoolExecutor(CALLS) as pool:
        served = sum(pool.map(call, range(CALLS)))
    return served, CALLS - served


def _measure(bundle: Path, folder: Path, name: str, options: list[str], env: dict[str, str],
             x: np.ndarray) -> dict[str, Any]:
    process, grpc_port = _start(bundle, folder / name.replace(" ", "-"), options, env)
    agent = psutil.Process(process.pid)
    try:
        before = agent.memory_info().rss
        peak, done = [before], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak.append(agent.memory_info().rss)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        served, refused = _burst(grpc_port, x)
        time.sleep(3.0)
        done.set()
        sampler.join()
        after = agent.memory_info().rss
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    return {"variant": name, "rss_before_mb": before / 1e6, "rss_peak_mb": max(peak) / 1e6,
            "rss_after_mb": after / 1e6, "served": served, "refused": refused}


def main() -> None:
    """Run every variant and print a table (also written to bench/results/memory.json)."""
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        folder = Path(tmp)
        bundle = _bundle(build_digits_mlp(folder / "digits_mlp.onnx"), folder, None)
        rows = int(MEGABYTES * 1e6 / (64 * 4))
        x = np.random.default_rng(0).random((rows, 64), dtype=np.float32)
        results = [_measure(bundle, folder, name, options, env, x) for name, options, env in VARIANTS]
    print(f"{CALLS} concurrent gRPC ModelInfer calls of {x.nbytes / 1e6:.1f} MB each")
    print_table(results, ["variant", "rss_before_mb", "rss_peak_mb", "rss_after_mb", "served", "refused"])
    write_results("memory", {"calls": CALLS, "request_mb": x.nbytes / 1e6, "variants": results})


if __name__ == "__main__":
    main()
