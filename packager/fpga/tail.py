"""A classifier's tail after the layer chain, as skl2onnx writes it, described for the host.

skl2onnx ends a classifier with ``ArgMax`` over the probabilities, ``ArrayFeatureExtractor`` picking
the label from the ``classes`` constant, a ``Reshape`` to ``[N]`` and casts of the label, and, unless
``zipmap`` is off, a ``ZipMap`` of the probabilities. :func:`host_outputs` follows those nodes
symbolically from the chain's last value and gives each model output as a
:class:`~edge_agent.fpga.postprocess.HostOutput`; any other use of them is refused with what was found.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from edge_agent.errors import PackagingError
from edge_agent.fpga.postprocess import HostOutput, HostOutputs

__all__ = ["host_outputs"]

_INTEGERS = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
             onnx.TensorProto.UINT64, onnx.TensorProto.UINT32, onnx.TensorProto.UINT16, onnx.TensorProto.UINT8}


@dataclass(frozen=True)
class _Value:
    """What a tail value is: the chain's output, its argmax, the picked classes ([N, 1]), the label, a ZipMap."""

    kind: str
    classes: tuple[int | str, ...] = ()
    elem_type: int = onnx.TensorProto.FLOAT


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _name(node: onnx.NodeProto) -> str:
    return f"{node.op_type} {node.name or node.output[0]!r}"


def _python(values: np.ndarray) -> tuple[int | str, ...]:
    """Class labels as JSON-ready Python values (skl2onnx stores strings as bytes)."""
    return tuple(v.decode() if isinstance(v, bytes) else v if isinstance(v, str) else int(v)
                 for v in values.reshape(-1).tolist())


def _refuse(node: onnx.NodeProto, what: str) -> PackagingError:
    return PackagingError(f"{_name(node)} {what}; after the last layer the host runs a classifier's label "
                          "(ArgMax > ArrayFeatureExtractor > Reshape [-1] > Cast) and ZipMap only")


def _input(node: onnx.NodeProto, values: dict[str, _Value], index: int, *kinds: str) -> _Value:
    name = node.input[index] if index < len(node.input) else ""
    value = values.get(name)
    if value is None or value.kind not in kinds:
        found = "something else" if value is None else f"the {value.kind}"
        raise _refuse(node, f"reads {name!r} ({found}), where it needs the {' or '.join(kinds)}")
    return value


def _cast(node: onnx.NodeProto, values: dict[str, _Value]) -> _Value:
    source = _input(node, values, 0, "probabilities", "picked", "label")
    to = int(_attrs(node).get("to", 0))
    if source.kind == "probabilities" and to == onnx.TensorProto.FLOAT:
        return source
    if source.kind != "probabilities" and (to == source.elem_type or
                                           (to in _INTEGERS and source.elem_type in _INTEGERS)):
        return replace(source, elem_type=to)
    raise _refuse(node, f"casts the {source.kind} to {onnx.TensorProto.DataType.Name(to)}")


def _argmax(node: onnx.NodeProto, values: dict[str, _Value]) -> _Value:
    _input(node, values, 0, "probabilities")
    attrs = _attrs(node)
    if attrs.get("axis", 0) not in (1, -1) or attrs.get("keepdims", 1) != 1 or attrs.get("select_last_index", 0):
        raise _refuse(node, f"is not an argmax over the classes with kept dimensions (attributes {attrs})")
    return _Value("argmax", elem_type=onnx.TensorProto.INT64)


def _feature_extractor(node: onnx.NodeProto, values: dict[str, _Value], consts: dict[str, np.ndarray]) -> _Value:
    classes = consts.get(node.input[0])
    if classes is None or classes.ndim != 1:
        raise _refuse(node, "does not pick from a constant list of classes")
    _input(node, values, 1, "argmax")
    kind = onnx.TensorProto.STRING if classes.dtype.kind in "OSU" else onnx.helper.np_dtype_to_tensor_dtype(
        classes.dtype)
    return _Value("picked", _python(classes), int(kind))


def _reshape(node: onnx.NodeProto, values: dict[str, _Value], consts: dict[str, np.ndarray]) -> _Value:
    source = _input(node, values, 0, "picked", "label")
    shape = consts.get(node.input[1])
    if shape is None or shape.reshape(-1).tolist() != [-1]:
        raise _refuse(node, "reshapes the label to something other than [N]")
    return replace(source, kind="label")


def _zipmap(node: onnx.NodeProto, values: dict[str, _Value]) -> _Value:
    _input(node, values, 0, "probabilities")
    attrs = _attrs(node)
    keys = attrs.get("classlabels_int64s") or attrs.get("classlabels_strings")
    if not keys:
        raise _refuse(node, "names no class labels")
    return _Value("zipmap", _python(np.asarray(keys, dtype=object)))


def _step(node: onnx.NodeProto, values: dict[str, _Value], consts: dict[str, np.ndarray]) -> _Value:
    if node.op_type == "Identity":
        return _input(node, values, 0, "probabilities", "picked", "label", "zipmap")
    if node.op_type == "Cast":
        return _cast(node, values)
    if node.op_type == "ArgMax":
        return _argmax(node, values)
    if node.op_type == "ArrayFeatureExtractor":
        return _feature_extractor(node, values, consts)
    if node.op_type == "Reshape":
        return _reshape(node, values, consts)
    if node.op_type == "ZipMap":
        return _zipmap(node, values)
    raise _refuse(node, "is computed from the classifier's label or probabilities")


def _label_type(elem_type: int) -> str:
    return "BYTES" if elem_type == onnx.TensorProto.STRING else onnx.TensorProto.DataType.Name(elem_type)


def host_outputs(graph: onnx.GraphProto, tail: list[onnx.NodeProto], consts: dict[str, np.ndarray],
                 last: set[str]) -> HostOutputs:
    """Every graph output as the host computes it from the chain's last value (named ``last``)."""
    values = {name: _Value("probabilities") for name in last}
    for node in tail:
        values[node.output[0]] = _step(node, values, consts)
    outputs = []
    for output in graph.output:
        value = values.get(output.name)
        if value is None:
            raise PackagingError(f"the model's output {output.name!r} is not the last layer's (nor computed from "
                                 "it on the host); the FPGA compilers build chains only")
        if value.kind == "probabilities":
            outputs.append(HostOutput(output.name, "probabilities"))
        elif value.kind == "label":
            outputs.append(HostOutput(output.name, "label", value.classes, _label_type(value.elem_type)))
        elif value.kind == "zipmap":
            outputs.append(HostOutput(output.name, "zipmap", value.classes))
        else:
            raise PackagingError(f"the model's output {output.name!r} is the {value.kind} of the classes, which the "
                                 "host does not serve; serve the label (reshaped to [N]) instead")
    return HostOutputs(tuple(outputs))
