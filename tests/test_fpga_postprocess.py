"""Classifiers as skl2onnx writes them: the chain the FPGA builds and the tail the host runs, against onnxruntime."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from sklearn.exceptions import ConvergenceWarning

from edge_agent.errors import BundleError, PackagingError
from edge_agent.fpga.postprocess import HostOutputs
from edge_agent.runtime.hls import softmax
from edge_agent.tensors import TensorSpec
from packager.examples import DigitsData, build_digits_mlp
from packager.fpga.hls import float_forward
from packager.fpga.lower import Dense, Relu, Softmax, lower_model, lower_onnx

NAMES = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])


def _string_classifier(out: Path, digits: DigitsData, zipmap: bool) -> Path:
    """A small MLP whose classes are strings (skl2onnx then picks strings and keys the ZipMap by them)."""
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=60, random_state=0).fit(digits.x_train,
                                                                                     NAMES[digits.y_train])
    out.write_bytes(to_onnx(clf, digits.x_train[:1], options={id(clf): {"zipmap": zipmap}},
                            target_opset=17).SerializeToString())
    return out


@pytest.fixture(scope="module", params=["int", "int-zipmap", "str", "str-zipmap"])
def classifier(request: pytest.FixtureRequest, digits: DigitsData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("skl2onnx")
    zipmap = request.param.endswith("zipmap")
    if request.param.startswith("int"):
        return build_digits_mlp(folder / "mlp.onnx", zipmap=zipmap)
    return _string_classifier(folder / "mlp.onnx", digits, zipmap)


def _onnxruntime(model: Path, x: np.ndarray) -> dict[str, object]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {session.get_inputs()[0].name: x}), strict=True))


def test_skl2onnx_graphs_lower_to_the_dense_chain_and_a_host_tail(classifier: Path) -> None:
    lowered = lower_model(classifier)
    assert [type(layer) for layer in lowered.layers] == [Dense, Relu, Dense, Softmax]
    graph_outputs = [o.name for o in onnx.load(str(classifier)).graph.output]
    assert [o.name for o in lowered.host_outputs.outputs] == graph_outputs
    kinds = [o.kind for o in lowered.host_outputs.outputs]
    assert kinds in (["label", "probabilities"], ["label", "zipmap"])
    assert lowered.host_outputs.specs(10)[1] == TensorSpec(graph_outputs[1], "FP32", (-1, 10))


def test_the_host_tail_gives_what_onnxruntime_gives(classifier: Path, digits: DigitsData) -> None:
    """Fed onnxruntime's own probabilities, the host's label and ZipMap equal onnxruntime's, type for type."""
    expected = _onnxruntime(classifier, digits.x_test)
    label_name, probability_name = list(expected)
    host = lower_model(classifier).host_outputs
    zipmap = host.outputs[1].kind == "zipmap"
    if zipmap:
        keys = list(host.outputs[1].classes)
        probabilities = np.asarray([[row[key] for key in keys] for row in expected[probability_name]], np.float32)
    else:
        probabilities = np.asarray(expected[probability_name])
    tensors = host.compute(probabilities)
    label = tensors[label_name]
    ort_label = np.asarray(expected[label_name])
    assert label.dtype == ort_label.dtype or (label.dtype == object and ort_label.dtype == object)
    assert label.tolist() == ort_label.tolist() and label.shape == (len(digits.x_test),)
    answer = host.to_json(tensors)
    if zipmap:  # onnxruntime's list of {class: probability}; JSON keys are strings
        assert answer[probability_name] == [{str(k): v for k, v in row.items()} for row in expected[probability_name]]
    else:
        assert answer[probability_name] == np.asarray(expected[probability_name]).tolist()


def test_the_lowered_chain_and_tail_reproduce_onnxruntime(classifier: Path, digits: DigitsData) -> None:
    """In float, the chain the FPGA builds plus the host's tail is the skl2onnx model: same labels everywhere."""
    lowered = lower_model(classifier)
    logits, _hidden = float_forward(lowered.layers[:-1], digits.x_test)
    probabilities = softmax(logits.astype(np.float32))
    label_name = lowered.host_outputs.outputs[0].name
    expected = _onnxruntime(classifier, digits.x_test)
    assert lowered.host_outputs.compute(probabilities)[label_name].tolist() == \
        np.asarray(expected[label_name]).tolist()


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], outputs: list[str], path: Path,
           input_type: int = TensorProto.FLOAT) -> Path:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", input_type, ["N", 4])],
                              [helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None) for name in outputs],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)])
    onnx.save(model, str(path))
    return path


