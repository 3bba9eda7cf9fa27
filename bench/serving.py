"""Serving benchmark, side by side in one run on the same model and cores.

Targets: raw onnxruntime ``session.run`` in this process (the limit), our gRPC and REST servers
(``edge-agent serve`` in its own process, driven by tritonclient), and MLServer serving the same
ONNX model through a small custom runtime (in its own virtual environment, ``.venv-mlserver``,
which ``make bench`` creates).
Concurrency 1, 8 and 32 at batch 1: throughput, p50, p99 and the ratio to raw. Also the transport
floor (grpc.health.v1 Check, empty HTTP GET), the agent's RSS with one model and its cold start.

The client threads run on the same two cores as the server, so every server number includes the
cost of a Python client; raw onnxruntime has no client. Ratios matter more than absolute values.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import psutil

from bench.common import print_table, write_results
from packager.examples import build_digits_mlp, digits_data
from packager.targets.base import free_port

DURATION_S = float(os.environ.get("BENCH_SERVING_SECONDS", "3"))
CONCURRENCY = (1, 8, 32)
MLSERVER_VENV = Path(os.environ.get("MLSERVER_VENV", Path(__file__).resolve().parent.parent / ".venv-mlserver"))
_RUNTIME = '''
import numpy as np, onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

class OnnxRuntime(MLModel):
    async def load(self):
        self.session = ort.InferenceSession(self.settings.parameters.uri, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feed = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        outs = self.session.run(self.names, feed)
        return InferenceResponse(model_name=self.name, outputs=[
            NumpyCodec.encode_output(name=n, payload=v) for n, v in zip(self.names, outs)])
'''



def _wait_ready(url: str, timeout: float = 120.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def _load(call: Callable[[], Any], concurrency: int, seconds: float) -> dict[str, float]:
    """Run ``call`` from ``concurrency`` threads for ``seconds``; throughput and latency percentiles."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    stop = time.monotonic() + seconds
    errors = [0]

    def worker(index: int) -> None:
        record = latencies[index]
        while time.monotonic() < stop:
            begin = time.perf_counter()
            try:
                call()
            except Exception:  # noqa: BLE001 - counted, reported
                errors[0] += 1
                continue
            record.append((time.perf_counter() - begin) * 1000.0)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    flat = np.concatenate([np.asarray(r) for r in latencies if r]) if any(latencies) else np.zeros(1)
    return {"rps": len(flat) / elapsed, "p50_ms": float(np.percentile(flat, 50)),
            "p99_ms": float(np.percentile(flat, 99)), "errors": errors[0]}


def _grpc_call(target: str, model: str, x: np.ndarray, input_name: str) -> Callable[[], Any]:
    import tritonclient.grpc as grpcclient

    local = threading.local()

    def call() -> Any:
        if not hasattr(local, "client"):
            local.client = grpcclient.InferenceServerClient(target)
            local.tensor = grpcclient.InferInput(input_name, list(x.shape), "FP32")
            local.tensor.set_data_from_numpy(x)
        return local.client.infer(model, [local.tensor])

    return call


def _rest_call(base: str, model: str, x: np.ndarray, input_name: str) -> Callable[[], Any]:
    import tritonclient.http as httpclient

    local = threading.local()

    def call() -> Any:
        if not hasattr(local, "client"):
            local.client = httpclient.InferenceServerClient(base.removeprefix("http://"))
            local.tensor = httpclient.InferInput(input_name, list(x.shape), "FP32")
            local.tensor.set_data_from_numpy(x)
        return local.client.infer(model, [local.tensor])

    return call


def _floor(grpc_target: str, http_base: str) -> dict[str, float]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(grpc_target)
    stub = health_pb2_grpc.HealthStub(channel)
    health = _load(lambda: stub.Check(health_pb2.HealthCheckRequest()), 1, DURATION_S)
    channel.close()
    import http.client

    connection = http.client.HTTPConnection(http_base.removeprefix("http://"))

    def get() -> None:
        connection.request("GET", "/v2/health/live")
        connection.getresponse().read()

    empty = _load(get, 1, DURATION_S)
    connection.close()
    return {"grpc_health_p50_ms": health["p50_ms"], "http_empty_p50_ms": empty["p50_ms"]}


