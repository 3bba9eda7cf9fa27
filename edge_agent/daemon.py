"""The fleet daemon behind ``edge-agent --config agent.yaml``.

It serves the active slot over REST and gRPC, listens for its desired state over MQTT and runs
each deployment through the store's state machine::

    download -> verify into the inactive slot -> install under a staging name -> health check
    (ready + smoke inference on the bundle's sample) -> switch the live name -> commit

On any failure the live model is the last good one and ``failed`` is reported with the reason.
Every transition is persisted first, then published (``reported`` retained, one ``events``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

from edge_agent.bundle import BundleManifest, load_extracted, open_bundle, read_manifest
from edge_agent.errors import DeploymentError, EdgeDeployError, brief
from edge_agent.trust import TrustStore

from .config import AgentConfig, load_agent_config
from .dataplane import DataPlane
from .download import DownloadLimits, download_bundle
from .inference import ModelState
from .metrics import MetricsRegistry
from .mqtt import AgentLink
from .repository import ModelRepository
from .server import ServingApp
from .store import BundleStore, DeployState, Event
from .telemetry import TelemetryQueue, sample

__all__ = ["AGENT_VERSION", "EdgeAgent", "run"]

log = logging.getLogger(__name__)


def _agent_version() -> str:
    from edge_agent import __version__

    return __version__


AGENT_VERSION = _agent_version()
_STAGING_SUFFIX = "-staging"


def _leaves(value: Any) -> list[Any]:
    """Flatten a JSON document into its leaves (dict values in key order)."""
    if isinstance(value, dict):
        return [leaf for key in sorted(value) for leaf in _leaves(value[key])]
    if isinstance(value, list):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def _close(a: Any, b: Any, rtol: float = 1e-3, atol: float = 1e-4) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, int | float) or not isinstance(b, int | float):
        return a == b
    return math.isclose(float(a), float(b), rel_tol=rtol, abs_tol=atol)


def outputs_match(actual: Any, expected: Any) -> bool:
    """True when two JSON outputs have the same structure and allclose numbers."""
    left, right = _leaves(actual), _leaves(expected)
    return len(left) == len(right) and all(_close(a, b) for a, b in zip(left, right, strict=True))


def _order_key(order: dict[str, Any]) -> tuple[Any, Any, Any]:
    """What makes two desired states the same order (a redelivered one does not abandon a download)."""
    return order.get("deployment_id"), order.get("bundle_sha256"), order.get("action")


def _model_of(manifest: BundleManifest) -> dict[str, Any]:
    return {"name": manifest.name, "version": manifest.version}


class EdgeAgent:
    """One device: serving stack, bundle store, MQTT link and telemetry."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.store = BundleStore(config.data_dir)
        self.trust = TrustStore.from_files(config.trusted_keys)
        self.metrics = MetricsRegistry()
        self.repository = ModelRepository(config.data_dir / "runtime", self.trust, self.metrics)
        self.dataplane = DataPlane(self.repository, self.metrics)
        self.app = ServingApp(self.dataplane, config.serving)
        self.telemetry = TelemetryQueue(config.data_dir / "telemetry", config.telemetry_queue_max)
        self.link = AgentLink(config, self._on_desired_thread, self._on_connected_thread)
        self.live_name: str | None = None
        self._pending: dict[str, Any] | None = None
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._staging: str | None = None
        self._current: dict[str, Any] | None = None  # the order the worker is on
        self._superseded = threading.Event()  # a different order arrived: stop downloading this one

    # --- messages ------------------------------------------------------------------------------
    def _on_desired_thread(self, desired: dict[str, Any]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._queue_desired, desired)

    def _queue_desired(self, desired: dict[str, Any]) -> None:
        self._pending = desired  # only the newest desired state matters
        if self._current is not None and _order_key(desired) != _order_key(self._current):
            self._superseded.set()
        self._wake.set()

    def _on_connected_thread(self) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._on_connected)

    def _on_connected(self) -> None:
        self.publish_reported()
        self._drain_telemetry()

    @staticmethod
    def _public(pointer: dict[str, Any] | None) -> dict[str, Any] | None:
        if not pointer:
            return None
        model = pointer.get("model") or {}
        return {"model": model, "name": model.get("name"), "version": model.get("version"),
                "bundle_sha256": pointer.get("bundle_sha256"), "bundle_url": pointer.get("bundle_url"),
                "deployment_id": pointer.get("deployment_id")}

    def reported(self) -> dict[str, Any]:
        """The body of this device's ``reported`` message."""
        deployment = self.store.deployment
        return {
            "device_id": self.config.device_id, "state": self.store.state.value,
            "deployment_id": deployment.get("deployment_id"),
            "rollout_id": (deployment.get("order") or {}).get("rollout_id"),
            "active": self._public(self.store.active), "previous": self._public(self.store.previous),
            "error": deployment.get("error"), "profile": self.config.profile, "groups": self.config.groups,
            "tags": self.config.tags, "http_port": self.app.http_port, "grpc_port": self.app.grpc_port,
            "host": self.config.host, "agent_version": AGENT_VERSION, "ts": time.time(),
        }

    def publish_reported(self) -> None:
        """Publish the reported state (retained, QoS 1); paho queues it while offline. Never raises."""
        self.link.publish("reported", self.reported(), qos=1, retain=True)

    def _transition(self, before: DeployState, reason: str | None = None) -> None:
        after = self.store.state
        reason = None if reason is None else brief(reason)
        log.info("deployment %s: %s -> %s%s", brief(self.store.deployment.get("deployment_id"), 200), before.value,
                 after.value, f" ({reason})" if reason else "")
        self.publish_reported()
        self.link.publish("events", {"device_id": self.config.device_id,
                                     "deployment_id": self.store.deployment.get("deployment_id"),
                                     "from": before.value, "to": after.value, "reason": reason, "ts": time.time()})

    def _advance(self, event: Event, reason: str | None = None) -> None:
        before = self.store.state
        # capped before it reaches deployment.json: a reason may quote a third-party exception's text
        self.store.advance(event, None if reason is None else brief(reason))
        self._transition(before, reason)

    # --- serving -------------------------------------------------------------------------------
    async def serve_active(self) -> None:
        """Load the committed active slot under its model name (falls back to the previous slot)."""
        for pointer in (self.store.active, self.store.previous):
            if not pointer or not self.store.slot_complete(pointer.get("slot")):
                continue
            slot = self.store.slot_path(pointer["slot"])
            try:
                name = str((pointer.get("model") or {}).get("name") or load_extracted(slot).name)
                await self.repository.load_dir(slot, name=name)
            except EdgeDeployError as exc:
                log.error("could not load slot %s: %s", pointer["slot"], exc)
                continue
            self.live_name = name
            if self.dataplane.model_ready(name):
                if pointer is not self.store.active:
                    self.store.commit(pointer["slot"], {k: v for k, v in pointer.items() if k != "slot"})
                return
            await self.repository.unload(name)
            self.live_name = None

    # --- deployments ---------------------------------------------------------------------------
    def _skip(self, order: dict[str, Any]) -> bool:
        """True when ``order`` needs no work: its bundle is active, or it already failed here."""
        active = self.store.active or {}
        if order.get("bundle_sha256") and order["bundle_sha256"] == active.get("bundle_sha256"):
            if self.store.state != DeployState.ACTIVE or self.store.deployment.get("deployment_id") != order.get(
                    "deployment_id"):
                before = self.store.state
                if before in (DeployState.FAILED, DeployState.ROLLED_BACK, DeployState.ACTIVE):
                    self.store.deployment.update(deployment_id=order.get("deployment_id"), order=order, error=None)
                    self.store.advance(Event.KEEP)
                    self._transition(before, "the ordered bundle is already active")
                    return True
            self.publish_reported()
            return True
        deployment = self.store.deployment
        same = (deployment.get("deployment_id") == order.get("deployment_id")
                and (deployment.get("order") or {}).get("bundle_sha256") == order.get("bundle_sha256"))
        gave_up = self.store.state in (DeployState.FAILED, DeployState.ROLLED_BACK)
        if same and gave_up and not deployment.get("interrupted"):
            self.publish_reported()
            return True
        return False

    async def handle(self, order: dict[str, Any]) -> None:
        """Apply one desired state (never raises for a bad order: it ends ``failed``)."""
        if order.get("action") == "remove" or not order.get("bundle_sha256"):
            await self._remove(order)
            return
        if self._skip(order):
            return
        before = self.store.state
        self.store.begin(order)
        self._transition(before)
        try:
            await self._deploy(order)
        except (EdgeDeployError, OSError, ValueError) as exc:
            await self._fail(brief(exc))
        except Exception as exc:  # noqa: BLE001 - a bug in a step must still end in a reported state
            log.exception("deployment %s failed unexpectedly", brief(order.get("deployment_id"), 200))
            await self._fail(f"internal error: {brief(exc)}")

    async def _deploy(self, order: dict[str, Any]) -> None:
        self._check_downgrade(order.get("model") or {}, order)
        limits = DownloadLimits(self.config.max_download_bytes, deadline_s=self.config.download_deadline_s,
                                min_bytes_per_s=self.config.download_min_bytes_per_s)
        path = await asyncio.to_thread(download_bundle, order["bundle_url"], order["bundle_sha256"],
                                       self.store.downloads, limits, abandon=self._superseded.is_set)
        self._advance(Event.OK)  # -> verifying
        await asyncio.to_thread(self._check_hardware, path)
        slot = self.store.deployment["slot"]
        target = self.store.prepare_slot(slot)
        manifest = await asyncio.to_thread(open_bundle, path, target, self.trust)
        self._check_downgrade(_model_of(manifest), order)
        self._advance(Event.OK)  # -> installing
        staging = manifest.name + _STAGING_SUFFIX
        self._staging = staging
        await self.repository.load_dir(target, name=staging, staging=True)
        self._advance(Event.OK)  # -> health-checking
        await self._health_check(staging, manifest)
        await self._switch(target, manifest.name, staging)
        self.store.commit(slot, {"bundle_sha256": order["bundle_sha256"], "bundle_url": order["bundle_url"],
                                 "model": _model_of(manifest), "deployment_id": order.get("deployment_id")})
        self._advance(Event.OK)  # -> active
        path.unlink(missing_ok=True)

    def _check_hardware(self, path: Path) -> None:
        """Refuse, before anything is unpacked, a bundle bound to an accelerator this device lacks."""
        from edge_agent.profiles import load_profile

        from .fpga.binding import check_binding

        manifest, _signature = read_manifest(path, self.trust)
        accelerators = list(load_profile(self.config.profile).document.get("accelerators", []))
        check_binding(manifest.accelerator, accelerators, simulated=self.config.simulate_accelerators)

    def _check_downgrade(self, model: dict[str, Any], order: dict[str, Any]) -> None:
        active = (self.store.active or {}).get("model") or {}
        new, old = model.get("version"), active.get("version")
        if (isinstance(new, int) and isinstance(old, int) and new < old and active.get("name") == model.get("name")
                and not order.get("allow_downgrade")):
            raise DeploymentError(f"refused: version {new} of {model.get('name')!r} is lower than the active "
                                  f"version {old}; the order must set allow_downgrade")

    async def _health_check(self, staging: str, manifest: BundleManifest) -> None:
        entry = self.repository.get(staging)
        if entry.state != ModelState.READY or not self.dataplane.model_ready(staging):
            raise DeploymentError(f"health check failed: the model did not start: {entry.reason or entry.state}")
        sample_in, sample_out = self.dataplane.model_samples(staging)
        if sample_in is None:
            return
        try:
            result = await self.dataplane.score(staging, sample_in, "application/json")
        except EdgeDeployError as exc:
            raise DeploymentError(f"health check failed: the smoke inference raised: {exc}") from None
        deterministic = (manifest.runtime.get("backend") == "onnxruntime"
                         and manifest.runtime.get("precision", "fp32") == "fp32")
        if sample_out is not None and deterministic and not outputs_match(result, sample_out):
            raise DeploymentError("health check failed: the smoke inference differs from the bundle's output sample")

    async def _switch(self, target: Path, name: str, staging: str) -> None:
        await self.repository.load_dir(target, name=name)
        with contextlib.suppress(EdgeDeployError):
            await self.repository.unload(staging)
        self._staging = None
        if self.live_name and self.live_name != name:
            with contextlib.suppress(EdgeDeployError):
                await self.repository.unload(self.live_name)
        self.live_name = name

    async def _fail(self, reason: str) -> None:
        staging, self._staging = self._staging, None
        if staging:
            with contextlib.suppress(EdgeDeployError):
                await self.repository.unload(staging)
        slot = self.store.deployment.get("slot")
        if slot and slot != (self.store.active or {}).get("slot"):
            await asyncio.to_thread(shutil.rmtree, self.store.slot_path(slot), True)
        self._advance(Event.FAIL, reason)
        if self.live_name is None and self.store.active:
            await self.serve_active()
            self._advance(Event.RESTORE, reason)

    async def _remove(self, order: dict[str, Any]) -> None:
        before = self.store.state
        if self.store.active is None and before == DeployState.IDLE:
            self.publish_reported()
            return
        if self.live_name:
            with contextlib.suppress(EdgeDeployError):
                await self.repository.unload(self.live_name)
            self.live_name = None
        self.store.remove_active()
        self.store.deployment.update(deployment_id=order.get("deployment_id"), order=order, error=None)
        if before in (DeployState.ACTIVE, DeployState.FAILED, DeployState.ROLLED_BACK, DeployState.IDLE):
            self.store.advance(Event.REMOVE)
        self._transition(before, "the controller removed the model")

    async def _worker(self) -> None:
        """Handle the newest order, one at a time; nothing one order does stops the next one."""
        while not self._stop.is_set():
            await self._wake.wait()
            self._wake.clear()
            order, self._pending = self._pending, None
            if order is None:
                continue
            self._current = order
            self._superseded.clear()
            try:
                await self.handle(order)
            except Exception:  # noqa: BLE001 - the worker must outlive any one order
                log.exception("order %s could not be handled", brief(order.get("deployment_id"), 200))
            finally:
                self._current = None

    # --- telemetry -----------------------------------------------------------------------------
    def _drain_telemetry(self) -> None:
        if self.link.connected.is_set():
            self.telemetry.drain(lambda message: self.link.connected.is_set()
                                 and self.link.publish("telemetry", message, qos=0))

    async def _telemetry_loop(self) -> None:
        versions = {"agent": AGENT_VERSION}
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.config.telemetry_period_s)
            if self._stop.is_set():
                return
            active = self.store.active or {}
            body = sample(self.config.device_id, self.metrics.snapshot(),
                          dict(versions, model=(active.get("model") or {}).get("version"),
                               bundle_sha256=active.get("bundle_sha256")))
            self.telemetry.put(body)
            self._drain_telemetry()

    # --- life cycle ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the daemon to stop (SIGTERM/SIGINT)."""
        self._stop.set()
        self._wake.set()

    async def run(self) -> int:
        """Recover, serve, connect and work until :meth:`stop`; returns the exit code."""
        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self.stop)
        state = self.store.recover()
        log.info("store recovered: state %s, active %s", state.value, (self.store.active or {}).get("bundle_sha256"))
        await self.serve_active()
        await self.app.start()
        log.info("serving on %s: http %d, grpc %d", self.config.host, self.app.http_port, self.app.grpc_port)
        if self.store.deployment.get("interrupted") and self.store.deployment.get("order"):
            # Retry the interrupted order before the first report, so the controller sees it resume
            # rather than a failure (the retained desired state would bring it back anyway).
            self._queue_desired(self.store.deployment["order"])
        tasks = [asyncio.create_task(self._worker()), asyncio.create_task(self._telemetry_loop())]
        await asyncio.sleep(0)  # let the worker enter a retried deployment before we connect
        self.link.start()
        try:
            await self._stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.to_thread(self.link.stop)
            await self.app.stop(grace=2.0)
            await self.repository.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.remove_signal_handler(sig)
        log.info("edge agent %s stopped", self.config.device_id)
        return 0


def run(config_path: Path | str) -> int:
    """Run the fleet daemon of ``agent.yaml`` until SIGTERM; returns the exit code."""
    config = load_agent_config(config_path)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(EdgeAgent(config).run())
