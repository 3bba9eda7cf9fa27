"""Small real models built on this machine from scikit-learn's bundled digits data.

Used by ``make demo``, the tests and the benchmarks; nothing is downloaded. Needs the ``dev``
extra (scikit-learn, skl2onnx).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DigitsData", "build_digits_cnn", "build_digits_deep_mlp", "build_digits_dense_mlp", "build_digits_mlp",
           "digits_data"]


@dataclass(frozen=True)
class DigitsData:
    """8x8 digits scaled to [0, 1], split into train and held-out test sets."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits_data(seed: int = 0) -> DigitsData:
    """The 1797 digits, float32 in [0, 1], 70/30 split (deterministic for a seed)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(len(x) * 0.7)
    train, test = order[:cut], order[cut:]
    return DigitsData(x[train], y[train], x[test], y[test])


def build_digits_mlp(out: Path, hidden: int = 64, seed: int = 0, zipmap: bool = False) -> Path:
    """Train a 64-hidden-unit MLP on digits and write it as ONNX (input ``input`` [N,64] float32).

    Outputs ``label`` (int64 [N]) and ``probabilities`` (float32 [N,10]); with ``zipmap``, skl2onnx's
    default ``output_label`` (int64 [N]) and ``output_probability`` (one ``{class: probability}`` per sample).
    """
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier

    data = digits_data(seed)
    clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=400, random_state=seed)
    clf.fit(data.x_train, data.y_train)
    onx = to_onnx(clf, data.x_train[:1], options={id(clf): {"zipmap": zipmap}},
                  initial_types=None, target_opset=17)
    _rename_input(onx, "input")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(onx.SerializeToString())
    return out


def build_digits_deep_mlp(out: Path, hidden: tuple[int, ...] = (256, 128), seed: int = 0,
                          head_seed: int | None = None, max_iter: int = 200) -> Path:
    """A digits MLP with several hidden layers, as ONNX (skl2onnx; input ``input`` [N,64], no zipmap).

    With ``head_seed``, the same network (same ``seed``) whose last layer alone was retrained: a
    multinomial logistic regression fitted on the last hidden layer's activations of a bootstrap sample
    of the training set drawn with ``head_seed`` replaces the output weights and biases, every other
    tensor keeps its bytes. This is the update delta bundles are measured on (``bench/delta.py``).
    """
    import warnings

    from skl2onnx import to_onnx
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    data = digits_data(0)
    # one BLAS thread: on matrices this small more threads only contend (10x slower on a loaded 2-core machine)
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(hidden_layer_sizes=hidden, max_iter=max_iter, random_state=seed).fit(data.x_train,
                                                                                                data.y_train)
        if head_seed is not None:
            rows = np.random.default_rng(head_seed).integers(0, len(data.x_train), len(data.x_train))
            features = data.x_train[rows]
            for weights, bias in zip(clf.coefs_[:-1], clf.intercepts_[:-1], strict=True):
                features = np.maximum(features @ weights + bias, 0.0)  # the hidden layers' ReLU
            head = LogisticRegression(max_iter=300).fit(features, data.y_train[rows])
            clf.coefs_[-1], clf.intercepts_[-1] = head.coef_.T.copy(), head.intercept_.copy()
    onx = to_onnx(clf, data.x_train[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    _rename_input(onx, "input")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(onx.SerializeToString())
    return out


def build_digits_dense_mlp(out: Path, hidden: int = 32, seed: int = 0) -> Path:
    """A digits MLP as a framework would export it: Gemm > Relu > Gemm > Softmax (the FPGA targets' shape).

    Trained with scikit-learn, written with onnx.helper. Input ``input`` [N,64] float32 in [0, 1],
    output ``probabilities`` [N,10].
    """
    import warnings

    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    data = digits_data(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=600, random_state=seed).fit(data.x_train,
                                                                                              data.y_train)
    (w1, w2), (b1, b2) = clf.coefs_, clf.intercepts_
    inits = [numpy_helper.from_array(np.ascontiguousarray(w.T).astype(np.float32), f"fc{i}.weight")
             for i, w in ((1, w1), (2, w2))]
    inits += [numpy_helper.from_array(b.astype(np.float32), f"fc{i}.bias") for i, b in ((1, b1), (2, b2))]
    nodes = [helper.make_node("Gemm", ["input", "fc1.weight", "fc1.bias"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["a"], name="relu1"),
             helper.make_node("Gemm", ["a", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
             helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1)]
    graph = helper.make_graph(nodes, "digits_mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                  ["N", 64])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return out


def _rename_input(model, name: str) -> None:  # type: ignore[no-untyped-def]
    old = model.graph.input[0].name
    model.graph.input[0].name = name
    for node in model.graph.node:
        node.input[:] = [name if i == old else i for i in node.input]


def build_digits_cnn(out: Path, channels: int = 16, seed: int = 0) -> Path:
    """A small digits CNN as ONNX: Conv3x3(16) > ReLU > MaxPool2 > Flatten > Gemm(10) > Softmax.

    The convolution filters are fixed random features and the dense head is fitted by
    regularised least squares on them: a real classifier (about 97% held-out accuracy),
    trained in a second without a deep-learning framework. Input ``input`` [N,1,8,8] float32,
    output ``probabilities`` [N,10].
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    data = digits_data(seed)
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.5, size=(channels, 1, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.1, size=(channels,)).astype(np.float32)

    def features(x: np.ndarray) -> np.ndarray:
        img = np.pad(x.reshape(-1, 8, 8), ((0, 0), (1, 1), (1, 1)))
        conv = np.zeros((len(x), channels, 8, 8), np.float32)
        for i in range(3):
            for j in range(3):
                conv += img[:, None, i:i + 8, j:j + 8] * w[None, :, 0, i, j, None, None]
        conv = np.maximum(conv + b[None, :, None, None], 0)
        pooled = conv.reshape(len(x), channels, 4, 2, 4, 2).max(axis=(3, 5))
        return pooled.reshape(len(x), -1)

    f = features(data.x_train)
    targets = np.eye(10, dtype=np.float32)[data.y_train] * 8.0 - 4.0
    fa = np.hstack([f, np.ones((len(f), 1), np.float32)])
    head = np.linalg.solve(fa.T @ fa + 1.0 * np.eye(fa.shape[1]), fa.T @ targets).astype(np.float32)
    gemm_w, gemm_b = head[:-1], head[-1]

    nodes = [
        helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("MaxPool", ["relu"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w, "conv_w"), numpy_helper.from_array(b, "conv_b"),
         numpy_helper.from_array(gemm_w, "fc_w"), numpy_helper.from_array(gemm_b, "fc_b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgedeploy")
    model.ir_version = 8
    onnx.checker.check_model(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.SerializeToString())
    return out
