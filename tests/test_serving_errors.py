"""Bad requests get the documented error over REST (``requests``) and gRPC (tritonclient's protos), never a 500.

Each case reproduces a defect of issue 13 item 8, or checks one row of ``edge_agent.error_status``
through a real server.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import requests
from tritonclient.grpc import service_pb2, service_pb2_grpc

from packager.keys import SigningKey, generate_key
from tests import test_grpc
from tests.servers import RunningServer
from tests.test_bundle import GOOD, _entry, _forge

HUGE = 4611686018427387905  # times 64 wraps around to 64 in int64 arithmetic


bundle, server = test_grpc.bundle, test_grpc.server  # the digits MLP served on loopback, as the gRPC tests use it


@pytest.fixture
def stub(server: RunningServer) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.grpc) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _rest_infer(server: RunningServer, inputs: list[dict[str, Any]]) -> requests.Response:
    return requests.post(server.http + "/v2/models/digits/infer", json={"inputs": inputs}, timeout=30)


def _assert_400(answer: requests.Response, text: str) -> None:
    assert answer.status_code == 400, answer.text
    assert text in answer.json()["error"]


def _grpc_refusal(stub: service_pb2_grpc.GRPCInferenceServiceStub, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    return info.value


def _typed_request(shape: list[int], values: list[float]) -> Any:
    request = service_pb2.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=shape)
    tensor.contents.fp32_contents.extend(values)
    return request


# --- shapes whose size overflows --------------------------------------------------------------


def test_rest_shape_that_overflows_the_size_product(server: RunningServer) -> None:
    answer = _rest_infer(server, [{"name": "input", "datatype": "FP32", "shape": [HUGE, 64], "data": [0.0] * 64}])
    _assert_400(answer, "shape")


def test_grpc_shape_that_overflows_the_size_product(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    error = _grpc_refusal(stub, _typed_request([HUGE, 64], [0.0] * 64))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "shape" in error.details() and "Traceback" not in error.details()


# --- deep and non-finite JSON -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v2/models/digits/infer", "/score"])
def test_rest_deeply_nested_json(server: RunningServer, path: str) -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    answer = requests.post(server.http + path, data=body, headers={"Content-Type": "application/json"}, timeout=30)
    _assert_400(answer, "deeper")


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
@pytest.mark.parametrize("path", ["/v2/models/digits/infer", "/score"])
def test_rest_non_finite_numbers_are_refused(server: RunningServer, path: str, number: str) -> None:
    values = ", ".join(["0.5"] * 63 + [number])
    body = (f'{{"inputs": [{{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [{values}]}}]}}'
            if path.endswith("infer") else f'{{"data": [[{values}]]}}')
    answer = requests.post(server.http + path, data=body, headers={"Content-Type": "application/json"}, timeout=30)
    _assert_400(answer, "JSON")


def test_grpc_floats_reach_the_model_as_ieee_values(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    """Binary floats carry NaN as a value, as in Triton: documented, not refused."""
    response = stub.ModelInfer(_typed_request([1, 64], [float("nan")] + [0.5] * 63), timeout=30)
    assert [o.name for o in response.outputs] == ["label", "probabilities"]


# --- malformed protobuf -----------------------------------------------------------------------


def test_grpc_malformed_protobuf_is_invalid_argument(server: RunningServer) -> None:
    with grpc.insecure_channel(server.grpc) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw)
        with pytest.raises(grpc.RpcError) as info:
            call(b"\x0a\xff\xff\xff\xff\x0f", timeout=30)  # field 1 claims a 4 GiB string
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "protobuf" in info.value.details()


# --- datatypes that differ from the model's ---------------------------------------------------

_OTHER_TYPES = {"INT64": np.int64, "BOOL": np.bool_, "FP16": np.float16, "INT8": np.int8}


@pytest.mark.parametrize("datatype", sorted(_OTHER_TYPES))
def test_rest_datatype_other_than_the_models_is_refused(server: RunningServer, datatype: str) -> None:
    data = [True] * 64 if datatype == "BOOL" else [1] * 64
    answer = _rest_infer(server, [{"name": "input", "datatype": datatype, "shape": [1, 64], "data": data}])
    _assert_400(answer, "expects FP32")


@pytest.mark.parametrize("datatype", sorted(_OTHER_TYPES))
def test_grpc_datatype_other_than_the_models_is_refused(stub: service_pb2_grpc.GRPCInferenceServiceStub,
                                                        datatype: str) -> None:
    request = service_pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype=datatype, shape=[1, 64])
    request.raw_input_contents.append(np.ones((1, 64), _OTHER_TYPES[datatype]).tobytes())
    error = _grpc_refusal(stub, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expects FP32" in error.details()


# --- duplicate inputs, typed and raw contents together ----------------------------------------


def test_rest_duplicate_inputs_are_refused(server: RunningServer) -> None:
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}
    _assert_400(_rest_infer(server, [tensor, tensor]), "twice")


def test_grpc_duplicate_inputs_are_refused(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = _typed_request([1, 64], [0.0] * 64)
    request.inputs.append(request.inputs[0])
    error = _grpc_refusal(stub, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "twice" in error.details()


def test_rest_data_and_binary_together_are_refused(server: RunningServer) -> None:
    header = (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ['
              + b", ".join([b"0.0"] * 64) + b'], "parameters": {"binary_data_size": 256}}]}')
    answer = requests.post(server.http + "/v2/models/digits/infer", data=header + b"\x00" * 256, timeout=30,
                           headers={"Inference-Header-Content-Length": str(len(header))})
    _assert_400(answer, "both")


def test_grpc_typed_and_raw_contents_together_are_refused(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = _typed_request([1, 64], [0.0] * 64)
    request.raw_input_contents.append(struct.pack("<64f", *([0.0] * 64)))
    error = _grpc_refusal(stub, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "both" in error.details()


# --- every BundleError class on the repository load, over both adapters -----------------------


def _bad_bundles(folder: Path, key: SigningKey) -> dict[str, Path]:
    folder.mkdir()
    stranger = generate_key("stranger", home=folder / "elsewhere")

    def set_hash(document: dict[str, Any]) -> None:
        document["files"][0]["sha256"] = "0" * 64

    garbage = folder / "not-a-bundle.edb"
    garbage.write_bytes(b"not a tar")
    return {
        "SignatureError": _forge(folder / "unsigned.edb", None, GOOD, []),
        "UntrustedKeyError": _forge(folder / "stranger.edb", stranger, GOOD, []),
        "IntegrityError": _forge(folder / "altered.edb", key, GOOD, [], set_hash),
        "UnsafeArchiveError": _forge(folder / "escape.edb", key, GOOD, [_entry("payload/../../evil.py", b"x")]),
        "BundleError": garbage,
    }


_BUNDLE_ERRORS = ["SignatureError", "UntrustedKeyError", "IntegrityError", "UnsafeArchiveError", "BundleError"]


@pytest.mark.parametrize("kind", _BUNDLE_ERRORS)
def test_rest_load_of_a_bad_bundle_is_400(server: RunningServer, signing_key: SigningKey, tmp_path: Path,
                                          kind: str) -> None:
    path = _bad_bundles(tmp_path / "bad", signing_key)[kind]
    answer = requests.post(server.http + "/v2/repository/models/other/load", timeout=30,
                           json={"parameters": {"bundle": str(path)}})
    assert answer.status_code == 400, answer.text
    assert "internal" not in answer.json()["error"]
    assert requests.post(server.http + "/v2/repository/index", timeout=30).json()[0]["name"] == "digits"


@pytest.mark.parametrize("kind", _BUNDLE_ERRORS)
def test_grpc_load_of_a_bad_bundle_is_invalid_argument(server: RunningServer, signing_key: SigningKey,
                                                       stub: service_pb2_grpc.GRPCInferenceServiceStub,
                                                       tmp_path: Path, kind: str) -> None:
    path = _bad_bundles(tmp_path / "bad", signing_key)[kind]
    request = service_pb2.RepositoryModelLoadRequest(model_name="other")
    request.parameters["bundle"].string_param = str(path)
    with pytest.raises(grpc.RpcError) as info:
        stub.RepositoryModelLoad(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
