"""Protobuf ⇄ data-plane types for the Open Inference Protocol. Nothing else imports the generated code."""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from edge_agent.errors import InvalidInputError, ValidationError
from edge_agent.grpc import oip_messages_pb2 as pb
from edge_agent.inference import InferRequest, InferResponse
from edge_agent.tensors import numpy_to_v2, v2_to_numpy

__all__ = ["decode_bytes", "element_count", "encode_bytes", "request_from_proto", "response_to_proto"]

_MAX_ELEMENTS = 2**62  # numpy refuses larger arrays; a shape beyond it can only be a forged one

# which InferTensorContents field carries each datatype
_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def encode_bytes(array: np.ndarray) -> bytes:
    """BYTES tensors on the wire: each element as a 4-byte little-endian length, then its bytes."""
    parts = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(data)) + data)
    return b"".join(parts)


def decode_bytes(raw: bytes, count: int) -> np.ndarray:
    """Inverse of :func:`encode_bytes`; InvalidInputError when the buffer is malformed."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInputError("BYTES tensor: truncated length prefix")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidInputError("BYTES tensor: element longer than the buffer")
        items.append(raw[offset:offset + size])
        offset += size
    if len(items) != count:
        raise InvalidInputError(f"BYTES tensor holds {len(items)} elements, its shape says {count}")
    return np.array(items, dtype=np.object_)


def element_count(name: str, shape: list[int]) -> int:
    """How many values ``shape`` holds, in Python integers (``np.prod`` wraps around at 2**63).

    InvalidInputError for a negative dimension or a shape no array can have, even with a zero in it.
    """
    if any(d < 0 for d in shape):
        raise InvalidInputError(f"input {name!r}: negative dimension in shape {shape}")
    if math.prod(max(d, 1) for d in shape) >= _MAX_ELEMENTS:
        raise InvalidInputError(f"input {name!r}: shape {shape} is larger than any tensor can be")
    return math.prod(shape)


def _dtype(datatype: str, name: str) -> np.dtype:
    try:
        return v2_to_numpy(datatype)
    except ValidationError:
        raise InvalidInputError(f"input {name!r}: unknown datatype {datatype!r}") from None


def _decode_input(tensor: Any, raw: bytes | None) -> np.ndarray:
    shape = [int(d) for d in tensor.shape]
    count = element_count(tensor.name, shape)
    dtype = _dtype(tensor.datatype, tensor.name)
    if raw is not None:
        if tensor.contents.ListFields():
            raise InvalidInputError(f"input {tensor.name!r} has both typed contents and raw_input_contents; "
                                    "send one")
        if tensor.datatype == "BYTES":
            return decode_bytes(raw, count).reshape(shape)
        if len(raw) != count * dtype.itemsize:
            raise InvalidInputError(f"input {tensor.name!r}: {len(raw)} raw bytes do not make shape {shape} of "
                                    f"{tensor.datatype}")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    field = _CONTENTS.get(tensor.datatype)
    if field is None:
        raise InvalidInputError(f"input {tensor.name!r}: {tensor.datatype} needs raw_input_contents")
    values = list(getattr(tensor.contents, field))
    if len(values) != count:
        raise InvalidInputError(f"input {tensor.name!r} has {len(values)} values, its shape {shape} needs {count}")
    return np.array(values, dtype=dtype).reshape(shape)


def request_from_proto(request: Any) -> tuple[InferRequest, bool]:
    """An InferRequest, and whether the client sent raw contents (then it gets raw outputs back)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    names = [t.name for t in request.inputs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise InvalidInputError(f"input {twice[0]!r} appears twice")
    inputs = {t.name: _decode_input(t, raw[i] if raw else None) for i, t in enumerate(request.inputs)}
    outputs = [o.name for o in request.outputs] or None
    parameters = {k: getattr(v, v.WhichOneof("parameter_choice") or "string_param")
                  for k, v in request.parameters.items()}
    return InferRequest(request.model_name, inputs, request.model_version or None, request.id or None, outputs,
                        parameters), bool(raw)


def response_to_proto(response: InferResponse, raw: bool) -> Any:
    """A ModelInferResponse: raw_output_contents when ``raw`` (as Triton answers), typed contents otherwise."""
    message = pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version,
                                    id=response.id or "")
    for name, value in response.outputs.items():
        array = np.asarray(value)
        datatype = numpy_to_v2(array.dtype)
        tensor = message.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if raw or datatype == "FP16":
            data = encode_bytes(array) if datatype == "BYTES" else np.ascontiguousarray(array).tobytes()
            message.raw_output_contents.append(data)
        elif datatype == "BYTES":
            tensor.contents.bytes_contents.extend(
                x if isinstance(x, bytes) else str(x).encode() for x in array.reshape(-1))
        else:
            getattr(tensor.contents, _CONTENTS[datatype]).extend(array.reshape(-1).tolist())
    return message
