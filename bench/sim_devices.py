"""What simulated devices do: the edge agent's reporting behaviour as a state machine without I/O.

:class:`SimFleet` holds every simulated device (:class:`SimDevice`) and turns what arrives (a
``desired`` payload) into what an ``edge-agent`` would send, through two callables it is given:
``send(device, kind, payload, qos, retain)`` and ``later(delay, fn, *args)``. Messages are built
with the project's own contract classes (:mod:`edge_agent.fleet_messages`), so the simulator
can drift from the agent only where this module says it does:

* an order (schema 1 or 2) is checked for address, sequence and expiry as ``OrderGuard`` does;
  the signature only when a trust store is given (100,000 ed25519 checks cost seconds);
* per model: ``downloading -> verifying -> installing -> health-checking -> active``, or
  ``failed`` at the health check, each a retained ``reported`` plus one ``events`` message, the
  steps spread over ``time_to_active`` seconds; a removal reports ``idle``; the bundle that is
  already active is kept (``the ordered bundle is already active``); a lower version without
  ``allow_downgrade`` fails with the agent's words; an order already given up on is not retried;
* a new order for a model abandons the one in progress at once (the agent first reports the
  abandoned download as failed);
* nothing is downloaded or run. :class:`VersionBehaviour` says how a model version behaves:
  its p95 latency and error share in telemetry, and the share of devices whose health check
  fails it (chosen by a hash of device and bundle, so the same devices fail on every run).
"""

from __future__ import annotations

import collections
import dataclasses
import random
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_agent.errors import ValidationError
from edge_agent.fleet_messages import (
    BundleRef,
    DeployState,
    DesiredState,
    DeviceReport,
    ModelOrder,
    ModelReport,
    OrderAction,
    encode_message,
    parse_message,
)
from edge_agent.orders import OrderRefused, verify_order
from edge_agent.trust import TrustStore

__all__ = ["AGENT_VERSION", "STEPS", "SimDevice", "SimFleet", "VersionBehaviour"]

STEPS = (DeployState.DOWNLOADING, DeployState.VERIFYING, DeployState.INSTALLING, DeployState.HEALTH_CHECKING,
         DeployState.ACTIVE)
AGENT_VERSION = "sim"
GAVE_UP = (DeployState.FAILED, DeployState.ROLLED_BACK)

Send = Callable[["SimDevice", str, bytes, int, bool], None]
Later = Callable[..., None]


@dataclass(frozen=True)
class VersionBehaviour:
    """How devices running one model version behave."""

    p95_ms: float = 10.0
    error_rate: float = 0.0  # share of requests answered with an error
    fail_share: float = 0.0  # share of devices whose health check fails this version


@dataclass
class SimDevice:
    """One simulated device's state."""

    device_id: str
    index: int
    profile: str
    groups: list[str]
    tags: dict[str, str]
    connection: int = 0
    online: bool = True
    models: dict[str, ModelReport] = field(default_factory=dict)
    orders: dict[str, ModelOrder] = field(default_factory=dict)  # the order each model last started
    busy: dict[str, int] = field(default_factory=dict)  # model -> generation of the order under way
    last_seq: int = -1
    refused: str | None = None
    primary: str | None = None
    held: bytes | None = None  # the newest desired payload that arrived while offline
    served: dict[str, list[float]] = field(default_factory=dict)  # model -> [requests, errors, since]
    seen: set[str] = field(default_factory=set)  # bundles this device was ordered to

    def report_body(self) -> dict[str, Any]:
        """The body of this device's ``reported`` message, as the agent builds it."""
        info = {"profile": self.profile, "groups": self.groups, "tags": self.tags, "http_port": 0, "grpc_port": 0,
                "host": "127.0.0.1", "agent_version": AGENT_VERSION, "last_seq": self.last_seq}
        return DeviceReport(self.device_id, dict(self.models), time.time(), info, self.refused,
                            self.primary).to_body()


