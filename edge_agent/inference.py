"""Transport-neutral inference types shared by the data plane and every server adapter.

The gRPC and REST adapters convert their wire formats to these and back; nothing below the
adapters imports protobuf or an HTTP framework.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["InferRequest", "InferResponse", "ModelState"]


class ModelState(enum.StrEnum):
    """Lifecycle of a model in the repository (names follow Triton's repository index)."""

    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"  # failed to load or init(); ``reason`` says why
    UNLOADING = "UNLOADING"


@dataclass
class InferRequest:
    """Named input tensors for one model; ``outputs`` limits what is returned (None: all)."""

    model_name: str
    inputs: dict[str, np.ndarray]
    model_version: str | None = None
    id: str | None = None
    outputs: list[str] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferResponse:
    """Named output tensors, in the model's output order."""

    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
