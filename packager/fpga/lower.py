"""An ONNX graph as the short chain of layers the FPGA compilers build: dense, conv, pooling, ReLU, softmax.

The FPGA compilers take feed-forward chains only. :func:`lower_onnx` walks the graph from its one
input, folds ``MatMul`` + ``Add`` and ``Gemm`` into :class:`Dense`, and refuses anything else with
the full list of operators it cannot build, so a user sees every problem at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edge_agent.errors import PackagingError

__all__ = ["SUPPORTED_OPS", "Conv2D", "Dense", "Flatten", "Layer", "MaxPool2D", "Relu", "Softmax", "lower_onnx"]

SUPPORTED_OPS = ("Add", "Conv", "Flatten", "Gemm", "MatMul", "MaxPool", "Relu", "Reshape", "Softmax")


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
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    graph = proto.graph
    consts = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    unsupported = sorted({n.op_type for n in graph.node if n.op_type not in SUPPORTED_OPS and n.op_type != "Constant"})
    if unsupported:
        raise PackagingError(f"the model has operators the FPGA compilers do not support: {', '.join(unsupported)} "
                             f"(supported: {', '.join(SUPPORTED_OPS)})")
    if len(graph.output) != 1:
        raise PackagingError(f"the FPGA compilers build single-output chains; this model has {len(graph.output)} "
                             f"outputs ({', '.join(o.name for o in graph.output)})")
    initializers = {init.name for init in graph.initializer}
    inputs = [value.name for value in graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise PackagingError(f"the FPGA compilers build single-input chains; this model has {len(inputs)} inputs")
    nodes = [n for n in graph.node if n.op_type != "Constant"]
    layers = _walk(nodes, consts, inputs[0])
    if not nodes or nodes[-1].output[0] != graph.output[0].name:
        raise PackagingError("the model's output is not the last layer's; the FPGA compilers build chains only")
    return layers


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


def _walk(nodes: list[onnx.NodeProto], consts: dict[str, np.ndarray], source: str) -> list[Layer]:
    """Fold the nodes into layers, checking that each one consumes the previous one's output."""
    layers: list[Layer] = []
    index, current = 0, source
    while index < len(nodes):
        node = nodes[index]
        if _data_input(node, consts) != current:
            raise PackagingError(f"{node.op_type} {node.name or node.output[0]!r} does not take the previous "
                                 f"layer's output; the FPGA compilers build feed-forward chains only")
        following = nodes[index + 1] if index + 1 < len(nodes) else None
        fused = node.op_type == "MatMul" and following is not None and following.op_type == "Add" and \
            node.output[0] in following.input
        layers.append(_layer(node, following if fused else None, consts))
        index += 2 if fused else 1
        current = (following if fused and following is not None else node).output[0]
    return layers


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