def _order_key(order: ModelOrder) -> tuple[Any, ...]:
    return order.deployment_id, order.bundle_sha256, order.action


def spread(values: Mapping[str, str | Sequence[str]], index: int) -> dict[str, str]:
    """One value per key for device ``index``: a list of values is dealt out round robin."""
    return {k: v if isinstance(v, str) else v[index % len(v)] for k, v in values.items()}


class SimFleet:
    """Every simulated device and what it does; not thread-safe (its owner serialises calls)."""

    def __init__(self, send: Send, later: Later, *, time_to_active: float = 0.0, jitter: float = 0.2,
                 requests_per_s: float = 1.0, behaviour: Mapping[str, VersionBehaviour] | None = None,
                 default: VersionBehaviour | None = None, events: bool = True, trust: TrustStore | None = None,
                 seed: int = 0) -> None:
        self.send, self.later = send, later
        self.time_to_active, self.jitter, self.requests_per_s = time_to_active, jitter, requests_per_s
        self.behaviour = {str(k): v for k, v in (behaviour or {}).items()}
        self.default = default or VersionBehaviour()
        self.events, self.trust, self.seed = events, trust, seed
        self.devices: dict[str, SimDevice] = {}
        self.active: collections.Counter[str] = collections.Counter()  # bundle sha -> devices active on it
        self.order_times: dict[str, list[float]] = collections.defaultdict(list)
        self.started = time.time()
        self._random = random.Random(seed)

    def add(self, id_prefix: str, count: int, profile: str, groups: Sequence[str],
            tags: Mapping[str, str | Sequence[str]], connections: int) -> list[str]:
        """``count`` new devices ``{id_prefix}-NNNNN`` after the existing ones; returns their ids."""
        first = len(self.devices)
        width = max(5, len(str(first + count - 1)))
        made = []
        for index in range(first, first + count):
            device_id = f"{id_prefix}-{index:0{width}d}"
            self.devices[device_id] = SimDevice(device_id, index, profile, list(groups), spread(tags, index),
                                                index % connections)
            made.append(device_id)
        return made

    def behaviour_of(self, version: Any) -> VersionBehaviour:
        """How a model version behaves here."""
        return self.behaviour.get(str(version), self.default)

    # --- publishing ----------------------------------------------------------------------------
    @staticmethod
    def status_payload(device_id: str, online: bool) -> bytes:
        """An encoded ``status`` message."""
        return encode_message("status", {"online": online, "device_id": device_id, "ts": time.time()})

    def announce(self, device: SimDevice) -> None:
        """Status online and the reported state (on connect, and when a device joins or comes back)."""
        if device.online:
            self.send(device, "status", self.status_payload(device.device_id, True), 1, True)
            self.publish_reported(device)

    def publish_reported(self, device: SimDevice) -> None:
        """Publish the device's reported state (retained, QoS 1)."""
        if device.online:
            self.send(device, "reported", encode_message("reported", device.report_body()), 1, True)

    def _event(self, device: SimDevice, model: str | None, deployment_id: str | None, before: DeployState | None,
               to: str, reason: str | None) -> None:
        if self.events and device.online:
            body = {"device_id": device.device_id, "model": model, "deployment_id": deployment_id,
                    "from": before.value if before else None, "to": to, "reason": reason, "ts": time.time()}
            self.send(device, "events", encode_message("events", body), 1, False)

    def set_online(self, device: SimDevice, online: bool) -> None:
        """Take a device off the fleet (status offline; orders wait) or bring it back."""
        if device.online == online:
            return
        device.online = True  # so the status message below goes out
        self.send(device, "status", self.status_payload(device.device_id, online), 1, True)
        device.online = online
        if online:
            self.publish_reported(device)
            held, device.held = device.held, None
            if held is not None:
                self.take_order(device, held)

    # --- orders --------------------------------------------------------------------------------
    def take_order(self, device: SimDevice, payload: bytes) -> None:
        """A desired message for ``device`` arrived (held until it is online)."""
        if not device.online:
            device.held = payload
            return
        try:
            message = parse_message("desired", payload)
            desired = self._check_order(device, message)
        except ValidationError as exc:  # OrderRefused is one
            device.refused = str(exc)
            self.publish_reported(device)
            self._event(device, None, None, None, "refused", str(exc))
            return
        changed = [self._apply(device, order) for order in desired.models.values()]
        if not any(changed):
            self.publish_reported(device)  # as the agent does for an order with nothing to do

    def _check_order(self, device: SimDevice, message: dict[str, Any]) -> DesiredState:
        """Address, sequence and expiry as the agent's OrderGuard checks them (the signature with ``trust``)."""
        desired = verify_order(message, self.trust) if self.trust else DesiredState.from_message(message)
        if desired.device_id not in (None, device.device_id):
            raise OrderRefused(f"refused order: addressed to {desired.device_id!r}, not to this device")
        if desired.seq is not None and desired.seq != device.last_seq:
            if desired.seq < device.last_seq:
                raise OrderRefused(f"refused order: replayed (sequence {desired.seq} is not above "
                                   f"{device.last_seq}, the last one applied)")
            if desired.expires is not None and desired.expires < time.time():
                raise OrderRefused("refused order: expired")
            device.last_seq = desired.seq
        return desired

    def _apply(self, device: SimDevice, order: ModelOrder) -> bool:
        """Start acting on one model's order; False when it needs nothing (already done or under way)."""
        current = device.models.get(order.name) or ModelReport(order.name, DeployState.IDLE)
        state, active, now = current.state, current.active, time.time()
        if order.action == OrderAction.REMOVE:
            if active is None and state == DeployState.IDLE and order.name not in device.busy:
                return False
            device.busy.pop(order.name, None)
            self._set(device, ModelReport(order.name, DeployState.IDLE, order.deployment_id, order.rollout_id,
                                          None, active, None, now), state, "the controller removed the model")
            return True
        if active is not None and active.bundle_sha256 == order.bundle_sha256:
            if state == DeployState.ACTIVE and current.deployment_id == order.deployment_id \
                    and order.name not in device.busy:
                return False
            device.busy.pop(order.name, None)
            self._set(device, dataclasses.replace(current, state=DeployState.ACTIVE, deployment_id=order.deployment_id,
                                                  rollout_id=order.rollout_id, error=None, ts=now),
                      state, "the ordered bundle is already active")
            return True
        last = device.orders.get(order.name)
        if last is not None and _order_key(last) == _order_key(order) and (
                order.name in device.busy or state in GAVE_UP):
            return False  # redelivered while under way, or given up on already: the agent does not retry
        self._begin(device, order, current, now)
        return True

    def _begin(self, device: SimDevice, order: ModelOrder, current: ModelReport, now: float) -> None:
        generation = max(device.busy.values(), default=0) + 1
        device.orders[order.name], device.busy[order.name] = order, generation
        if order.bundle_sha256 not in device.seen:
            device.seen.add(order.bundle_sha256)
            self.order_times[order.bundle_sha256].append(now)
        self._set(device, dataclasses.replace(current, state=DeployState.DOWNLOADING,
                                              deployment_id=order.deployment_id, rollout_id=order.rollout_id,
                                              error=None, ts=now), current.state, None)
        refusal = self._downgrade(current.active, order)
        if refusal:
            self._fail(device, order.name, generation, refusal)
        else:
            self.later(self._step_delay(), self.step, device, order.name, generation, 1)

    @staticmethod
    def _downgrade(active: BundleRef | None, order: ModelOrder) -> str | None:
        old, new = (active.version if active else None), order.version
        if isinstance(old, int) and isinstance(new, int) and new < old and not order.allow_downgrade:
            return (f"refused: version {new} of {order.name!r} is lower than the active version {old}; "
                    "the order must set allow_downgrade")
        return None

    def _step_delay(self) -> float:
        base = self.time_to_active / (len(STEPS) - 1)
        return base * self._random.uniform(1 - self.jitter, 1 + self.jitter) if base else 0.0

    def step(self, device: SimDevice, name: str, generation: int, step: int) -> None:
        """Move model ``name`` on to ``STEPS[step]`` unless a newer order took over."""
        if device.busy.get(name) != generation:
            return
        current, order = device.models[name], device.orders[name]
        if STEPS[step] != DeployState.ACTIVE:
            self._set(device, dataclasses.replace(current, state=STEPS[step], ts=time.time()), current.state, None)
            self.later(self._step_delay(), self.step, device, name, generation, step + 1)
        elif self._fails(device, order):
            self._fail(device, name, generation,
                       f"health check failed: the model did not start: simulated failure of version {order.version}")
        else:
            device.busy.pop(name)
            ref = BundleRef(name, order.version, order.bundle_sha256, order.bundle_url, order.deployment_id)
            self._set(device, dataclasses.replace(current, state=DeployState.ACTIVE, active=ref,
                                                  previous=current.active, ts=time.time()), current.state, None)
            device.served[name] = [0.0, 0.0, time.time()]

    def _fails(self, device: SimDevice, order: ModelOrder) -> bool:
        share = self.behaviour_of(order.version).fail_share
        digest = zlib.crc32(f"{self.seed}:{device.device_id}:{order.bundle_sha256}".encode())
        return share > 0 and digest / 2**32 < share

    def _fail(self, device: SimDevice, name: str, generation: int, reason: str) -> None:
        if device.busy.get(name) == generation:
            device.busy.pop(name)
        current = device.models[name]
        self._set(device, dataclasses.replace(current, state=DeployState.FAILED, error=reason, ts=time.time()),
                  current.state, reason)

    def _set(self, device: SimDevice, report: ModelReport, before: DeployState, reason: str | None) -> None:
        """Record a model's new report, then publish it and its event (the agent's order of things)."""
        old = device.models.get(report.name)
        if old is not None and old.state == DeployState.ACTIVE and old.active:
            self.active[old.active.bundle_sha256 or ""] -= 1
        if report.state == DeployState.ACTIVE and report.active:
            self.active[report.active.bundle_sha256 or ""] += 1
        device.models[report.name], device.primary = report, report.name
        self.publish_reported(device)
        self._event(device, report.name, report.deployment_id, before, report.state.value, reason)

    # --- telemetry -----------------------------------------------------------------------------
    def sample(self, device: SimDevice) -> bytes:
        """One encoded telemetry message with the fields of ``edge_agent.telemetry.sample``."""
        now = time.time()
        models: dict[str, Any] = {}
        for name, report in device.models.items():
            if report.active is None or name not in device.served:
                continue
            counters = device.served[name]
            behaviour = self.behaviour_of(report.active.version)
            new = self.requests_per_s * (now - counters[2])
            counters[0] += new
            counters[1] += new * behaviour.error_rate
            counters[2] = now
            p95 = round(behaviour.p95_ms * self._random.uniform(0.95, 1.05), 3)
            models[name] = {"requests": int(counters[0]), "errors": int(counters[1]), "p50_ms": round(p95 * 0.5, 3),
                            "p95_ms": p95, "p99_ms": round(p95 * 1.5, 3), "mean_ms": round(p95 * 0.55, 3),
                            "batches": int(counters[0]), "mean_batch_size": 1.0,
                            "version": report.active.version, "bundle_sha256": report.active.bundle_sha256}
        primary = device.models.get(device.primary or "")
        active = primary.active if primary else None
        body = {"device_id": device.device_id, "ts": now, "uptime_s": round(now - self.started, 3),
                "cpu_percent": round(self._random.uniform(2, 8), 1), "system_cpu_percent": 10.0,
                "memory_rss_mb": 120.0, "models": models,
                "versions": {"agent": AGENT_VERSION, "model": active.version if active else None,
                             "bundle_sha256": active.bundle_sha256 if active else None}}
        return encode_message("telemetry", body)
