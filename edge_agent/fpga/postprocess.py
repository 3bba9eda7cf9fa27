"""What the host does with an FPGA's last layer: the model's outputs, as the source ONNX model gives them.

The hardware computes the layer chain (logits, then the host's float32 softmax). A classifier written
by ``skl2onnx`` ends with post-processing no FPGA compiler builds: ``ArgMax`` and ``ArrayFeatureExtractor``
pick the label from the classes, and ``ZipMap`` (when the model has it) turns the probabilities into
one ``{class: probability}`` dict per sample. The packager recognises that tail and writes it as data,
``runtime.host_outputs``, a list in the model's output order::

    [{"name": "label", "kind": "label", "classes": [0, 1, ...], "datatype": "INT64"},
     {"name": "probabilities", "kind": "probabilities"}]

``kind`` is ``probabilities`` (the chain's output itself), ``label`` (``classes[argmax]``, cast to
``datatype``) or ``zipmap`` (the probabilities keyed by ``classes``: an FP32 ``[N, classes]`` tensor over
v2 REST and gRPC, onnxruntime's list of dicts over ``/score``). A bundle without the key has one output,
the chain's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.errors import BundleError
from edge_agent.tensors import TensorSpec, v2_to_numpy

__all__ = ["HostOutput", "HostOutputs"]

_KINDS = ("probabilities", "label", "zipmap")
_LABEL_TYPES = ("INT64", "INT32", "INT16", "INT8", "UINT64", "UINT32", "UINT16", "UINT8", "BYTES")


@dataclass(frozen=True)
class HostOutput:
    """One model output computed on the host from the chain's output."""

    name: str
    kind: str
    classes: tuple[int | str, ...] = ()
    datatype: str = "FP32"

    def to_dict(self) -> dict[str, Any]:
        """The manifest's form (``runtime.host_outputs`` entry)."""
        doc: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.kind != "probabilities":
            doc["classes"] = list(self.classes)
        if self.kind == "label":
            doc["datatype"] = self.datatype
        return doc

    def spec(self, width: int) -> TensorSpec:
        """The served tensor: ``[N]`` labels or ``[N, width]`` float32 probabilities."""
        if self.kind == "label":
            return TensorSpec(self.name, self.datatype, (-1,))
        return TensorSpec(self.name, "FP32", (-1, width))

    def compute(self, probabilities: np.ndarray) -> np.ndarray:
        """This output as a tensor, from the chain's float32 output [N, width]."""
        if self.kind != "label":
            return probabilities
        # ArgMax keeps the first of equal maxima, as onnxruntime's does
        picked = np.asarray(self.classes, dtype=object)[probabilities.argmax(axis=1)]
        dtype = v2_to_numpy(self.datatype)
        return picked.astype(dtype) if dtype != np.object_ else picked

    def to_json(self, value: np.ndarray) -> Any:
        """This output for ``/score``: nested lists, or one ``{class: probability}`` per sample for ZipMap."""
        if self.kind == "zipmap":
            keys = [str(key) for key in self.classes]  # JSON object keys are strings
            return [dict(zip(keys, (float(p) for p in row), strict=True)) for row in value]
        return value.tolist()


def _entry(doc: Any) -> HostOutput:
    if not isinstance(doc, dict) or doc.get("kind") not in _KINDS or not isinstance(doc.get("name"), str):
        raise BundleError(f"runtime.host_outputs has an entry that is not {{name, kind: {'|'.join(_KINDS)}}}: "
                          f"{str(doc)[:200]}")
    classes = doc.get("classes", [])
    if doc["kind"] != "probabilities" and (not isinstance(classes, list) or not classes or
                                           not all(isinstance(c, int | str) for c in classes)):
        raise BundleError(f"runtime.host_outputs entry {doc['name']!r} needs its classes (integers or strings)")
    datatype = str(doc.get("datatype", "FP32"))
    if doc["kind"] == "label" and datatype not in _LABEL_TYPES:
        raise BundleError(f"runtime.host_outputs label {doc['name']!r} has datatype {datatype!r}; "
                          f"expected one of {', '.join(_LABEL_TYPES)}")
    return HostOutput(doc["name"], doc["kind"], tuple(classes), datatype)


@dataclass(frozen=True)
class HostOutputs:
    """Every output of the model, in its order, from the chain's output."""

    outputs: tuple[HostOutput, ...]

    @classmethod
    def from_runtime(cls, runtime: dict[str, Any], specs: list[TensorSpec]) -> HostOutputs:
        """From the manifest's ``runtime`` section; without ``host_outputs``, the one output is the chain's."""
        docs = runtime.get("host_outputs")
        if docs is None:
            if len(specs) != 1:
                raise BundleError("an FPGA bundle without runtime.host_outputs has exactly one output tensor")
            return cls((HostOutput(specs[0].name, "probabilities"),))
        if not isinstance(docs, list) or not docs:
            raise BundleError("runtime.host_outputs must be a non-empty list")
        outputs = tuple(_entry(doc) for doc in docs)
        if sorted(o.name for o in outputs) != sorted(s.name for s in specs):
            raise BundleError(f"runtime.host_outputs names {[o.name for o in outputs]}, but the bundle's outputs "
                              f"are {[s.name for s in specs]}")
        return cls(outputs)

    def to_list(self) -> list[dict[str, Any]]:
        """The manifest's form (``runtime.host_outputs``)."""
        return [output.to_dict() for output in self.outputs]

    def specs(self, width: int) -> list[TensorSpec]:
        """The served tensors, for a chain with ``width`` outputs."""
        return [output.spec(width) for output in self.outputs]

    def compute(self, probabilities: np.ndarray) -> dict[str, np.ndarray]:
        """Every output, as tensors, from the chain's float32 output [N, width]."""
        return {output.name: output.compute(probabilities) for output in self.outputs}

    def to_json(self, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
        """``/score``'s answer: what onnxruntime returns for the source model, as JSON."""
        return {output.name: output.to_json(tensors[output.name]) for output in self.outputs}
