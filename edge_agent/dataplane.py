"""The data plane: the one in-process inference path that the gRPC and REST adapters both call.

Nothing here knows about a transport. Errors are ``edge_agent.errors`` types; each adapter maps them
to its own status in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from edge_agent.errors import InvalidInputError, NotFoundError, OverloadedError, UsageError
from edge_agent.inference import InferRequest, InferResponse, ModelState
from edge_agent.metrics import MetricsRegistry
from edge_agent.repository import ModelEntry, ModelRepository
from edge_agent.runtime.base import LoadedModel, validate_inputs
from edge_agent.serving_config import DEFAULT_MAX_INFLIGHT_BYTES
from edge_agent.tensors import TensorSpec, numpy_to_v2

__all__ = ["DEFAULT_MAX_INFLIGHT_BYTES", "SERVER_NAME", "DataPlane", "InflightBytes"]

SERVER_NAME = "edgedeploy"
_EXTENSIONS = ["model_repository", "statistics", "binary_tensor_data", "edgedeploy_score"]
T = TypeVar("T")
_INLINE_MAX_ROWS = 64


# Freed request buffers stay in glibc's malloc arenas (one per thread that allocated, up to eight per
# core) and count in RSS until trimmed: after a burst of 100 x 10 MB calls, 2-3 GB untrimmed, 0.26 GB
# trimmed (bench/memory.py).
_TRIM_AFTER_BYTES = 64 * 1024 * 1024


class InflightBytes:
    """The request bytes a server is answering at once, bounded: beyond ``limit`` a request is refused.

    Both adapters run on one event loop, so a plain counter is enough. A request larger than the
    whole limit is still admitted when nothing else is in flight, so a limit below the largest
    accepted request slows such requests down instead of refusing them forever. When the server
    goes idle after large requests, freed heap goes back to the system (``malloc_trim``; set
    ``EDGEDEPLOY_MALLOC_TRIM=0`` to keep it).
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.held = 0
        self._since_trim = 0
        self._trim = _malloc_trim() if os.environ.get("EDGEDEPLOY_MALLOC_TRIM", "1") != "0" else None

    def fits(self, size: int) -> bool:
        """Whether a request of ``size`` bytes would be admitted now."""
        return self.limit is None or not self.held or self.held + size <= self.limit

    @contextlib.contextmanager
    def hold(self, size: int) -> Iterator[None]:
        """Count ``size`` bytes while the block runs; OverloadedError when they do not fit."""
        if not self.fits(size):
            raise self.refusal(size)
        self.held += size
        try:
            yield
        finally:
            self.held -= size
            self._since_trim += size
            if not self.held and self._since_trim >= _TRIM_AFTER_BYTES and self._trim is not None:
                self._since_trim = 0
                asyncio.get_running_loop().run_in_executor(None, self._trim, 0)

    def refusal(self, size: int) -> OverloadedError:
        """The error for a ``size``-byte request that does not fit."""
        return OverloadedError(f"the server is answering {self.held} request bytes, its limit is {self.limit} "
                               f"(max_inflight_bytes); this {size}-byte request was refused, retry later")


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on another C library."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def _server_version() -> str:
    from edge_agent import __version__

    return __version__


