"""The runtime interface every backend implements, and how a bundle finds its backend.

A backend turns an unpacked, verified bundle into a :class:`LoadedModel`. Servers never know
which backend runs: they go through the data plane, which calls ``infer`` or ``score``. Backends
are plug-ins: the manifest's ``runtime.backend`` names an entry point in the ``edgedeploy.runtimes``
group whose value is a :class:`RuntimeBackend` (a ``load`` function), e.g. in ``pyproject.toml``::

    [project.entry-points."edgedeploy.runtimes"]
    onnxruntime = "edge_agent.runtime.onnx:load"

Only the backend a bundle names is imported, so an agent without hls4ml's C++ tool chain or a
board's drivers still runs ONNX bundles.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_agent.bundle import BundleManifest
from edge_agent.errors import BundleError
from edge_agent.plugins import RUNTIMES_GROUP, load_plugin, plugin_names
from edge_agent.runtime.scoring import parse_score_body
from edge_agent.tensors import TensorSpec

__all__ = ["CURRENT_MODEL_DIR", "LoadedModel", "ModelInfo", "ModelSpecs", "RuntimeBackend", "TensorScoring",
           "installed_backends", "load_model", "validate_inputs"]

# the model folder of the entry script being called (init/run), read by runtime.get_model_dir()
CURRENT_MODEL_DIR: contextvars.ContextVar[Path | None] = contextvars.ContextVar("edgedeploy_model_dir", default=None)


@dataclass
class ModelInfo:
    """What the servers report about a model, whatever the backend."""

    name: str
    version: str
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    bundle_dir: Path
    manifest: BundleManifest
    details: dict[str, Any] = field(default_factory=dict)
    workdir: Path | None = None  # the agent's working folder (entry-script requirements go to workdir/deps)


class LoadedModel(Protocol):
    """A model ready to answer: every member the repository and the data plane use.

    ``infer`` takes and returns named arrays; ``score`` serves ``/score``. ``info.inputs`` and
    ``info.outputs`` (also ``inputs``/``outputs``) are its TensorSpecs; an entry script without
    declared tensors has none, and its requests skip tensor validation. ``inline`` says a call is
    so cheap that the data plane runs it on the event loop instead of a worker thread. ``failure``
    is set when the model loaded but cannot answer (an entry script whose ``init()`` raised): the
    repository then keeps it unavailable with that reason. ``configure`` takes the run-time
    parameters a ``config`` request set (:mod:`edge_agent.operations`) and raises an
    ``EdgeDeployError`` to refuse them. :class:`ModelSpecs` supplies ``inputs``, ``outputs``,
    ``inline = False``, ``failure = None`` and a ``configure`` that accepts any parameters.
    """

    info: ModelInfo
    inline: bool
    failure: str | None

    @property
    def inputs(self) -> list[TensorSpec]: ...

    @property
    def outputs(self) -> list[TensorSpec]: ...

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def score(self, body: Any, content_type: str) -> Any: ...

    def schema(self) -> dict[str, Any] | None: ...

    def configure(self, params: dict[str, Any]) -> None: ...

    def unload(self) -> None: ...


class RuntimeBackend(Protocol):
    """What a ``edgedeploy.runtimes`` entry point names: a function loading one bundle folder."""

    def __call__(self, bundle_dir: Path, manifest: BundleManifest, info: ModelInfo) -> LoadedModel: ...


_MEMBERS = ("info", "inline", "failure", "inputs", "outputs", "infer", "score", "schema", "configure", "unload")


class ModelSpecs:
    """Mixin for backends: ``inputs``/``outputs`` read through to ``info``; not inline, no failure,
    run-time parameters accepted and left unused."""

    info: ModelInfo
    inline: bool = False
    failure: str | None = None

    @property
    def inputs(self) -> list[TensorSpec]:
        """The model's input specs."""
        return self.info.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        """The model's output specs."""
        return self.info.outputs

    def configure(self, params: dict[str, Any]) -> None:
        """A backend without run-time parameters (onnxruntime, FPGA) takes any: they are only reported."""


