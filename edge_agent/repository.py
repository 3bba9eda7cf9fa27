"""The model repository: several models at once, loaded from verified bundles, replaced live.

Replacing a model loads the new version fully first, swaps the reference, then waits for the old
version's requests in flight to finish before unloading it: no request fails during an update.
A new version that fails to load or to initialise never replaces a ready one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.batching import BatchSettings, DynamicBatcher
from edge_agent.bundle import load_extracted, open_bundle
from edge_agent.errors import EdgeDeployError, ModelNotReadyError, NotFoundError
from edge_agent.inference import ModelState
from edge_agent.metrics import MetricsRegistry
from edge_agent.runtime import LoadedModel, ModelInfo, load_model
from edge_agent.trust import TrustStore

__all__ = ["ModelEntry", "ModelRepository"]

log = logging.getLogger(__name__)
_DRAIN_TIMEOUT_S = 60.0


@dataclass
class ModelEntry:
    """One model version as the repository holds it."""

    name: str
    state: ModelState
    model: LoadedModel | None = None
    reason: str | None = None
    bundle_dir: Path | None = None
    owned_dir: bool = False
    batcher: DynamicBatcher | None = None
    inflight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    staging: bool = False  # a candidate under health check: not what /score or readiness speak for

    @property
    def info(self) -> ModelInfo:
        if self.model is None:
            raise ModelNotReadyError(f"model {self.name!r} is not ready: {self.reason or self.state}")
        return self.model.info

    @property
    def version(self) -> str:
        return self.model.info.version if self.model is not None else ""


def _batchable(model: LoadedModel) -> bool:
    specs = model.info.inputs
    return bool(specs) and all(spec.shape and spec.shape[0] == -1 for spec in specs)


class ModelRepository:
    """Models by name. ``load_bundle`` verifies and unpacks into ``workdir/models``."""

    def __init__(self, workdir: Path, trust: TrustStore | None = None, metrics: MetricsRegistry | None = None,
                 batching: dict[str, Any] | None = None) -> None:
        self.workdir = Path(workdir)
        self.trust = trust
        self.metrics = metrics
        self.batching_override = batching
        self._entries: dict[str, ModelEntry] = {}
        self._counter = itertools.count(1)
        self._lock = asyncio.Lock()

    async def load_bundle(self, bundle_path: Path, name: str | None = None) -> ModelInfo:
        """Verify and unpack ``bundle_path``, then load it (replacing a model of the same name).

        The bundle unpacks into a fresh ``workdir/models/<name>/<version>-<n>`` folder, never over
        the folder of a version that is serving.
        """
        staging = self._fresh(self.workdir / "models" / ".staging" / Path(bundle_path).stem[:60])
        try:
            manifest = await asyncio.to_thread(open_bundle, Path(bundle_path), staging, self.trust)
        finally:
            with contextlib.suppress(OSError):
                staging.parent.rmdir()  # only when nothing else is staging
        tag = str(manifest.version) if manifest.version is not None else str(manifest.model.get("sha256", "0"))[:12]
        final = self._fresh(self.workdir / "models" / _safe(name or manifest.name) / tag)
        staging.rename(final)
        try:
            return await self.load_dir(final, name, owned=True)
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise

    def _fresh(self, stem: Path) -> Path:
        """``stem-<n>`` for the first n whose folder does not exist yet (parent created)."""
        stem.parent.mkdir(parents=True, exist_ok=True)
        while True:
            candidate = stem.with_name(f"{stem.name}-{next(self._counter)}")
            if not candidate.exists():
                return candidate

    async def load_dir(self, bundle_dir: Path, name: str | None = None, owned: bool = False,
                       staging: bool = False, params: dict[str, Any] | None = None) -> ModelInfo:
        """Load an unpacked, already verified bundle folder (an agent's slot, say).

        ``staging`` marks a candidate being health-checked beside the live model: it answers
        requests by name but does not count for readiness or the single-model ``/score``.
        ``params`` (run-time parameters) reach the model's ``configure`` before it serves; a
        refusal leaves it unavailable with that reason, as a failed ``init()`` does.
        """
        manifest = load_extracted(bundle_dir)
        name = name or manifest.name
        model = await asyncio.to_thread(load_model, Path(bundle_dir), manifest, name, self.workdir)
        failure = model.failure
        if not failure and params:
            try:
                await asyncio.to_thread(model.configure, params)
            except EdgeDeployError as exc:
                failure = str(exc)
        entry = ModelEntry(name, ModelState.UNAVAILABLE if failure else ModelState.READY, model, failure,
                           Path(bundle_dir), owned, staging=staging)
        entry.idle.set()
        if not failure:
            entry.batcher = self._batcher(name, model, manifest.batching, lambda: entry.inflight)
        async with self._lock:
            old = self._entries.get(name)
            if failure and old is not None and old.state == ModelState.READY:
                await _dispose(entry)
                raise ModelNotReadyError(f"the new version of {name!r} was not activated: {failure}")
            self._entries[name] = entry
        if old is not None:
            await self._retire(old)
        log.info("model %s version %s is %s", name, entry.version, entry.state)
        return model.info

    def _batcher(self, name: str, model: LoadedModel, batching: dict[str, Any] | None,
                 in_flight: Callable[[], int]) -> DynamicBatcher | None:
        settings = self.batching_override or batching
        if not settings or not _batchable(model):
            return None

        def on_batch(size: int) -> None:
            if self.metrics is not None:
                self.metrics.observe_batch(name, size)

        return DynamicBatcher(model.infer, BatchSettings.from_dict(settings), on_batch, in_flight)

    async def _retire(self, entry: ModelEntry) -> None:
        entry.state = ModelState.UNLOADING
        try:
            await asyncio.wait_for(entry.idle.wait(), _DRAIN_TIMEOUT_S)
        except TimeoutError:
            log.warning("model %s: requests still running after %.0f s; unloading anyway", entry.name,
                        _DRAIN_TIMEOUT_S)
        await _dispose(entry)

    async def unload(self, name: str) -> None:
        """Unload ``name`` once its requests in flight finish; NotFoundError if it is not loaded."""
        async with self._lock:
            entry = self._entries.pop(name, None)
        if entry is None:
            raise NotFoundError(f"no model named {name!r} is loaded")
        await self._retire(entry)

    def get(self, name: str) -> ModelEntry:
        """The entry for ``name``; NotFoundError with the loaded names when there is none."""
        entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(sorted(self._entries)) or "none"
            raise NotFoundError(f"no model named {name!r} (loaded: {known})")
        return entry

    def names(self, include_staging: bool = True) -> list[str]:
        """Loaded model names; without the candidates under health check when ``include_staging`` is False."""
        return sorted(name for name, entry in self._entries.items() if include_staging or not entry.staging)

    @contextlib.asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[ModelEntry]:
        """Hold a ready model for one request, so a swap waits for it to finish."""
        entry = self.get(name)
        if entry.state != ModelState.READY or entry.model is None:
            raise ModelNotReadyError(f"model {name!r} is not ready: {entry.reason or entry.state.value}")
        entry.inflight += 1
        entry.idle.clear()
        try:
            yield entry
        finally:
            entry.inflight -= 1
            if entry.inflight == 0:
                entry.idle.set()

    def index(self) -> list[dict[str, Any]]:
        """Every model: name, version, state and the reason when it is not ready."""
        return [{"name": e.name, "version": e.version, "state": e.state.value, "reason": e.reason or ""}
                for _, e in sorted(self._entries.items())]

    async def close(self) -> None:
        """Unload everything."""
        async with self._lock:
            entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            await _dispose(entry)


async def _dispose(entry: ModelEntry) -> None:
    if entry.batcher is not None:
        await entry.batcher.close()
    if entry.model is not None:
        entry.model.unload()
    if entry.owned_dir and entry.bundle_dir is not None:
        shutil.rmtree(entry.bundle_dir, ignore_errors=True)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:100] or "model"
