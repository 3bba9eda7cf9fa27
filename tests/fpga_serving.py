"""The check both FPGA targets share: a bundle of an skl2onnx classifier serves what onnxruntime gives for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort
import tritonclient.grpc as grpcclient

from edge_agent.runtime.hls import softmax
from tests.servers import RunningServer, post_json


def _tail(source: Path) -> tuple[ort.InferenceSession, str]:
    """onnxruntime on the source model's own post-processing alone: its Softmax output in, every output out."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(source)))  # the extractor needs the value types
    probabilities = next(node for node in model.graph.node if node.op_type == "Softmax").output[0]
    tail = onnx.utils.Extractor(model).extract_model([probabilities], [o.name for o in model.graph.output])
    return ort.InferenceSession(tail.SerializeToString(), providers=["CPUExecutionProvider"]), probabilities


def _as_matrix(value: Any, keys: list[Any] | None) -> np.ndarray:
    """Probabilities [N, classes] from a tensor or from ZipMap's dicts (in the ZipMap's key order)."""
    if keys is None:
        return np.asarray(value, dtype=np.float32)
    return np.asarray([[row[key] for key in keys] for row in value], dtype=np.float32)


def check_served_like_onnxruntime(server: RunningServer, source: Path, x: np.ndarray, logits: np.ndarray,
                                  report: dict[str, Any]) -> float:
    """Serve ``x`` over /score, v2 REST and gRPC; compare with onnxruntime on ``source``; return the agreement.

    ``logits`` are the bit-exact reference's for ``x``, ``report`` the bundle's accelerator report: the
    served label must be onnxruntime's post-processing of the served probabilities, exactly, and agree with
    onnxruntime's label on ``x`` as often as the report states for the validation set (``x``); the
    probabilities must lie within the report's largest logit error (``softmax`` moves each probability
    by at most a factor ``exp(2 * error)``).
    """
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    expected = dict(zip(names, session.run(None, {"input": x}), strict=True))
    label_name, probability_name = names
    zipmap = isinstance(expected[probability_name], list)
    ort_keys = list(expected[probability_name][0]) if zipmap else None
    keys = [str(key) for key in ort_keys] if ort_keys is not None else None  # JSON object keys are strings

    status, answer = post_json(f"{server.http}/score", {"data": x.tolist()})
    assert status == 200 and list(answer) == names, answer
    served = _as_matrix(answer[probability_name], keys)
    np.testing.assert_allclose(served, softmax(logits), rtol=0, atol=1e-6)  # the chain is bit-exact

    tail, softmax_name = _tail(source)
    from_served = dict(zip(names, tail.run(None, {softmax_name: served}), strict=True))
    assert answer[label_name] == from_served[label_name].tolist()
    if zipmap:
        rows = from_served[probability_name]
        assert answer[probability_name] == [{str(k): v for k, v in row.items()} for row in rows]

    agreement = float((np.asarray(answer[label_name]) == expected[label_name]).mean())
    assert abs(agreement - report["validation_agreement_top1"]) <= 1 / len(x)
    theirs, bound = _as_matrix(expected[probability_name], ort_keys), np.exp(2 * report["validation_max_abs_error"])
    assert np.all(served <= theirs * bound + 1e-6) and np.all(served >= theirs / bound - 1e-6)

    v2 = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    status, tensors = post_json(f"{server.http}/v2/models/digits/infer", v2)
    assert status == 200
    by_name = {t["name"]: t for t in tensors["outputs"]}
    assert by_name[label_name]["datatype"] == "INT64" and by_name[label_name]["data"] == answer[label_name]
    assert by_name[probability_name]["shape"] == [len(x), 10]
    np.testing.assert_array_equal(np.asarray(by_name[probability_name]["data"], np.float32).reshape(len(x), 10),
                                  served)
    client = grpcclient.InferenceServerClient(server.grpc)
    try:
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("digits", [tensor])
    finally:
        client.close()
    assert result.as_numpy(label_name).dtype == np.int64
    assert result.as_numpy(label_name).tolist() == answer[label_name]
    np.testing.assert_array_equal(result.as_numpy(probability_name), served)
    return agreement