class TensorScoring(ModelSpecs):
    """Mixin for backends whose ``/score`` is their tensors as JSON (onnxruntime, the FPGA backends)."""

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Subclasses run the model here."""
        raise NotImplementedError

    def score(self, body: Any, content_type: str) -> Any:
        """``{"data": ...}`` or named inputs in, every output as nested lists out."""
        named = parse_score_body(body, [spec.name for spec in self.info.inputs])
        outputs = self.infer(validate_inputs(self.info.inputs, named))
        return {name: value.tolist() for name, value in outputs.items()}

    def schema(self) -> dict[str, Any] | None:
        """No entry-script schema: the OpenAPI document comes from the tensors and samples."""
        return None


def installed_backends() -> list[str]:
    """The ``runtime.backend`` values this agent can run (its ``edgedeploy.runtimes`` entry points)."""
    return plugin_names(RUNTIMES_GROUP)


def load_model(bundle_dir: Path, manifest: BundleManifest, name: str | None = None,
               workdir: Path | None = None) -> LoadedModel:
    """Load ``bundle_dir`` with the backend its manifest names; BundleError if none is installed."""
    backend = str(manifest.runtime.get("backend"))
    loader: RuntimeBackend = load_plugin(RUNTIMES_GROUP, backend, "runtime backend", BundleError)
    version = str(manifest.version) if manifest.version is not None else manifest.model.get("sha256", "")[:12]
    info = ModelInfo(name or manifest.name, version or "1", backend, list(manifest.inputs), list(manifest.outputs),
                     Path(bundle_dir), manifest, workdir=workdir)
    model = loader(Path(bundle_dir), manifest, info)
    missing = [member for member in _MEMBERS if not hasattr(model, member)]
    if missing:
        # refused at load, not at the first request: the old version keeps serving
        if hasattr(model, "unload"):
            model.unload()
        raise BundleError(f"runtime backend {backend!r} returned a model without {', '.join(missing)} "
                          "(see edge_agent.runtime.LoadedModel; the ModelSpecs mixin supplies the defaults)")
    return model


def validate_inputs(specs: list[TensorSpec], given: dict[str, Any]) -> dict[str, np.ndarray]:
    """Named arrays checked against the model's inputs: names, rank, fixed dims and dtype.

    Values convert when no information is lost (JSON integers into FP32, say); anything else is
    an InvalidInputError naming the input.
    """
    from edge_agent.errors import InvalidInputError
    from edge_agent.tensors import v2_to_numpy

    expected = {spec.name: spec for spec in specs}
    unknown = sorted(set(given) - set(expected))
    missing = sorted(set(expected) - set(given))
    if unknown or missing:
        raise InvalidInputError(
            f"inputs do not match the model: expected {sorted(expected)}"
            + (f", unknown {unknown}" if unknown else "") + (f", missing {missing}" if missing else "")
        )
    result = {}
    for name, spec in expected.items():
        dtype = v2_to_numpy(spec.datatype)
        value = given[name]
        from_json = not isinstance(value, np.ndarray)
        try:
            raw = np.asarray(value)
        except (ValueError, TypeError) as exc:
            raise InvalidInputError(f"input {name!r} is not a rectangular array: {exc}") from None
        result[name] = _convert(name, raw, dtype, from_json)
        _check_shape(name, result[name].shape, spec.shape)
    return result


def _convert(name: str, raw: np.ndarray, dtype: np.dtype, from_json: bool = False) -> np.ndarray:
    """Cast only when nothing is lost; JSON numbers (parsed as float64/int64) may narrow to the spec."""
    from edge_agent.errors import InvalidInputError

    if raw.dtype == dtype:
        return raw
    if dtype == np.object_:
        return raw.astype(np.object_)
    if from_json and raw.dtype.kind in "iub" and dtype.kind in "iu":
        if raw.size and (raw.min() < np.iinfo(dtype).min or raw.max() > np.iinfo(dtype).max):
            raise InvalidInputError(f"input {name!r} has values out of range for {dtype}")
        return raw.astype(dtype)
    safe = (np.can_cast(raw.dtype, dtype, casting="safe") or (raw.dtype.kind in "iub" and dtype.kind == "f")
            or (from_json and raw.dtype.kind == "f" and dtype.kind == "f"))
    if raw.dtype.kind in "OSU" or not safe:
        raise InvalidInputError(f"input {name!r} has dtype {raw.dtype}, which does not convert to {dtype} safely")
    if raw.dtype.kind == "f" and dtype.kind == "f" and raw.size and np.isfinite(raw).all():
        limit = np.finfo(dtype).max
        if np.abs(raw).max() > limit:
            raise InvalidInputError(f"input {name!r} has values out of range for {dtype} (max {limit:.6g})")
    return raw.astype(dtype)


def _check_shape(name: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    from edge_agent.errors import InvalidInputError

    if not expected:
        return
    if len(shape) != len(expected) or any(e > 0 and s != e for s, e in zip(shape, expected, strict=True)):
        raise InvalidInputError(f"input {name!r} has shape {list(shape)}, the model expects {list(expected)} "
                                "(-1 is any size)")
