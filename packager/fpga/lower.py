"""An ONNX graph as the short chain of layers the FPGA compilers build: dense, conv, pooling, ReLU, softmax.

The FPGA compilers take feed-forward chains only. :func:`lower_model` walks the graph from its one
input, folds ``MatMul`` + ``Add`` and ``Gemm`` into :class:`Dense`, drops ``Identity`` and the
``Cast`` nodes that change nothing (skl2onnx casts the float32 input to float32), and refuses anything
else with the full list of operators it cannot build, so a user sees every problem at once. A
classifier's tail after the last layer (``ArgMax``/``ArrayFeatureExtractor`` for the label, ``ZipMap``)
is not built: :mod:`packager.fpga.tail` describes it for the host (:mod:`edge_agent.fpga.postprocess`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edge_agent.errors import PackagingError
from edge_agent.fpga.postprocess import HostOutputs
from packager.fpga.tail import host_outputs as _host_outputs

__all__ = ["HOST_OPS", "NO_OP_OPS", "SUPPORTED_OPS", "Conv2D", "Dense", "Flatten", "Layer", "LoweredModel", "MaxPool2D",
           "Relu", "Softmax", "lower_model", "lower_onnx"]

SUPPORTED_OPS = ("Add", "Conv", "Flatten", "Gemm", "MatMul", "MaxPool", "Relu", "Reshape", "Softmax")
NO_OP_OPS = ("Cast", "Identity")  # folded away where they change nothing (skl2onnx casts float to float)
HOST_OPS = ("ArgMax", "ArrayFeatureExtractor", "ZipMap")  # a classifier's label and ZipMap, after the chain


@dataclass(frozen=True)
class Dense:
    """``y = x @ weight + bias`` with ``weight`` [in, out]."""

    name: str
    weight: np.ndarray
    bias: np.ndarray


@dataclass(frozen=True)
class Conv2D:
    """NCHW convolution: ``weight`` [out, in, kh, kw], ``bias`` [out]."""

    name: str
    weight: np.ndarray
    bias: np.ndarray
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]


@dataclass(frozen=True)
class MaxPool2D:
    """Max pooling over ``kernel`` windows moved by ``stride``."""

    name: str
    kernel: tuple[int, int]
    stride: tuple[int, int]


@dataclass(frozen=True)
class Relu:
    name: str


@dataclass(frozen=True)
class Softmax:
    name: str


@dataclass(frozen=True)
class Flatten:
    name: str


Layer = Dense | Conv2D | MaxPool2D | Relu | Softmax | Flatten


@dataclass(frozen=True)
class LoweredModel:
    """The chain the hardware runs and the outputs the host computes from its last value."""

    layers: list[Layer]
    host_outputs: HostOutputs


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _gemm(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> Dense:
    attrs = _attrs(node)
    weight = consts[node.input[1]].astype(np.float32)
    if attrs.get("transB", 0):
        weight = weight.T
    bias = consts[node.input[2]].astype(np.float32) if len(node.input) > 2 else np.zeros(weight.shape[1], np.float32)
    if attrs.get("transA", 0) or float(attrs.get("alpha", 1.0)) != 1.0 or float(attrs.get("beta", 1.0)) != 1.0:
        raise PackagingError(f"Gemm {node.name!r} uses transA/alpha/beta, which the FPGA compilers do not build")
    return Dense(node.name or node.output[0], np.ascontiguousarray(weight), bias.reshape(-1))


def _conv(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> Conv2D:
    attrs = _attrs(node)
    weight = consts[node.input[1]].astype(np.float32)
    bias = consts[node.input[2]] if len(node.input) > 2 else np.zeros(weight.shape[0], np.float32)
    if int(attrs.get("group", 1)) != 1 or any(d != 1 for d in attrs.get("dilations", [1, 1])):
        raise PackagingError(f"Conv {node.name!r} uses groups or dilations, which the FPGA compilers do not build")
    strides: tuple[int, int] = tuple(attrs.get("strides", [1, 1]))
    pads: tuple[int, int, int, int] = tuple(attrs.get("pads", [0, 0, 0, 0]))
    return Conv2D(node.name or node.output[0], weight, bias.astype(np.float32), strides, pads)


def lower_onnx(model: onnx.ModelProto | str | Path) -> list[Layer]:
    """The model's layers in order; PackagingError listing every unsupported operator."""
    return lower_model(model).layers


