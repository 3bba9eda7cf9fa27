"""The fleet daemon behind ``edge-agent --config agent.yaml``.

It serves every model's active slot over REST and gRPC (each under its own name), listens for
its desired state over MQTT, accepts it only as a signed order (:mod:`edge_agent.orders`) and runs
each model's deployment through that model's own state machine::

    download (a delta against the active bundle where the server has one: edge_agent.fetch)
    -> verify into the inactive slot -> install under a staging name -> health check
    (ready + smoke inference on the bundle's sample) -> switch the live name -> commit

With ``tuf_root`` set, the download step takes only a target of the repository's signed TUF
metadata (:mod:`edge_agent.tuf_fetch`). On any failure the live model is the last good one and
``failed`` is reported with the reason.
Every transition is persisted first, then published (``reported`` retained, one ``events``). An
order for one model never touches another; a refused order is one line in the log, in
``reported.refused`` and in one ``events`` message (``"to": "refused"``), and changes nothing.
Requests (logs, a model's run-time parameters, a restart) are answered by :mod:`edge_agent.operations`;
whatever replaces or reconfigures a serving instance holds ``instances``, one at a time.

The daemon holds ``data_dir``'s lock while it runs; events an offline install left in the outbox
(:mod:`edge_agent.outbox`) go out on each connection, after the reported state.
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

from edge_agent.auth import read_token
from edge_agent.bundle import BundleManifest, load_extracted, open_bundle, read_manifest
from edge_agent.delta import DeltaBase, patch_memory_budget
from edge_agent.errors import DeploymentError, EdgeDeployError, NotFoundError, UnavailableError, ValidationError, brief
from edge_agent.fleet_messages import BundleRef, DeviceReport, ModelOrder, ModelReport, OrderAction
from edge_agent.logring import LOG_FORMAT, LogRing
from edge_agent.operations import ModelParams, Operations, RequestGuard
from edge_agent.orders import OrderGuard, OrderRefused
from edge_agent.timezones import local_zone_name, utc_offset_min
from edge_agent.transport import DeviceTransport, device_transport
from edge_agent.trust import ORDERS, TrustStore, load_role_keys

from .config import AgentConfig, load_agent_config
from .dataplane import DataPlane
from .download import DownloadLimits
from .fetch import fetch_bundle
from .inference import ModelState
from .metrics import MetricsRegistry
from .outbox import DataDirLock, event_outbox
from .repository import ModelRepository
from .server import ServingApp
from .store import IN_PROGRESS, BundleStore, DeployState, Event, ModelStores
from .telemetry import TelemetryQueue, sample
from .tuf_fetch import BundleMetadata, device_metadata

__all__ = ["AGENT_VERSION", "EdgeAgent", "run"]

log = logging.getLogger(__name__)


def _agent_version() -> str:
    from edge_agent import __version__

    return __version__


AGENT_VERSION = _agent_version()
_STAGING_SUFFIX = "-staging"
_RELOAD_SUFFIX = "-reload"  # a restart's candidate: never the name a deployment's candidate has


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


def _model_of(manifest: BundleManifest) -> dict[str, Any]:
    return {"name": manifest.name, "version": manifest.version}


def _order_key(order: ModelOrder) -> tuple[Any, Any, Any]:
    """What makes two desired states the same order (a redelivered one does not abandon a download)."""
    return order.deployment_id, order.bundle_sha256, order.action


def _ref(pointer: dict[str, Any] | None) -> BundleRef | None:
    return BundleRef.from_body(pointer) if pointer else None


def order_trust(config: AgentConfig, bundle_trust: TrustStore) -> TrustStore:
    """The controller keys: ``orders`` blocks of trusted_keys plus every key in controller_keys."""
    keys = [key for path in config.trusted_keys for role, key in load_role_keys(path) if role == ORDERS]
    keys += [key for path in config.controller_keys for _role, key in load_role_keys(path)]
    trust = TrustStore(keys)
    both = sorted(set(trust.key_ids) & set(bundle_trust.key_ids))
    if both:
        raise ValidationError(f"key {both[0]} is both a bundle publisher and a controller key; "
                              "give each role its own key")
    return trust


class EdgeAgent:
    """One device: serving stack, one bundle store per model, MQTT link and telemetry.

    ``link`` and ``metadata`` replace the broker link and the TUF client (an offline install
    passes an outbox and the metadata of its folder).
    """

    def __init__(self, config: AgentConfig, link: DeviceTransport | None = None,
                 metadata: BundleMetadata | None = None) -> None:
        self.config = config
        self.stores = ModelStores(config.data_dir)
        self.trust = TrustStore.from_files(config.trusted_keys)
        controller_trust = order_trust(config, self.trust)
        self.guard = OrderGuard(config.device_id, controller_trust, config.data_dir / "orders.json")
        self.metrics = MetricsRegistry()
        self.repository = ModelRepository(config.data_dir / "runtime", self.trust, self.metrics)
        self.dataplane = DataPlane(self.repository, self.metrics)
        self.app = ServingApp(self.dataplane, config.serving)
        self.telemetry = TelemetryQueue(config.data_dir / "telemetry", config.telemetry_queue_max)
        self.params = ModelParams(config.data_dir / "params")
        self.logs = LogRing()
        self.operations = Operations(
            config.device_id, RequestGuard(config.device_id, controller_trust, config.data_dir / "requests.json"),
            self.params, self.logs, self, self._send)
        self.link = link or device_transport(config.broker)(config, self._on_desired_thread,
                                                            self._on_connected_thread,
                                                            on_request=self._on_request_thread)
        self.timezone = config.timezone or local_zone_name()
        self.instances = asyncio.Lock()  # held while a serving instance is replaced or reconfigured
        self.outbox = event_outbox(config.data_dir)
        self.metadata = metadata or device_metadata(config)  # TUF; None without tuf_root
        self.live: set[str] = set()  # model names served under their own name
        self.refused: str | None = None
        self._pending: dict[str, ModelOrder] = {}
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._staging: str | None = None
        self._current: ModelOrder | None = None  # the order the worker is on
        self._superseded = threading.Event()  # a different order for its model arrived: stop downloading

    # --- messages ------------------------------------------------------------------------------
    def _on_desired_thread(self, desired: dict[str, Any]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._queue_desired, desired)

    def _queue_desired(self, message: dict[str, Any]) -> None:
        """Check an order (signature, address, sequence, expiry) and queue its models."""
        try:
            desired = self.guard.check(message)
        except OrderRefused as exc:
            self._refuse(str(exc), message)
            return
        except OSError as exc:  # the sequence could not be recorded: acting anyway would allow a replay
            self._refuse(f"refused order: its sequence could not be recorded ({exc})", message)
            return
        for order in desired.models.values():
            self._queue(order)

    def _queue(self, order: ModelOrder) -> None:
        self._pending[order.name] = order  # per model, only the newest desired state matters
        current = self._current
        if current is not None and current.name == order.name and _order_key(order) != _order_key(current):
            self._superseded.set()
        self._wake.set()

    def _refuse(self, line: str, message: dict[str, Any]) -> None:
        """One line in the log, the reported state and the event log; the serving models are untouched."""
        line = brief(line)
        log.warning("%s", line)
        self.refused = line
        self.publish_reported()
        deployment_id = message.get("deployment_id")
        self._publish_event({"model": None, "deployment_id": deployment_id if isinstance(deployment_id, str)
                             else None, "from": None, "to": "refused", "reason": line})

    def _on_request_thread(self, message: dict[str, Any]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.operations.start, message)

    def _send(self, kind: str, body: dict[str, Any], qos: int = 1) -> bool:
        return self.link.publish(kind, body, qos=qos)

    def _on_connected_thread(self) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._on_connected)

    def _on_connected(self) -> None:
        self.publish_reported()
        self.outbox.drain(lambda event: self.link.connected.is_set() and self.link.publish("events", event))
        self._drain_telemetry()

    def model_report(self, name: str, store: BundleStore) -> ModelReport:
        """What model ``name`` is doing, as reported."""
        deployment = store.deployment
        return ModelReport(name, store.state, deployment.get("deployment_id"),
                           (deployment.get("order") or {}).get("rollout_id"), _ref(store.active),
                           _ref(store.previous), deployment.get("error"), deployment.get("ts"),
                           self.params.get(name) or None)

    def reported(self) -> dict[str, Any]:
        """The body of this device's ``reported`` message."""
        info = {"profile": self.config.profile, "groups": self.config.groups, "tags": self.config.tags,
                "http_port": self.app.http_port, "grpc_port": self.app.grpc_port, "host": self.config.host,
                "agent_version": AGENT_VERSION, "last_seq": self.guard.last_seq, "timezone": self.timezone,
                "utc_offset_min": utc_offset_min(self.config.timezone)}
        models = {name: self.model_report(name, store) for name, store in self.stores.items()}
        return DeviceReport(self.config.device_id, models, time.time(), info, self.refused,
                            self.stores.latest()).to_body()

    def publish_reported(self) -> None:
        """Publish the reported state (retained, QoS 1); paho queues it while offline."""
        try:
            self.link.publish("reported", self.reported(), qos=1, retain=True)
        except ValidationError as exc:
            log.error("could not publish the reported state: %s", exc)

    def _publish_event(self, body: dict[str, Any]) -> None:
        try:
            self.link.publish("events", {"device_id": self.config.device_id, **body, "ts": time.time()})
        except ValidationError as exc:
            log.error("could not publish an event: %s", exc)

    def _transition(self, store: BundleStore, before: DeployState, reason: str | None = None) -> None:
        after, name = store.state, self._name_of(store)
        reason = None if reason is None else brief(reason)
        log.info("%s deployment %s: %s -> %s%s", name, brief(store.deployment.get("deployment_id"), 200),
                 before.value, after.value, f" ({reason})" if reason else "")
        self.publish_reported()
        self._publish_event({"model": name, "deployment_id": store.deployment.get("deployment_id"),
                             "from": before.value, "to": after.value, "reason": reason})

    @staticmethod
    def _name_of(store: BundleStore) -> str:
        return store.root.name

    def _advance(self, store: BundleStore, event: Event, reason: str | None = None) -> None:
        before = store.state
        # capped before it reaches deployment.json: a reason may quote a third-party exception's text
        store.advance(event, None if reason is None else brief(reason))
        self._transition(store, before, reason)

    # --- serving -------------------------------------------------------------------------------
    async def serve_active(self) -> None:
        """Load every model's committed active slot under its name (falls back to its previous slot)."""
        for name, store in self.stores.items():
            await self._serve_model(name, store)

    async def _serve_model(self, name: str, store: BundleStore) -> None:
        async with self.instances:
            await self._serve_slots(name, store)

    async def _serve_slots(self, name: str, store: BundleStore) -> None:
        for pointer in (store.active, store.previous):
            if not pointer or not store.slot_complete(pointer.get("slot")):
                continue
            try:
                await self.repository.load_dir(store.slot_path(pointer["slot"]), name=name,
                                               params=self.params.get(name))
            except EdgeDeployError as exc:
                log.error("could not load %s from slot %s: %s", name, pointer["slot"], exc)
                continue
            self.live.add(name)
            if self.dataplane.model_ready(name):
                if pointer is not store.active:
                    store.commit(pointer["slot"], {k: v for k, v in pointer.items() if k != "slot"})
                return
            await self.repository.unload(name)
            self.live.discard(name)

    # --- operations (edge_agent.operations.ModelHost) ---------------------------------------------
    def model_names(self) -> list[str]:
        """The models this device has an active bundle for."""
        return [name for name, store in self.stores.items() if store.active]

    async def configure_model(self, name: str, params: dict[str, Any]) -> bool:
        """Hand ``params`` to the serving instance of ``name`` (its refusal raises, nothing changes),
        then persist them; True when an instance was serving (else they apply at its next load)."""
        async with self.instances:
            entry = self.repository.get(name) if name in self.live else None
            if entry is not None and entry.model is not None:
                await asyncio.to_thread(entry.model.configure, params)
            await asyncio.to_thread(self.params.put, name, params)
        log.info("model %s: run-time parameters set (%s)", name, ", ".join(sorted(params)) or "none")
        self.publish_reported()
        return entry is not None

    async def reload_model(self, name: str) -> dict[str, Any]:
        """Load ``name`` again from its active slot; it replaces the serving instance only once it
        passed the health check, so every request meanwhile is answered."""
        async with self.instances:
            store = dict(self.stores.items()).get(name)
            pointer = store.active if store else None
            if store is None or not pointer:
                raise NotFoundError(f"model {name!r} has no active bundle on this device")
            if store.state in IN_PROGRESS:
                raise UnavailableError(f"model {name!r} is being deployed ({store.state.value}); "
                                       "restart it once that ends")
            target, candidate = store.slot_path(pointer["slot"]), name + _RELOAD_SUFFIX
            try:
                await self.repository.load_dir(target, name=candidate, staging=True, params=self.params.get(name))
                await self._health_check(candidate, load_extracted(target))
            except DeploymentError as exc:
                raise DeploymentError(f"restart of {name!r} failed, the running instance stays: {exc}") from None
            finally:
                with contextlib.suppress(EdgeDeployError):
                    await self.repository.unload(candidate)
            await self.repository.load_dir(target, name=name, params=self.params.get(name))
            if not self.dataplane.model_ready(name):
                raise DeploymentError(f"restart of {name!r} failed: {self.repository.get(name).reason}")
            self.live.add(name)
        log.info("model %s restarted from slot %s", name, pointer["slot"])
        return {"model": name, "version": (pointer.get("model") or {}).get("version"),
                "bundle_sha256": pointer.get("bundle_sha256")}

    # --- deployments ---------------------------------------------------------------------------
    def _skip(self, store: BundleStore, order: ModelOrder) -> bool:
        """True when ``order`` needs no work: its bundle is active, or it already failed here."""
        active = store.active or {}
        if order.bundle_sha256 == active.get("bundle_sha256"):
            if store.state != DeployState.ACTIVE or store.deployment.get("deployment_id") != order.deployment_id:
                before = store.state
                if before in (DeployState.FAILED, DeployState.ROLLED_BACK, DeployState.ACTIVE):
                    store.deployment.update(deployment_id=order.deployment_id, order=order.to_body(), error=None)
                    store.advance(Event.KEEP)
                    self._transition(store, before, "the ordered bundle is already active")
                    return True
            self.publish_reported()
            return True
        deployment = store.deployment
        if order.deployment_id in deployment.get("supersedes", ()):  # an offline install replaced it
            self.publish_reported()
            return True
        same = (deployment.get("deployment_id") == order.deployment_id
                and (deployment.get("order") or {}).get("bundle_sha256") == order.bundle_sha256)
        gave_up = store.state in (DeployState.FAILED, DeployState.ROLLED_BACK)
        if same and gave_up and not deployment.get("interrupted"):
            self.publish_reported()
            return True
        return False

    async def handle(self, order: ModelOrder | dict[str, Any]) -> None:
        """Apply one model's desired state (never raises for a bad order: it ends ``failed``).

        Only that model's store and serving name are touched; every other model keeps serving.
        """
        if isinstance(order, dict):
            order = ModelOrder.from_body(order)
        store = self.stores.get(order.name)
        if order.action == OrderAction.REMOVE:
            await self._remove(store, order)
            return
        if self._skip(store, order):
            return
        before = store.state
        store.begin(order.to_body())
        self._transition(store, before)
        try:
            await self._deploy(store, order)
        except (EdgeDeployError, OSError, ValueError) as exc:
            await self._fail(store, brief(exc))
        except Exception as exc:  # a bug in a step must still end in a reported state
            log.exception("deployment %s failed unexpectedly", brief(order.deployment_id, 200))
            await self._fail(store, f"internal error: {brief(exc)}")

    async def _deploy(self, store: BundleStore, order: ModelOrder) -> None:
        self._check_downgrade(store, {"name": order.name, "version": order.version}, order)
        path = await asyncio.to_thread(self._download, store, order)
        self._advance(store, Event.OK)  # -> verifying
        await asyncio.to_thread(self._check_bundle, path, order)
        slot = store.deployment["slot"]
        target = store.prepare_slot(slot)
        manifest = await asyncio.to_thread(open_bundle, path, target, self.trust)
        self._check_downgrade(store, _model_of(manifest), order)
        self._advance(store, Event.OK)  # -> installing
        staging = order.name + _STAGING_SUFFIX
        self._staging = staging
        await self.repository.load_dir(target, name=staging, staging=True, params=self.params.get(order.name))
        self._advance(store, Event.OK)  # -> health-checking
        await self._health_check(staging, manifest)
        await self._switch(target, order.name, staging)
        self._staging = None
        store.commit(slot, {"bundle_sha256": order.bundle_sha256, "bundle_url": order.bundle_url,
                            "model": _model_of(manifest), "deployment_id": order.deployment_id})
        self._advance(store, Event.OK)  # -> active
        path.unlink(missing_ok=True)

    def _delta_base(self, store: BundleStore) -> DeltaBase | None:
        """The model's active bundle, unpacked, when deltas are on: what a delta for this model applies to."""
        active = store.active or {}
        if not self.config.delta_updates or not active.get("bundle_sha256") or not store.slot_complete(
                active.get("slot")):
            return None
        return DeltaBase(active["bundle_sha256"], store.slot_path(active["slot"]))

    def _download(self, store: BundleStore, order: ModelOrder) -> Path:
        """The ordered bundle in ``downloads/``, rebuilt from a delta or downloaded whole.

        With tuf_root, only as the TUF target the metadata lists: its length bounds the download and
        its hashes are checked on whatever arrived (a rebuilt bundle included).
        """
        target = self.metadata.target(order.bundle_sha256, order.bundle_url) if self.metadata else None
        limits = DownloadLimits(self.config.max_download_bytes, deadline_s=self.config.download_deadline_s,
                                min_bytes_per_s=self.config.download_min_bytes_per_s)
        token = read_token(self.config.bundle_token_file) if self.config.bundle_token_file else None
        path = fetch_bundle(order.bundle_url, order.bundle_sha256, store.downloads, limits,
                            abandon=self._superseded.is_set, base=self._delta_base(store),
                            patch_budget=patch_memory_budget(self.config.delta_patch_memory_bytes),
                            token=token, length=target.length if target else None)
        if target is not None:
            target.verify(path)
        return path

    def _check_bundle(self, path: Path, order: ModelOrder) -> None:
        """Before anything is unpacked: the bundle holds the ordered model, for hardware this device has."""
        from edge_agent.profiles import load_profile

        from .fpga.binding import check_binding

        manifest, _signature = read_manifest(path, self.trust)
        if manifest.name != order.name:
            raise DeploymentError(f"the bundle holds model {manifest.name!r}, but the order is for {order.name!r}")
        accelerators = list(load_profile(self.config.profile).document.get("accelerators", []))
        check_binding(manifest.accelerator, accelerators, simulated=self.config.simulate_accelerators)

    @staticmethod
    def _check_downgrade(store: BundleStore, model: dict[str, Any], order: ModelOrder) -> None:
        active = (store.active or {}).get("model") or {}
        new, old = model.get("version"), active.get("version")
        if (isinstance(new, int) and isinstance(old, int) and new < old and active.get("name") == model.get("name")
                and not order.allow_downgrade):
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
        """Serve ``target`` under ``name`` (the candidate ``staging`` passed its health check)."""
        async with self.instances:
            await self.repository.load_dir(target, name=name, params=self.params.get(name))
            with contextlib.suppress(EdgeDeployError):
                await self.repository.unload(staging)
            self.live.add(name)

    async def _fail(self, store: BundleStore, reason: str) -> None:
        staging, self._staging = self._staging, None
        if staging:
            with contextlib.suppress(EdgeDeployError):
                await self.repository.unload(staging)
        slot = store.deployment.get("slot")
        if slot and slot != (store.active or {}).get("slot"):
            await asyncio.to_thread(shutil.rmtree, store.slot_path(slot), True)
        self._advance(store, Event.FAIL, reason)
        name = self._name_of(store)
        if name not in self.live and store.active:
            await self._serve_model(name, store)
            self._advance(store, Event.RESTORE, reason)

    async def _remove(self, store: BundleStore, order: ModelOrder) -> None:
        before = store.state
        if store.active is None and before == DeployState.IDLE:
            self.publish_reported()
            return
        async with self.instances:
            if order.name in self.live:
                with contextlib.suppress(EdgeDeployError):
                    await self.repository.unload(order.name)
                self.live.discard(order.name)
            store.remove_active()
        store.deployment.update(deployment_id=order.deployment_id, order=order.to_body(), error=None)
        if before in (DeployState.ACTIVE, DeployState.FAILED, DeployState.ROLLED_BACK, DeployState.IDLE):
            store.advance(Event.REMOVE)
        self._transition(store, before, "the controller removed the model")

    async def _worker(self) -> None:
        """Handle each model's newest order, one at a time; nothing one order does stops the next one."""
        while not self._stop.is_set():
            await self._wake.wait()
            self._wake.clear()
            while self._pending and not self._stop.is_set():
                order = self._pending.pop(next(iter(self._pending)))
                self._current = order
                self._superseded.clear()
                try:
                    await self.handle(order)
                except Exception:  # the worker must outlive any one order
                    log.exception("order %s could not be handled", brief(order.deployment_id, 200))
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
            self.telemetry.put(self._sample(versions))
            self._drain_telemetry()

    def _sample(self, versions: dict[str, Any]) -> dict[str, Any]:
        """One telemetry body: each model's metrics with its version and bundle."""
        running = {name: store.active or {} for name, store in self.stores.items() if store.active}
        primary = running.get(self.stores.latest() or "", {})
        body = sample(self.config.device_id, self.metrics.snapshot(),
                      dict(versions, model=(primary.get("model") or {}).get("version"),
                           bundle_sha256=primary.get("bundle_sha256")))
        for name, active in running.items():
            entry = body["models"].setdefault(name, {})
            entry.update(version=(active.get("model") or {}).get("version"), bundle_sha256=active.get("bundle_sha256"))
        return body

    # --- life cycle ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the daemon to stop (SIGTERM/SIGINT)."""
        self._stop.set()
        self._wake.set()

    async def run(self) -> int:
        """Recover, serve, connect and work until :meth:`stop`; returns the exit code."""
        lock = DataDirLock(self.config.data_dir, f"the edge agent daemon {self.config.device_id}").acquire()
        logging.getLogger().addHandler(self.logs)  # what a `logs` request reads
        try:
            return await self._run(lock)
        finally:
            logging.getLogger().removeHandler(self.logs)

    async def _run(self, lock: DataDirLock) -> int:
        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self.stop)
        for name, store in self.stores.items():
            state = store.recover()
            log.info("%s recovered: state %s, active %s", name, state.value, (store.active or {}).get("bundle_sha256"))
        await self.serve_active()
        await self.app.start()
        log.info("serving on %s: http %d, grpc %d", self.config.host, self.app.http_port, self.app.grpc_port)
        for _name, store in self.stores.items():
            if store.deployment.get("interrupted") and store.deployment.get("order"):
                # Retry the interrupted order before the first report, so the controller sees it
                # resume rather than a failure (it was checked and accepted before the restart).
                self._queue(ModelOrder.from_body(store.deployment["order"]))
        tasks = [asyncio.create_task(self._worker()), asyncio.create_task(self._telemetry_loop())]
        await asyncio.sleep(0)  # let the worker enter a retried deployment before we connect
        self.link.start()
        try:
            await self._stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.operations.close()
            await asyncio.to_thread(self.link.stop)
            await self.app.stop(grace=2.0)
            await self.repository.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.remove_signal_handler(sig)
            lock.release()
        log.info("edge agent %s stopped", self.config.device_id)
        return 0


def run(config_path: Path | str) -> int:
    """Run the fleet daemon of ``agent.yaml`` until SIGTERM; returns the exit code."""
    config = load_agent_config(config_path)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=config.log_level, format=LOG_FORMAT)
    return asyncio.run(EdgeAgent(config).run())
