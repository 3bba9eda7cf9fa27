"""Input/output samples and numeric data sets (calibration, validation) read from user files.

A sample file holds the JSON body of ``POST /score`` (``{"data": ...}``), or a ``.npy``/``.npz``
array file that is turned into one. Data sets are an ``.npz`` file or a folder of ``.npy`` files
whose names are the model's input names (a single unnamed array feeds the only input).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import NotFoundError, UsageError, ValidationError

__all__ = ["load_arrays", "load_sample", "sample_to_inputs"]

_LABEL_KEYS = ("labels", "label", "y")


def _require(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{what} not found: {path}")
    return path


def load_arrays(path: Path, what: str = "data set") -> dict[str, np.ndarray]:
    """Arrays by name from an ``.npz`` file, a ``.npy`` file or a folder of ``.npy`` files."""
    path = _require(path, what)
    try:
        if path.is_dir():
            arrays = {p.stem: np.load(p, allow_pickle=False) for p in sorted(path.glob("*.npy"))}
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
        elif path.suffix == ".npy":
            arrays = {"data": np.load(path, allow_pickle=False)}
        else:
            raise UsageError(f"{what} {path} must be an .npz file, an .npy file or a folder of .npy files")
    except (ValueError, OSError) as exc:
        raise ValidationError(f"{what} {path} could not be read as numpy arrays: {exc}") from None
    if not arrays:
        raise ValidationError(f"{what} {path} holds no arrays")
    return arrays


def split_labels(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Separate a ``labels`` (or ``label``/``y``) array from the input arrays."""
    inputs = dict(arrays)
    for key in _LABEL_KEYS:
        if key in inputs:
            return inputs, inputs.pop(key)
    return inputs, None


def match_inputs(arrays: dict[str, np.ndarray], input_names: list[str], what: str) -> dict[str, np.ndarray]:
    """Map arrays to the model's inputs by name; one unnamed array feeds a single-input model."""
    if set(input_names) <= set(arrays):
        return {name: arrays[name] for name in input_names}
    if len(input_names) == 1 and len(arrays) == 1:
        return {input_names[0]: next(iter(arrays.values()))}
    raise ValidationError(
        f"{what} has arrays {sorted(arrays)} but the model's inputs are {input_names}; name the arrays after the inputs"
    )


def load_sample(path: Path, what: str = "sample") -> Any:
    """A sample as the JSON document of a ``/score`` body."""
    path = _require(path, what)
    if path.suffix == ".json":
        try:
            return json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValidationError(f"{what} {path} is not valid JSON: {exc}") from None
    arrays = load_arrays(path, what)
    if len(arrays) == 1:
        return {"data": next(iter(arrays.values())).tolist()}
    return {"inputs": {name: value.tolist() for name, value in arrays.items()}}


def sample_to_inputs(sample: Any, input_names: list[str], dtypes: dict[str, np.dtype]) -> dict[str, np.ndarray]:
    """Named input arrays from a ``/score`` body (``{"data": x}``, ``{"data": {name: x}}`` or ``{"inputs": …}``)."""
    if not isinstance(sample, dict):
        raise ValidationError("an input sample must be a JSON object such as {\"data\": [[...]]}")
    body = sample.get("inputs", sample.get("data"))
    if body is None:
        raise ValidationError("an input sample needs a 'data' or 'inputs' field")
    named = body if isinstance(body, dict) else {input_names[0]: body} if len(input_names) == 1 else None
    if named is None or set(named) != set(input_names):
        raise ValidationError(f"the input sample must give every input: {input_names}")
    return {name: np.asarray(named[name], dtype=dtypes[name]) for name in input_names}