class _Agent:
    """``edge-agent serve`` in its own process."""

    def __init__(self, bundle: Path, workdir: Path) -> None:
        self.http, self.grpc = free_port(), free_port()
        started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "serve", "--bundle", str(bundle), "--http-port", str(self.http),
             "--grpc-port", str(self.grpc), "--no-auth", "--workdir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        _wait_ready(f"http://127.0.0.1:{self.http}/v2/health/ready")
        self.cold_start_s = time.monotonic() - started

    def rss_mb(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / 1e6

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _mlserver(model: Path, folder: Path) -> tuple[subprocess.Popen[bytes] | None, int, str]:
    binary = MLSERVER_VENV / "bin" / "mlserver"
    if not binary.exists():
        return None, 0, f"MLServer is not installed in {MLSERVER_VENV} (make bench creates it: pip install mlserver)"
    (folder / "runtime.py").write_text(_RUNTIME)
    (folder / "model-settings.json").write_text(json.dumps(
        {"name": "digits", "implementation": "runtime.OnnxRuntime", "parameters": {"uri": str(model)}}))
    http, grpc_port = free_port(), free_port()
    (folder / "settings.json").write_text(json.dumps(
        {"http_port": http, "grpc_port": grpc_port, "metrics_port": free_port(), "parallel_workers": 0,
         "host": "127.0.0.1"}))
    process = subprocess.Popen([str(binary), "start", str(folder)], cwd=folder, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_ready(f"http://127.0.0.1:{http}/v2/models/digits/ready", timeout=90)
    except RuntimeError as exc:
        process.kill()
        return None, 0, f"MLServer did not start: {exc}"
    return process, grpc_port, ""


def _bundle(model: Path, folder: Path, batching: dict[str, Any] | None) -> Path:
    from packager.keys import generate_key
    from packager.packaging import package

    os.environ["EDGEDEPLOY_HOME"] = str(folder / "home")
    if not (folder / "home" / "keys" / "default.key").exists():
        generate_key()
    return package(model, "cpu-x86_64", folder / f"{model.stem}.edb", quantize="none", batching=batching,
                   name="digits" if "digits" in model.stem else model.stem).bundle_path


def _conv_model(folder: Path) -> Path | None:
    from bench.packager import _ocr_model

    return _ocr_model()


def _rows_for(name: str, model: Path, x: np.ndarray, input_name: str, folder: Path,
              batching: dict[str, Any] | None, with_mlserver: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feed = {input_name: x}
    rows: list[dict[str, Any]] = []
    raw = {c: _load(lambda: session.run(None, feed), c, DURATION_S) for c in CONCURRENCY}
    agent = _Agent(_bundle(model, folder, batching), folder / f"work-{name}")
    served_name = "digits" if "digits" in model.stem else model.stem
    extra = {"agent_rss_mb": agent.rss_mb(), "agent_cold_start_s": agent.cold_start_s}
    try:
        targets = {"grpc": _grpc_call(f"127.0.0.1:{agent.grpc}", served_name, x, input_name),
                   "rest": _rest_call(f"http://127.0.0.1:{agent.http}", served_name, x, input_name)}
        if with_mlserver:
            process, port, note = _mlserver(model, folder / "mlserver")
            extra["mlserver"] = note or "running"
            if process is not None:
                targets["mlserver-grpc"] = _grpc_call(f"127.0.0.1:{port}", "digits", x, input_name)
        for concurrency in CONCURRENCY:
            rows.append({"model": name, "target": "raw onnxruntime", "conc": concurrency, **raw[concurrency],
                         "ratio": 1.0})
            for target, call in targets.items():
                result = _load(call, concurrency, DURATION_S)
                rows.append({"model": name, "target": target, "conc": concurrency, **result,
                             "ratio": result["rps"] / raw[concurrency]["rps"]})
        extra.update(_floor(f"127.0.0.1:{agent.grpc}", f"http://127.0.0.1:{agent.http}"))
        extra["raw_b1_p50_ms"] = raw[1]["p50_ms"]
    finally:
        agent.stop()
        if with_mlserver and "process" in locals() and process is not None:
            os.killpg(process.pid, signal.SIGTERM)
    return rows, extra


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    saved_home = os.environ.get("EDGEDEPLOY_HOME")
    try:
        data = digits_data()
        mlp = build_digits_mlp(folder / "digits.onnx")
        (folder / "mlserver").mkdir()
        rows, small = _rows_for("digits-mlp", mlp, data.x_test[:1], "input", folder, None, with_mlserver=True)
        extras = {"digits-mlp": small}
        conv = _conv_model(folder)
        if conv is not None:
            x = np.random.default_rng(0).random((1, 3, 48, 320), dtype=np.float32)
            conv_rows, conv_extra = _rows_for("ppocr-rec (batched)", conv, x, "x", folder,
                                              {"max_batch_size": 8, "max_queue_delay_us": 2000,
                                               "preferred_batch_sizes": [8]}, with_mlserver=False)
            session = ort.InferenceSession(str(conv), providers=["CPUExecutionProvider"])
            batch8 = np.repeat(x, 8, axis=0)
            raw8 = _load(lambda: session.run(None, {"x": batch8}), 1, DURATION_S)
            conv_extra["raw_batch8_images_per_s"] = raw8["rps"] * 8
            rows += conv_rows
            extras["ppocr-rec"] = conv_extra
        print_table(rows, ["model", "target", "conc", "rps", "p50_ms", "p99_ms", "ratio", "errors"])
        for name, extra in extras.items():
            print(name, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in extra.items()}))
        write_results("serving", {"rows": rows, "extras": extras, "seconds_per_cell": DURATION_S})
    finally:
        if saved_home is None:
            os.environ.pop("EDGEDEPLOY_HOME", None)
        else:
            os.environ["EDGEDEPLOY_HOME"] = saved_home
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
