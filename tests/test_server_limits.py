"""The server's bound on request bytes in flight: the excess is refused (503 / RESOURCE_EXHAUSTED), the rest served.

The model is an entry script that takes a second per request, so concurrent requests overlap for
sure; the bound is a little over two requests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from tritonclient.grpc import service_pb2, service_pb2_grpc

from packager.keys import SigningKey
from tests.servers import RunningServer, serving
from tests.test_runtime import make_bundle

SLOW_SCORE = '''
import time

def init():
    pass

def run(raw_data):
    time.sleep(1.5)
    return {"ok": [1]}
'''
REQUEST_BYTES = 1024 * 1024
CONCURRENT = 8


@pytest.fixture
def server(tmp_path: Path, signing_key: SigningKey) -> Iterator[RunningServer]:
    bundle = make_bundle(tmp_path / "slow.edb", signing_key, name="slow", entry={"src/score.py": SLOW_SCORE})
    with serving(tmp_path / "work", [bundle], max_request_bytes=2 * REQUEST_BYTES,
                 max_inflight_bytes=int(2.5 * REQUEST_BYTES)) as running:
        yield running


def _all_at_once(call: Callable[[int], str]) -> list[str]:
    with ThreadPoolExecutor(CONCURRENT) as pool:
        return list(pool.map(call, range(CONCURRENT)))


def test_rest_refuses_bytes_beyond_the_inflight_bound(server: RunningServer) -> None:
    def score(_: int) -> str:
        answer = requests.post(server.http + "/score", data=b"\x01" * REQUEST_BYTES, timeout=60,
                               headers={"Content-Type": "application/octet-stream"})
        return str(answer.status_code) if answer.status_code != 503 else "503:" + answer.json()["error"]

    outcomes = _all_at_once(score)
    refused = [o for o in outcomes if o.startswith("503:")]
    assert "200" in outcomes and refused, outcomes
    assert all(o == "200" or "max_inflight_bytes" in o for o in outcomes), outcomes
    assert requests.post(server.http + "/score", data=b"\x01", timeout=60).status_code == 200  # budget released


def test_grpc_refuses_bytes_beyond_the_inflight_bound(server: RunningServer) -> None:
    request = service_pb2.ModelInferRequest(model_name="slow")
    request.inputs.add(name="data", datatype="UINT8", shape=[REQUEST_BYTES])
    request.raw_input_contents.append(np.ones(REQUEST_BYTES, np.uint8).tobytes())

    with grpc.insecure_channel(server.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        def infer(_: int) -> str:
            try:
                stub.ModelInfer(request, timeout=60)
            except grpc.RpcError as exc:
                return f"{exc.code().name}:{exc.details()}"
            return "OK"

        outcomes = _all_at_once(infer)
        assert "OK" in outcomes and any(o.startswith("RESOURCE_EXHAUSTED:") for o in outcomes), outcomes
        assert all(o == "OK" or "max_inflight_bytes" in o for o in outcomes), outcomes
