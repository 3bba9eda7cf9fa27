"""REST server: v2 paths with tritonclient.http, Azure ML-style /score, swagger, metrics, keys, bad input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from packager.examples import DigitsData
from packager.keys import SigningKey
from tests.servers import RunningServer, digits_bundle, get, post_json, serving


@pytest.fixture
def bundle(digits_mlp: Path, digits: DigitsData, signing_key: SigningKey, tmp_path: Path) -> Path:
    return digits_bundle(digits_mlp, digits, tmp_path)


@pytest.fixture
def server(bundle: Path, tmp_path: Path) -> Iterator[RunningServer]:
    with serving(tmp_path / "work", [bundle], max_request_bytes=256 * 1024) as running:
        yield running


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_http(server: RunningServer, digits: DigitsData, binary: bool) -> None:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
        assert client.get_model_metadata("digits")["inputs"][0]["shape"] == [-1, 64]
        tensor = httpclient.InferInput("input", [4, 64], "FP32")
        tensor.set_data_from_numpy(digits.x_test[:4], binary_data=binary)
        outputs = [httpclient.InferRequestedOutput("label", binary_data=binary),
                   httpclient.InferRequestedOutput("probabilities", binary_data=binary)]
        result = client.infer("digits", [tensor], outputs=outputs)
        np.testing.assert_array_equal(result.as_numpy("label"), digits.y_test[:4])
        assert result.as_numpy("probabilities").shape == (4, 10)
    finally:
        client.close()


def test_score_answers_like_the_model(server: RunningServer, digits: DigitsData) -> None:
    status, body = post_json(server.http + "/score", {"data": digits.x_test[:3].tolist()})
    assert status == 200 and body["label"] == digits.y_test[:3].tolist()
    named_body = {"inputs": {"input": digits.x_test[:1].tolist()}}
    status, named = post_json(server.http + "/v2/models/digits/score", named_body)
    assert status == 200 and named["label"] == digits.y_test[:1].tolist()


@pytest.mark.parametrize(
    ("path", "body", "status", "text"),
    [
        ("/score", b"{not json", 400, "not valid JSON"),
        ("/score", {"nodata": 1}, 400, "'data'"),
        ("/score", {"data": [[1, 2, 3]]}, 400, "shape"),
        ("/score", {"data": [["a"] * 64]}, 400, "dtype"),
        ("/score", {"data": [[0.0] * 64, [0.0] * 3]}, 400, "rectangular"),
        ("/v2/models/digits/infer", {"inputs": "x"}, 400, "inputs"),
        ("/v2/models/digits/infer", {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64]}]}, 400, "data"),
        ("/v2/models/digits/infer", {"inputs": [{"name": "input", "datatype": "FP99", "shape": [1], "data": [1]}]},
         400, "datatype"),
        ("/v2/models/digits/infer", {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64],
                                                 "data": [0.0] * 64}]}, 400, "needs 128"),
        ("/v2/models/ghost/infer", {"inputs": []}, 404, "ghost"),
        ("/score", {"data": [[0.0] * 64] * 2000}, 413, "too large"),
    ],
)
def test_bad_input_is_4xx_with_a_message(server: RunningServer, path: str, body: object, status: int,
                                         text: str) -> None:
    got, answer = post_json(server.http + path, body)
    assert got == status
    assert text in answer["error"]
    ok, _ = post_json(server.http + "/score", {"data": [[0.0] * 64]})
    assert ok == 200  # still serving


def test_swagger_from_samples(server: RunningServer) -> None:
    status, body = get(server.http + "/swagger.json")
    document = json.loads(body)
    assert status == 200 and document["openapi"].startswith("3.")
    request = document["paths"]["/score"]["post"]["requestBody"]["content"]["application/json"]
    assert request["schema"]["properties"]["data"]["type"] == "array"
    assert len(request["example"]["data"]) == 2
    response = document["paths"]["/score"]["post"]["responses"]["200"]["content"]["application/json"]
    assert set(response["schema"]["properties"]) == {"label", "probabilities"}


def test_metrics_count_requests_and_errors(server: RunningServer, digits: DigitsData) -> None:
    for _ in range(3):
        post_json(server.http + "/score", {"data": digits.x_test[:1].tolist()})
    post_json(server.http + "/score", {"data": [[1.0]]})
    status, body = get(server.http + "/metrics")
    text = body.decode()
    assert status == 200
    assert 'edgedeploy_requests_total{model="digits"} 4' in text
    assert 'edgedeploy_errors_total{model="digits"} 1' in text
    assert 'edgedeploy_request_latency_ms_bucket{model="digits",le="+Inf"} 4' in text


def test_keys_on_rest(bundle: Path, tmp_path: Path, digits: DigitsData) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"primary_key": "first", "secondary_key": "second"}))
    body = {"data": digits.x_test[:1].tolist()}
    with serving(tmp_path / "work2", [bundle], keys_file=keys, auth_enabled=True) as running:
        assert get(running.http + "/v2/health/ready")[0] == 200
        assert post_json(running.http + "/score", body)[0] == 401
        assert post_json(running.http + "/score", body, {"Authorization": "Bearer wrong"})[0] == 401
        assert post_json(running.http + "/score", body, {"Authorization": "Bearer second"})[0] == 200
        keys.write_text(json.dumps({"primary_key": "rotated", "secondary_key": "second-2"}))
        assert post_json(running.http + "/score", body, {"Authorization": "Bearer first"})[0] == 401
        assert post_json(running.http + "/score", body, {"Authorization": "Bearer rotated"})[0] == 200
        assert get(running.http + "/swagger.json")[0] == 401  # it shows the model's tensors and samples
        swagger = json.loads(get(running.http + "/swagger.json", {"Authorization": "Bearer rotated"})[1])
        assert swagger["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_hot_swap_over_the_repository_api(server: RunningServer, bundle: Path, digits: DigitsData) -> None:
    status, _ = post_json(server.http + "/v2/repository/models/digits/load", {"parameters": {"bundle": str(bundle)}})
    assert status == 200
    status, index = post_json(server.http + "/v2/repository/index", {})
    assert [(m["name"], m["state"]) for m in index] == [("digits", "READY")]
    assert post_json(server.http + "/v2/repository/models/digits/load",
                     {"parameters": {"bundle": "/no/such.edb"}})[0] == 400
    assert post_json(server.http + "/score", {"data": digits.x_test[:1].tolist()})[0] == 200