def lower_model(model: onnx.ModelProto | str | Path) -> LoweredModel:
    """The layer chain and how the host turns its output into the model's outputs (see the module doc)."""
    graph = (model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))).graph
    consts = _constants(graph)
    nodes = [n for n in graph.node if n.op_type != "Constant"]
    known = SUPPORTED_OPS + NO_OP_OPS + HOST_OPS
    unsupported = sorted({n.op_type for n in nodes if n.op_type not in known})
    if unsupported:
        raise PackagingError(f"the model has operators the FPGA compilers do not support: {', '.join(unsupported)} "
                             f"(supported: {', '.join(SUPPORTED_OPS)}; {', '.join(NO_OP_OPS)} where they change "
                             f"nothing; {', '.join(HOST_OPS)} after the last layer, run on the host)")
    initializers = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise PackagingError(f"the FPGA compilers build single-input chains; this model has {len(inputs)} inputs")
    tail = _tail(nodes)
    chain = [node for index, node in enumerate(nodes) if index not in tail]
    float_input = inputs[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    layers, last = _walk(chain, consts, inputs[0].name, float_input)
    if not layers:
        raise PackagingError("the model has no layer the FPGA compilers build")
    host = _host_outputs(graph, [nodes[index] for index in sorted(tail)], consts, last)
    _check_classes(host, layers)
    return LoweredModel(layers, host)


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and ``Constant`` outputs by name."""
    consts = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return consts


def _tail(nodes: list[onnx.NodeProto]) -> set[int]:
    """Indices of the nodes that run on the host: the classifier's ops and everything computed from them."""
    tail: set[int] = set()
    produced: set[str] = set()
    for index, node in enumerate(nodes):
        if node.op_type in HOST_OPS or produced.intersection(node.input):
            tail.add(index)
            produced.update(node.output)
    return tail


def _check_classes(host: HostOutputs, layers: list[Layer]) -> None:
    weighted = [layer for layer in layers if isinstance(layer, Dense | Conv2D)]
    if not weighted or not isinstance(weighted[-1], Dense):
        return  # the compilers refuse such a chain with their own message
    width = int(weighted[-1].weight.shape[1])
    for output in host.outputs:
        if output.kind != "probabilities" and len(output.classes) != width:
            raise PackagingError(f"output {output.name!r} names {len(output.classes)} classes, but the last layer "
                                 f"has {width} outputs")


def _constant(consts: dict[str, np.ndarray], node: onnx.NodeProto, index: int) -> np.ndarray:
    """Input ``index`` of ``node``, which must be a weight (an initializer or a Constant)."""
    name = node.input[index] if index < len(node.input) else ""
    if name not in consts:
        raise PackagingError(f"{node.op_type} {node.name or node.output[0]!r}: input {name!r} is computed, not a "
                             "constant; the FPGA compilers build layers with fixed weights only")
    return consts[name]


def _data_input(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> str:
    """The one input of ``node`` that carries data (the others are weights or shapes)."""
    data = [name for name in node.input if name and name not in consts]
    if len(data) != 1:
        raise PackagingError(f"{node.op_type} {node.name or node.output[0]!r} takes {len(data)} computed inputs; the "
                             "FPGA compilers build feed-forward chains only")
    return data[0]


def _walk(nodes: list[onnx.NodeProto], consts: dict[str, np.ndarray], source: str,
          float_input: bool) -> tuple[list[Layer], set[str]]:
    """Fold the nodes into layers, checking that each one consumes the previous one's output.

    Returns the layers and the names of the last value (a no-op ``Identity`` or ``Cast`` adds a name).
    """
    layers: list[Layer] = []
    index, current, is_float = 0, {source}, float_input
    while index < len(nodes):
        node = nodes[index]
        if _data_input(node, consts) not in current:
            raise PackagingError(f"{node.op_type} {node.name or node.output[0]!r} does not take the previous "
                                 f"layer's output; the FPGA compilers build feed-forward chains only")
        if node.op_type in NO_OP_OPS:
            _check_no_op(node, is_float)
            current.add(node.output[0])
            index += 1
            continue
        following = nodes[index + 1] if index + 1 < len(nodes) else None
        fused = node.op_type == "MatMul" and following is not None and following.op_type == "Add" and \
            node.output[0] in following.input
        layers.append(_layer(node, following if fused else None, consts))
        index += 2 if fused else 1
        current, is_float = {(following if fused and following is not None else node).output[0]}, True
    return layers, current


def _check_no_op(node: onnx.NodeProto, is_float: bool) -> None:
    """A ``Cast`` inside the chain must cast float32 to float32: the hardware takes and gives float32."""
    if node.op_type == "Cast" and not (is_float and _attrs(node).get("to") == onnx.TensorProto.FLOAT):
        to = onnx.TensorProto.DataType.Name(int(_attrs(node).get("to", 0)))
        raise PackagingError(f"Cast {node.name or node.output[0]!r} to {to} changes the values; the FPGA "
                             "compilers take float32 inputs and fold only casts that change nothing")


def _layer(node: onnx.NodeProto, add: onnx.NodeProto | None, consts: dict[str, np.ndarray]) -> Layer:
    """One layer from ``node`` (and the ``Add`` holding a MatMul's bias)."""
    name = node.name or node.output[0]
    if node.op_type == "MatMul":
        weight = _constant(consts, node, 1).astype(np.float32)
        bias = np.zeros(weight.shape[1], np.float32)
        if add is not None:
            bias = _constant(consts, add, 1 if add.input[0] == node.output[0] else 0).astype(np.float32).reshape(-1)
        return Dense(name, np.ascontiguousarray(weight), bias)
    if node.op_type == "Gemm":
        return _gemm(node, consts)
    if node.op_type == "Conv":
        return _conv(node, consts)
    if node.op_type == "MaxPool":
        attrs = _attrs(node)
        kernel: tuple[int, int] = tuple(attrs["kernel_shape"])
        if any(attrs.get("pads", [0, 0, 0, 0])) or int(attrs.get("ceil_mode", 0)):
            raise PackagingError(f"MaxPool {name!r} pads its input; the FPGA compilers build unpadded pooling only")
        return MaxPool2D(name, kernel, tuple(attrs.get("strides", kernel)))
    if node.op_type == "Relu":
        return Relu(name)
    if node.op_type == "Softmax":
        return Softmax(name)
    if node.op_type == "Reshape" and _constant(consts, node, 1).size != 2:
        raise PackagingError(f"Reshape {name!r} is not a flatten to [N, features]; the FPGA compilers build no "
                             "other reshapes")
    if node.op_type in ("Flatten", "Reshape"):
        return Flatten(name)
    # an Add not folded into a MatMul
    raise PackagingError(f"{node.op_type} {name!r} is not part of a dense layer; the FPGA compilers build "
                         "feed-forward chains only")
