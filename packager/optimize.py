"""Offline graph optimization with onnxruntime, and facts about a graph (operators, I/O)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort

from edge_agent.errors import ValidationError
from edge_agent.tensors import TensorSpec, onnx_type_to_v2

__all__ = ["describe_io", "operator_counts", "optimize_model"]

_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
}


def optimize_model(source: Path, target: Path, level: str = "extended") -> Path:
    """Write ``source`` optimized offline at ``level`` to ``target``.

    ``all`` is capped at ``extended``: the ``all`` level adds layout transformations specific to
    the packaging machine's CPU, and the bundle must run on the device, not here.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS.get(level, _LEVELS["extended"])
    options.optimized_model_filepath = str(target)
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors for bad graphs
        raise ValidationError(f"onnxruntime cannot load {source}: {exc}") from None
    return target


def operator_counts(path: Path) -> dict[str, int]:
    """How many nodes of each operator type the graph has."""
    model = onnx.load(str(path), load_external_data=False)
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def describe_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX model as v2 tensor specs (-1 for a dynamic dimension)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def spec(arg: ort.NodeArg) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) else -1 for d in (arg.shape or []))
        return TensorSpec(arg.name, onnx_type_to_v2(arg.type), shape)

    return [spec(a) for a in session.get_inputs()], [spec(a) for a in session.get_outputs()]