def _dense_softmax() -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(3, np.float32), "b"),
             numpy_helper.from_array(np.array([5, 6, 7], np.int64), "classes"),
             numpy_helper.from_array(np.array([-1], np.int64), "flat")]
    return [helper.make_node("Gemm", ["input", "w", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["p"], axis=1)], inits


def test_classes_other_than_indices_are_served_as_labels(tmp_path: Path) -> None:
    nodes, inits = _dense_softmax()
    nodes += [helper.make_node("ArgMax", ["p"], ["i"], axis=1),
              helper.make_node("ArrayFeatureExtractor", ["classes", "i"], ["picked"], domain="ai.onnx.ml"),
              helper.make_node("Reshape", ["picked", "flat"], ["label"])]
    host = lower_model(_model(nodes, inits, ["label", "p"], tmp_path / "m.onnx")).host_outputs
    served = host.compute(np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], np.float32))
    assert served["label"].tolist() == [6, 5] and served["label"].dtype == np.int64


@pytest.mark.parametrize(("tail", "outputs", "message"), [
    ([helper.make_node("ArgMax", ["p"], ["i"], axis=0)], ["i"], "not an argmax over the classes"),
    ([helper.make_node("ArgMax", ["p"], ["i"], axis=1)], ["i"], "is the argmax of the classes"),
    ([helper.make_node("ArgMax", ["logits"], ["i"], axis=1)], ["i", "p"], "needs the probabilities"),
    ([helper.make_node("Cast", ["p"], ["p16"], to=TensorProto.FLOAT16)], ["p16"], "to FLOAT16 changes the values"),
    ([helper.make_node("ZipMap", ["p"], ["z"], domain="ai.onnx.ml")], ["z"], "names no class labels"),
    ([helper.make_node("ArgMax", ["p"], ["i"], axis=1),
      helper.make_node("ArrayFeatureExtractor", ["classes", "i"], ["picked"], domain="ai.onnx.ml"),
      helper.make_node("Reshape", ["picked", "b"], ["label"])], ["label"], "other than [N]"),
])
def test_tails_the_host_does_not_run_are_refused(tail: list[onnx.NodeProto], outputs: list[str], message: str,
                                                 tmp_path: Path) -> None:
    nodes, inits = _dense_softmax()
    with pytest.raises(PackagingError, match=message.replace("[", r"\[").replace("]", r"\]")):
        lower_model(_model(nodes + tail, inits, outputs, tmp_path / "m.onnx"))


def test_a_cast_that_changes_the_input_is_refused(tmp_path: Path) -> None:
    nodes, inits = _dense_softmax()
    nodes = [helper.make_node("Cast", ["input"], ["x32"], to=TensorProto.FLOAT),
             helper.make_node("Gemm", ["x32", "w", "b"], ["logits"]), nodes[1]]
    with pytest.raises(PackagingError, match="Cast 'x32' to FLOAT changes the values"):
        lower_model(_model(nodes, inits, ["p"], tmp_path / "m.onnx", input_type=TensorProto.DOUBLE))
    assert len(lower_onnx(_model(nodes, inits, ["p"], tmp_path / "f.onnx"))) == 2  # float to float: folded


def test_other_operators_are_still_listed_all_at_once(tmp_path: Path) -> None:
    nodes, inits = _dense_softmax()
    nodes += [helper.make_node("Tanh", ["p"], ["t"]), helper.make_node("TopK", ["t", "flat"], ["v", "k"])]
    with pytest.raises(PackagingError) as refused:
        lower_model(_model(nodes, inits, ["v"], tmp_path / "m.onnx"))
    assert "do not support: Tanh, TopK (supported: Add, Conv" in str(refused.value)
    assert "ArgMax, ArrayFeatureExtractor, ZipMap after the last layer" in str(refused.value)


@pytest.mark.parametrize("runtime", [
    {"host_outputs": []},
    {"host_outputs": [{"name": "label", "kind": "argmax"}]},
    {"host_outputs": [{"name": "label", "kind": "label", "classes": [], "datatype": "INT64"}]},
    {"host_outputs": [{"name": "label", "kind": "label", "classes": [1, 2], "datatype": "FP32"}]},
    {"host_outputs": [{"name": "other", "kind": "probabilities"}]},
])
def test_a_malformed_host_outputs_section_is_a_bundle_error(runtime: dict[str, object]) -> None:
    with pytest.raises(BundleError, match="host_outputs"):
        HostOutputs.from_runtime(runtime, [TensorSpec("label", "INT64", (-1,))])


def test_a_bundle_without_host_outputs_serves_its_one_output_unchanged() -> None:
    """Bundles packaged before host_outputs existed: the chain's output is the model's one output."""
    host = HostOutputs.from_runtime({}, [TensorSpec("probabilities", "FP32", (-1, 3))])
    values = np.array([[0.2, 0.5, 0.3]], np.float32)
    assert host.to_json(host.compute(values)) == {"probabilities": values.tolist()}
    with pytest.raises(BundleError, match="exactly one output"):
        HostOutputs.from_runtime({}, [TensorSpec("a", "FP32", (-1,)), TensorSpec("b", "FP32", (-1,))])