class DataPlane:
    """Health, metadata, inference and repository calls over a :class:`ModelRepository`."""

    def __init__(self, repository: ModelRepository, metrics: MetricsRegistry | None = None) -> None:
        self.repository = repository
        self.metrics = metrics or repository.metrics or MetricsRegistry()
        repository.metrics = self.metrics

    # --- health and metadata -----------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Ready when at least one model is loaded and every loaded model is ready."""
        live = self.repository.names(include_staging=False)
        return bool(live) and all(self.repository.get(name).state == ModelState.READY for name in live)

    def _entry(self, name: str, version: str | None) -> ModelEntry:
        entry = self.repository.get(name)
        if version not in (None, "", entry.version):
            raise NotFoundError(f"model {name!r} has no version {version!r} loaded (it serves {entry.version!r})")
        return entry

    def model_ready(self, name: str, version: str | None = None) -> bool:
        return self._entry(name, version).state == ModelState.READY

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": _server_version(), "extensions": list(_EXTENSIONS)}

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        """v2 model metadata, plus the model's state and, when it is not ready, the reason."""
        entry = self._entry(name, version)
        document: dict[str, Any] = {"name": name, "versions": [entry.version] if entry.version else [],
                                    "platform": "", "inputs": [], "outputs": [], "state": entry.state.value}
        if entry.reason:
            document["reason"] = entry.reason
        if entry.model is not None:
            info = entry.model.info
            document.update(platform=info.platform, inputs=[t.to_dict() for t in info.inputs],
                            outputs=[t.to_dict() for t in info.outputs])
            document["parameters"] = {k: v for k, v in info.details.items() if isinstance(v, str | int | list)}
        return document

    def model_samples(self, name: str) -> tuple[Any, Any]:
        """The bundle's input and output samples (JSON documents), or None each."""
        entry = self.repository.get(name)
        samples = entry.model.info.manifest.samples if entry.model is not None else None
        if not samples or entry.bundle_dir is None:
            return None, None
        return tuple(  # type: ignore[return-value]
            json.loads((entry.bundle_dir / path).read_text()) if path else None
            for path in (samples.get("input"), samples.get("output"))
        )

    def model_schema(self, name: str) -> dict[str, Any] | None:
        """inference-schema's input/output schema of an entry script, if it declares one."""
        entry = self.repository.get(name)
        return entry.model.schema() if entry.model is not None else None

    def default_model(self) -> str:
        """The model ``POST /score`` answers for: the only loaded one."""
        names = self.repository.names(include_staging=False)
        if len(names) != 1:
            raise UsageError(f"/score needs exactly one loaded model (loaded: {names}); use /v2/models/NAME/score")
        return names[0]

    # --- inference ---------------------------------------------------------------------------

    async def _timed(self, name: str, call: Callable[[], Awaitable[T]]) -> T:
        start = time.perf_counter()
        ok = False
        try:
            result = await call()
            ok = True
            return result
        finally:
            if name in self.repository.names():
                self.metrics.observe(name, (time.perf_counter() - start) * 1000.0, ok)

    async def infer(self, request: InferRequest) -> InferResponse:
        """Validate, batch (when the model allows it) and run one request."""
        async def run() -> InferResponse:
            async with self.repository.use(request.model_name) as entry:
                if request.model_version not in (None, "", entry.version):
                    raise NotFoundError(f"model {request.model_name!r} has no version {request.model_version!r}")
                specs = entry.info.inputs
                _check_datatypes(specs, request.inputs)
                inputs = validate_inputs(specs, request.inputs) if specs else request.inputs
                model = entry.model
                assert model is not None
                if entry.batcher is not None:
                    outputs = await entry.batcher.submit(inputs)
                else:
                    outputs = (model.infer(inputs) if _runs_inline(model, inputs)
                               else await asyncio.to_thread(model.infer, inputs))
                return InferResponse(request.model_name, entry.version, _select(outputs, request.outputs), request.id)

        return await self._timed(request.model_name, run)

    async def score(self, name: str, body: Any, content_type: str = "application/json") -> Any:
        """The Azure ML-style ``/score`` call: a JSON body (or raw bytes) in, a JSON document out."""
        async def run() -> Any:
            async with self.repository.use(name) as entry:
                model = entry.model
                assert model is not None
                return await asyncio.to_thread(model.score, body, content_type)

        return await self._timed(name, run)

    # --- repository --------------------------------------------------------------------------

    def repository_index(self) -> list[dict[str, Any]]:
        return self.repository.index()

    async def load(self, name: str, bundle_path: str | Path | None = None) -> None:
        """Load or replace ``name`` from a bundle file (v2 repository extension, ``bundle`` parameter)."""
        if bundle_path is None:
            if name in self.repository.names():
                return
            raise InvalidInputError(f"model {name!r} is not loaded; pass the 'bundle' parameter with a bundle path")
        path = Path(str(bundle_path))
        if not path.is_file():
            raise InvalidInputError(f"bundle not found: {path}")
        try:
            await self.repository.load_bundle(path, name)
        except NotFoundError as exc:
            raise InvalidInputError(str(exc)) from None

    async def unload(self, name: str) -> None:
        await self.repository.unload(name)


def _check_datatypes(specs: list[TensorSpec], inputs: dict[str, Any]) -> None:
    """A tensor's declared datatype must be the model's, as Triton checks: INT64 data for an FP32
    input is refused rather than cast, since the cast hides a client bug (and loses precision)."""
    for spec in specs:
        value = inputs.get(spec.name)
        if isinstance(value, np.ndarray) and value.dtype.kind not in "OSU":
            datatype = numpy_to_v2(value.dtype)
            if datatype != spec.datatype:
                raise InvalidInputError(f"input {spec.name!r} has dtype {value.dtype} (datatype {datatype}); "
                                        f"the model expects {spec.datatype}")


def _runs_inline(model: LoadedModel, inputs: dict[str, Any]) -> bool:
    """A tiny model on a small batch answers faster on the event loop than through a worker thread."""
    rows = max((len(v) for v in inputs.values() if getattr(v, "ndim", 0)), default=1)
    return model.inline and rows <= _INLINE_MAX_ROWS


def _select(outputs: dict[str, Any], wanted: list[str] | None) -> dict[str, Any]:
    if not wanted:
        return outputs
    unknown = sorted(set(wanted) - set(outputs))
    if unknown:
        raise InvalidInputError(f"unknown output(s) {unknown}; the model has {sorted(outputs)}")
    return {name: outputs[name] for name in wanted}

