"""Tensor specs and the Open Inference Protocol (KServe v2) datatype names, shared by both sides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.errors import ValidationError

__all__ = ["TensorSpec", "V2_TO_NUMPY", "numpy_to_v2", "onnx_type_to_v2", "v2_to_numpy"]

V2_TO_NUMPY: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
_NUMPY_TO_V2 = {np.dtype(v).str: k for k, v in V2_TO_NUMPY.items() if k != "BYTES"}

_ONNX_TO_V2 = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def v2_to_numpy(datatype: str) -> np.dtype:
    """numpy dtype for a v2 datatype name; raises ValidationError for an unknown name."""
    try:
        return np.dtype(V2_TO_NUMPY[datatype])
    except KeyError:
        raise ValidationError(f"unknown datatype {datatype!r}; expected one of {sorted(V2_TO_NUMPY)}") from None


def numpy_to_v2(dtype: np.dtype) -> str:
    """v2 datatype name for a numpy dtype (strings and objects are BYTES)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    try:
        return _NUMPY_TO_V2[dtype.str.replace(">", "<")]
    except KeyError:
        raise ValidationError(f"dtype {dtype} has no Open Inference Protocol datatype") from None


def onnx_type_to_v2(onnx_type: str) -> str:
    """v2 datatype name for an onnxruntime type string such as ``tensor(float)``."""
    try:
        return _ONNX_TO_V2[onnx_type]
    except KeyError:
        raise ValidationError(f"ONNX type {onnx_type!r} is not a tensor type edgedeploy can serve") from None


@dataclass(frozen=True)
class TensorSpec:
    """Name, v2 datatype and shape (-1 for a dynamic dimension) of a model input or output."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> TensorSpec:
        return cls(str(doc["name"]), str(doc["datatype"]), tuple(int(d) for d in doc["shape"]))
