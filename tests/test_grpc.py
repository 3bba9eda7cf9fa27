"""gRPC Open Inference Protocol server, driven by the real tritonclient.grpc client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from packager.examples import DigitsData
from packager.keys import SigningKey
from tests.servers import RunningServer, digits_bundle, serving


@pytest.fixture
def bundle(digits_mlp: Path, digits: DigitsData, signing_key: SigningKey, tmp_path: Path) -> Path:
    return digits_bundle(digits_mlp, digits, tmp_path)


@pytest.fixture
def server(bundle: Path, tmp_path: Path) -> Iterator[RunningServer]:
    with serving(tmp_path / "work", [bundle]) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[grpcclient.InferenceServerClient]:
    triton = grpcclient.InferenceServerClient(server.grpc)
    yield triton
    triton.close()


def _input(x: np.ndarray, name: str = "input", datatype: str = "FP32") -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return tensor


def test_health_and_metadata(client: grpcclient.InferenceServerClient, server: RunningServer) -> None:
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
    assert client.get_server_metadata().name == "edgedeploy"
    meta = client.get_model_metadata("digits")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 64])]
    assert [t.name for t in meta.outputs] == ["label", "probabilities"]
    with grpc.insecure_channel(server.grpc) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_infer_matches_onnxruntime(client: grpcclient.InferenceServerClient, digits_mlp: Path,
                                   digits: DigitsData) -> None:
    x = digits.x_test[:5]
    expected = ort.InferenceSession(str(digits_mlp), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    result = client.infer("digits", [_input(x)])
    np.testing.assert_array_equal(result.as_numpy("label"), expected[0])
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected[1], rtol=1e-5)
    only = client.infer("digits", [_input(x)], outputs=[grpcclient.InferRequestedOutput("label")])
    assert only.as_numpy("probabilities") is None


def test_typed_contents_without_raw(server: RunningServer, digits: DigitsData) -> None:
    from edge_agent.grpc import grpc_service_pb2_grpc
    from edge_agent.grpc import oip_messages_pb2 as pb

    request = pb.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    tensor.contents.fp32_contents.extend(digits.x_test[0].tolist())
    with grpc.insecure_channel(server.grpc) as channel:
        response = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert not response.raw_output_contents
    label = next(o for o in response.outputs if o.name == "label")
    assert list(label.contents.int64_contents) == [digits.y_test[0]]


@pytest.mark.parametrize(
    ("tensor", "text"),
    [
        (lambda x: _input(x, name="wrong"), "unknown"),
        (lambda x: _input(x[:, :10]), "shape"),
        (lambda x: _input(x.astype(np.float64), datatype="FP64"), "dtype"),
    ],
)
def test_bad_requests_are_invalid_argument(client: grpcclient.InferenceServerClient, digits: DigitsData,
                                           tensor: object, text: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer("digits", [tensor(digits.x_test[:2])])  # type: ignore[operator]
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert text in info.value.message()


def test_raw_contents_of_the_wrong_size(server: RunningServer) -> None:
    from edge_agent.grpc import grpc_service_pb2_grpc
    from edge_agent.grpc import oip_messages_pb2 as pb

    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(b"\x00" * 10)
    with grpc.insecure_channel(server.grpc) as channel, pytest.raises(grpc.RpcError) as info:
        grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_model_is_not_found(client: grpcclient.InferenceServerClient, digits: DigitsData) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer("nope", [_input(digits.x_test[:1])])
    assert info.value.status() == "StatusCode.NOT_FOUND"


def test_repository_index_load_and_unload(client: grpcclient.InferenceServerClient, server: RunningServer,
                                          bundle: Path, digits: DigitsData) -> None:
    index = client.get_model_repository_index()
    assert [(m.name, m.state) for m in index.models] == [("digits", "READY")]
    from edge_agent.grpc import grpc_service_pb2_grpc
    from edge_agent.grpc import oip_messages_pb2 as pb

    with grpc.insecure_channel(server.grpc) as channel:  # tritonclient cannot pass a bundle parameter
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        load = pb.RepositoryModelLoadRequest(model_name="second")
        load.parameters["bundle"].string_param = str(bundle)
        stub.RepositoryModelLoad(load)
    assert client.is_model_ready("second")
    assert client.infer("second", [_input(digits.x_test[:1])]).as_numpy("label")[0] == digits.y_test[0]
    client.unload_model("second")
    assert {m.name for m in client.get_model_repository_index().models} == {"digits"}
    with pytest.raises(InferenceServerException) as info:
        client.unload_model("second")
    assert info.value.status() == "StatusCode.NOT_FOUND"


def test_auth_on_grpc(bundle: Path, tmp_path: Path, digits: DigitsData) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"primary_key": "p-key", "secondary_key": "s-key"}))
    with serving(tmp_path / "work2", [bundle], keys_file=keys, auth_enabled=True) as running:
        triton = grpcclient.InferenceServerClient(running.grpc)
        try:
            assert triton.is_server_live()  # health stays open
            with pytest.raises(InferenceServerException) as info:
                triton.infer("digits", [_input(digits.x_test[:1])])
            assert info.value.status() == "StatusCode.UNAUTHENTICATED"
            for key in ("p-key", "s-key"):
                answer = triton.infer("digits", [_input(digits.x_test[:1])], headers={"authorization": f"Bearer {key}"})
                assert answer.as_numpy("label")[0] == digits.y_test[0]
        finally:
            triton.close()
