"""Fleet rollouts over MQTT: who runs what, and moving a selection of devices to a new bundle.

A rollout moves one named model; a device's other models are left as they are. Every desired
message is a signed order (:mod:`edge_agent.orders`): the controller's order key signs it, with
the device id, the next number of a per-device counter persisted under
``EDGEDEPLOY_HOME/fleet/sequences.json`` (so two CLI runs still count up) and an expiry.

The rollout logic lives in :class:`RolloutPlan` and is pure (no I/O besides its JSON form): which
reports count as success or failure and the next action; wave splitting and the failure threshold
are :mod:`packager.control.policy`'s, shared with the controller.
:class:`FleetController` is the thin adapter: it reads retained ``status``/``reported`` messages,
publishes retained ``desired`` messages and persists the plan after every step under
``EDGEDEPLOY_HOME/rollouts/<id>.json`` (atomic writes), so a restarted controller resumes it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from edge_agent.atomic import atomic_write_json, read_json
from edge_agent.broker_tls import BrokerTLS, redact_url, tls_refusal
from edge_agent.errors import EdgeDeployError, NotFoundError, UsageError, ValidationError, brief
from edge_agent.fleet_messages import (
    DEFAULT_PREFIX,
    DeployState,
    DesiredState,
    DeviceReport,
    ModelOrder,
    ModelReport,
    OrderAction,
    encode_message,
    parse_message,
    parse_topic,
    topic,
)
from edge_agent.home import edgedeploy_home
from edge_agent.orders import ORDER_TTL_S, sign_order, verify_order
from edge_agent.transport import ControllerTransport, controller_transport
from edge_agent.trust import TrustStore
from packager.control.policy import parse_fraction, parse_wave, split_waves, too_many_failures
from packager.fleet_ops import FleetOps

__all__ = [
    "DEFAULT_BROKER",
    "DeviceSelector",
    "FleetController",
    "compose_desired",
    "device_row",
    "own_order",
    "RolloutPlan",
    "SequenceCounter",
    "broker_tls",
    "parse_fraction",
    "parse_wave",
    "publish_target",
    "split_waves",
]

log = logging.getLogger(__name__)

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
TERMINAL = ("succeeded", "failed", "rolled-back")
FAILED_STATES = (DeployState.FAILED, DeployState.ROLLED_BACK)


def model_report(report: dict[str, Any] | None, name: str) -> ModelReport | None:
    """Model ``name``'s part of a device's reported message (schema 1 or 2); None when absent."""
    if not report:
        return None
    try:
        if not isinstance(report.get("models"), dict):  # a single-model agent: the top level is the model
            return ModelReport.from_body(name, report)
        return DeviceReport.from_message(report).models.get(name)
    except (ValidationError, TypeError, ValueError):
        return None


def device_row(device_id: str, report: dict[str, Any], status: dict[str, Any],
               last_seen: float | None) -> dict[str, Any]:
    """A ``fleet devices --json`` row from a device's retained reported and status messages."""
    active = report.get("active") or {}
    model: dict[str, Any] = active["model"] if isinstance(active.get("model"), dict) else {}
    try:
        models = DeviceReport.from_message(report).models if report else {}
    except (ValidationError, TypeError, ValueError):
        models = {}
    return {
        "device_id": device_id,
        "online": bool(status.get("online", False)),
        "model": model.get("name") or active.get("name"),
        "model_version": model.get("version") or active.get("version"),
        "bundle_sha256": active.get("bundle_sha256"),
        "state": report.get("state", "unknown"),
        "last_seen": report.get("ts") or last_seen,
        "groups": report.get("groups") or [],
        "tags": report.get("tags") or {},
        "profile": report.get("profile"),
        "http_port": report.get("http_port"),
        "grpc_port": report.get("grpc_port"),
        "error": report.get("error"),
        "refused": report.get("refused"),
        "models": [{"name": name, "version": m.active.version if m.active else None,
                    "bundle_sha256": m.active.bundle_sha256 if m.active else None, "state": m.state.value,
                    "error": m.error} for name, m in sorted(models.items())],
    }


def own_order(message: dict[str, Any] | None, trust: TrustStore) -> DesiredState | None:
    """A retained desired state when this controller signed it; anything else is not built on."""
    if not message:
        return None
    try:
        return verify_order(message, trust)
    except ValidationError as exc:  # OrderRefused is one
        log.info("not building on the retained order of %s: %s", message.get("device_id"), exc)
        return None


def compose_desired(device_id: str, current: DesiredState | None, order: ModelOrder, seq: int,
                    expires: float, key: Any) -> dict[str, Any]:
    """A device's next signed desired state: what ``current`` told it for its other models, plus ``order``.

    Besides schema 2's ``models``, the message carries the ordered model's schema-1 fields at its
    top level, so tools written against schema 1 (simulators, an older agent) read the order too;
    the signature covers both.
    """
    if current is not None and current.device_id != device_id:
        current = None  # a valid order of another device, copied here: not this device's state
    models = dict(current.models) if current else {}
    models[order.name] = order
    desired = DesiredState(models, device_id, seq, round(expires, 3))
    return sign_order({**order.to_body(), "schema": desired.schema, **desired.to_body()}, key)


@dataclass(frozen=True)
class DeviceSelector:
    """``all``, ``device:ID[,ID...]``, ``group:NAME`` or ``tag:KEY=VALUE``."""

    kind: str
    values: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> DeviceSelector:
        """Parse a ``--to`` selector; UsageError says the accepted forms."""
        text = (text or "").strip()
        if text == "all":
            return cls("all")
        kind, _, rest = text.partition(":")
        values = tuple(v for v in rest.split(",") if v) if kind == "device" else (rest,)
        if kind in ("device", "group") and all(values) and values:
            return cls(kind, values)
        if kind == "tag" and "=" in rest and rest.split("=", 1)[0]:
            return cls(kind, tuple(rest.split("=", 1)))
        raise UsageError(f"bad selector {text!r}: use all, device:ID[,ID...], group:NAME or tag:KEY=VALUE")

    def matches(self, device: dict[str, Any]) -> bool:
        """True when a device (as listed by ``FleetController.devices``) is selected."""
        if self.kind == "all":
            return True
        if self.kind == "device":
            return device["device_id"] in self.values
        if self.kind == "group":
            return self.values[0] in (device.get("groups") or [])
        key, value = self.values
        return str((device.get("tags") or {}).get(key)) == value


@dataclass
class RolloutPlan:
    """A persisted rollout: waves of devices, each device's previous and target bundle and its state.

    Device states: ``pending`` (not ordered yet), ``updating`` (desired state published),
    ``succeeded``, ``failed``, ``rolled-back``. Rollout states: ``running``, ``succeeded``,
    ``rolling-back``, ``rolled-back``, ``failed`` (nothing selected to roll out to).
    """

    rollout_id: str
    target: dict[str, Any]  # {"bundle_sha256", "bundle_url", "model": {"name", "version"}}
    selector: str
    waves: list[list[str]]
    devices: dict[str, dict[str, Any]]  # id -> {"previous": target-like | None, "state", "error"}
    max_failures: float = 0.1
    wave_timeout: float = 300.0
    state: str = "running"
    current_wave: int = -1
    wave_started: float = 0.0
    created: float = field(default_factory=time.time)
    reason: str = ""

    @classmethod
    def create(cls, rollout_id: str, target: dict[str, Any], selector: str,
               previous: dict[str, dict[str, Any] | None], canary: int = 1, wave: str | int = "25%",
               max_failures: str | float = "10%", wave_timeout: float = 300.0) -> RolloutPlan:
        """A new plan over the devices in ``previous`` (device id -> what it runs now, or None)."""
        fraction = max_failures if isinstance(max_failures, float) else parse_fraction(max_failures)
        devices = {d: {"previous": prev, "state": "pending", "error": None} for d, prev in previous.items()}
        plan = cls(rollout_id, target, selector, split_waves(list(previous), canary, wave), devices,
                   fraction, wave_timeout)
        if not devices:
            plan.state, plan.reason = "failed", f"no device matches {selector!r}"
        return plan

    # -- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON form (what is persisted)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> RolloutPlan:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(**doc)
        except TypeError as exc:
            raise ValidationError(f"rollout plan is damaged ({exc}); start a new rollout") from None

    # -- counting ----------------------------------------------------------------------------
    def count(self, *states: str) -> int:
        """How many devices are in one of ``states``."""
        return sum(1 for d in self.devices.values() if d["state"] in states)

    def too_many_failures(self) -> bool:
        """True when the failure rate among finished devices is above ``max_failures``."""
        return too_many_failures(self.count("failed"), self.count("succeeded"), self.max_failures, 1)

    # -- events ------------------------------------------------------------------------------
    def record_report(self, device_id: str, report: dict[str, Any]) -> bool:
        """Apply a device's ``reported`` message; True when the device's state changed."""
        device = self.devices.get(device_id)
        if device is None or device["state"] != "updating":
            return False
        model = model_report(report, self.target["model"]["name"])
        if model is None:
            return False
        if model.state == DeployState.ACTIVE and model.active and \
                model.active.bundle_sha256 == self.target["bundle_sha256"]:
            device["state"] = "succeeded"
            return True
        if model.state in FAILED_STATES and model.deployment_id == self.rollout_id:
            device["state"], device["error"] = "failed", model.error or model.state.value
            return True
        return False

    def expire(self, now: float) -> list[str]:
        """Mark devices of the current wave that did not finish in ``wave_timeout`` as failed."""
        if self.state != "running" or self.current_wave < 0 or now - self.wave_started < self.wave_timeout:
            return []
        late = [d for d in self.waves[self.current_wave] if self.devices[d]["state"] == "updating"]
        for device_id in late:
            self.devices[device_id].update(state="failed", error=f"no report within {self.wave_timeout:.0f}s")
        return late

    def next_action(self) -> tuple[str, list[str]]:
        """What to do now: ("wait", []), ("publish", devices of next wave), ("rollback", devices), ("done", [])."""
        if self.state in TERMINAL:
            return "done", []
        if self.state == "rolling-back" or self.too_many_failures():
            return "rollback", self.rollback_set()
        if self.current_wave >= 0 and self.count_in_wave(self.current_wave, "updating"):
            return "wait", []
        if self.current_wave + 1 < len(self.waves):
            return "publish", list(self.waves[self.current_wave + 1])
        return "done", []

    def count_in_wave(self, index: int, state: str) -> int:
        """Devices of wave ``index`` in ``state``."""
        return sum(1 for d in self.waves[index] if self.devices[d]["state"] == state)

    def rollback_set(self) -> list[str]:
        """Devices that were ordered to the new bundle (they get their previous one back)."""
        return sorted(d for d, info in self.devices.items() if info["state"] in ("updating", "succeeded", "failed"))

    def start_wave(self, now: float) -> list[str]:
        """Mark the next wave as ordered; returns its devices."""
        self.current_wave += 1
        self.wave_started = now
        for device_id in self.waves[self.current_wave]:
            self.devices[device_id]["state"] = "updating"
        return list(self.waves[self.current_wave])

    def begin_rollback(self, reason: str) -> list[str]:
        """Switch to rolling back; returns the devices to send their previous bundle."""
        self.state, self.reason = "rolling-back", reason
        return self.rollback_set()

    def finish_rollback(self, device_ids: list[str]) -> None:
        """The previous bundle was ordered on every device in ``device_ids``."""
        for device_id in device_ids:
            self.devices[device_id]["state"] = "rolled-back"
        self.state = "rolled-back"

    def finish(self) -> None:
        """Every wave finished under the failure threshold."""
        self.state = "succeeded"

    def status(self) -> dict[str, Any]:
        """The ``fleet status --json`` document."""
        waves = [
            {"index": i, "devices": list(w), "canary": i == 0 and len(self.waves) > 1 and len(w) < len(self.devices),
             "succeeded": self.count_in_wave(i, "succeeded"), "failed": self.count_in_wave(i, "failed"),
             "pending": self.count_in_wave(i, "pending") + self.count_in_wave(i, "updating"),
             "rolled_back": self.count_in_wave(i, "rolled-back")}
            for i, w in enumerate(self.waves)
        ]
        return {
            "rollout_id": self.rollout_id, "state": self.state, "reason": self.reason,
            "bundle_sha256": self.target["bundle_sha256"], "model": self.target.get("model"),
            "selector": self.selector, "succeeded": self.count("succeeded"),
            "failed": self.count("failed"), "pending": self.count("pending", "updating"),
            "rolled_back": self.count("rolled-back"), "current_wave": self.current_wave, "waves": waves,
            "devices": {d: {"state": i["state"], "error": i["error"]} for d, i in sorted(self.devices.items())},
        }


def publish_target(bundle_path: Path, server_url: str, home: Path | None = None) -> dict[str, Any]:
    """Verify a bundle against the local trust store and publish it for the bundle server.

    Returns what an order points at: ``{"bundle_sha256", "bundle_url", "model": {"name", "version"}}``.
    A bundle that does not verify is refused here, before any device hears of it.
    """
    from edge_agent.bundle import verify_bundle
    from packager.bundle_server import publish_bundle

    home = home or edgedeploy_home()
    manifest = verify_bundle(Path(bundle_path), TrustStore.local(home))
    sha, url_path = publish_bundle(Path(bundle_path), home)
    return {"bundle_sha256": sha, "bundle_url": server_url.rstrip("/") + url_path,
            "model": {"name": manifest.name, "version": manifest.version}}


def _rollouts_dir(home: Path) -> Path:
    folder = home / "rollouts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


_MQTT_VERSIONS = ("auto", "5", "3.1.1")
_SILENT_CONNACK_S = 3.0  # an MQTT 5 CONNECT left unanswered this long: the broker speaks 3.1.1 only (amqtt)


class SequenceCounter:
    """The controller's order counter per device, persisted so every order outnumbers the last."""

    def __init__(self, home: Path) -> None:
        self.path = home / "fleet" / "sequences.json"

    def next(self, device_id: str, floor: int = -1) -> int:
        """One more than both the last number given to ``device_id`` and ``floor`` (what the device saw)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two CLI runs at once must not hand out one number twice
            counters = read_json(self.path) if self.path.is_file() else {}
            value = max(int(counters.get(device_id, -1)), floor) + 1
            counters[device_id] = value
            atomic_write_json(self.path, counters)
        return value


class _ReadBuffer:
    """A socket whose reads come from 64 KiB chunks: paho asks for one packet's bytes in pieces.

    paho reads every packet with three or more ``recv`` calls (the type byte, each length byte,
    then the rest), a system call each; a controller reading every message of a fleet spent a
    fifth of its network thread there. ``pending()`` tells paho's loop that buffered bytes are
    waiting, as an SSL socket's does, so it reads them without waiting in ``select``. Everything
    else (``send``, ``fileno``, ``close``...) is the socket's own.
    """

    __slots__ = ("_sock", "_data", "_pos")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._data = b""
        self._pos = 0

    def recv(self, size: int) -> bytes:
        if self._pos >= len(self._data):
            data = self._sock.recv(max(size, 65536))  # BlockingIOError and SSL's want-read pass through
            if len(data) <= size:
                return data
            self._data, self._pos = data, 0
        chunk = self._data[self._pos:self._pos + size]
        self._pos += len(chunk)
        return chunk

    def buffered(self) -> int:
        """Bytes read from the socket and not yet handed to paho."""
        return len(self._data) - self._pos

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)  # an SSL socket's decrypted bytes
        return self.buffered() + (inner() if inner else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


_BUFFERED_CLIENT: Any = None
_PACKETS_PER_READ = 500  # then paho's loop sends what is queued (acknowledgements, orders) before reading on


def _buffered_client() -> Any:
    """paho's ``Client`` with its socket wrapped in :class:`_ReadBuffer` (built on first use: paho loads lazily).

    ``_create_socket`` is paho 2's private hook (pyproject pins paho-mqtt below 3); every link
    goes through it, so the e2e tests exercise it against the real brokers, with and without TLS.
    """
    global _BUFFERED_CLIENT
    if _BUFFERED_CLIENT is None:
        import paho.mqtt.client as mqtt

        class BufferedClient(mqtt.Client):  # type: ignore[misc]
            def _create_socket(self) -> Any:
                return _ReadBuffer(super()._create_socket())

            def loop_read(self, max_packets: int = 1) -> Any:
                # paho reads one packet per wait in select(); read on while whole packets are buffered
                rc = super().loop_read(max_packets)
                for _ in range(_PACKETS_PER_READ):
                    sock = self._sock
                    if rc != mqtt.MQTT_ERR_SUCCESS or not isinstance(sock, _ReadBuffer) or not sock.buffered():
                        break
                    rc = super().loop_read(max_packets)
                return rc

            def _handle_on_message(self, message: Any) -> None:
                # paho matches every topic against per-topic callbacks first; links register none
                on_message = self.on_message
                if on_message is not None:
                    with self._in_callback_mutex:
                        on_message(self, self._userdata, message)

        _BUFFERED_CLIENT = BufferedClient
    return _BUFFERED_CLIENT


class _Link:
    """The MQTT side: latest retained ``reported``/``status`` per device, and publishing.

    ``mqtt_version="auto"`` tries MQTT 5, then 3.1.1 when the broker refuses the version, closes
    the connection before a CONNACK (RabbitMQ's MQTT plugin before 3.13) or does not answer.
    A subclass that subscribes to more of :data:`KINDS` gets their messages in :meth:`_other`.
    Every link also takes ``responses`` and hands them to its :meth:`on_response` listeners.
    ``tls`` gives an ``mqtts://`` connection its CA file and client identity (checked before connecting;
    without it: the system's CAs, no client certificate). Messages show the URL without its password.
    """

    KINDS: tuple[str, ...] = ("reported", "status", "desired")

    def __init__(self, broker_url: str, prefix: str, mqtt_version: str = "auto", tls: BrokerTLS | None = None) -> None:
        import paho.mqtt.client as mqtt  # the adapter only: the plan logic never needs paho

        url = urlparse(broker_url)
        if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
            raise UsageError(f"bad broker URL {redact_url(broker_url)!r}: write mqtt://HOST:PORT")
        self._tls = _tls_context(url.scheme, tls)
        if str(mqtt_version) not in _MQTT_VERSIONS:
            raise UsageError(f"bad MQTT version {mqtt_version!r}: use {', '.join(_MQTT_VERSIONS)}")
        self.prefix = prefix
        self.reported: dict[str, dict[str, Any]] = {}
        self.status: dict[str, dict[str, Any]] = {}
        self.desired: dict[str, dict[str, Any]] = {}  # the retained orders, as the broker holds them
        self.last_seen: dict[str, float] = {}
        self.changed = threading.Condition()
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._url = url
        self._connected = threading.Event()
        self._answer = threading.Event()  # a CONNACK, or the connection closed before one
        self._refused_version = False
        versions = {"auto": [mqtt.MQTTv5, mqtt.MQTTv311], "5": [mqtt.MQTTv5], "3.1.1": [mqtt.MQTTv311]}
        candidates = versions[str(mqtt_version)]
        for protocol in candidates:
            last = protocol == candidates[-1]
            self._client = self._open(broker_url, protocol)
            if self._wait_connected(_SILENT_CONNACK_S if not last else 10.0) or last:
                break
            log.info("broker %s did not take an MQTT 5 connection; trying 3.1.1", redact_url(broker_url))
            self.close()
        self.mqtt5 = protocol == mqtt.MQTTv5
        if self._connected.is_set():
            log.info("connected to %s (MQTT %s)", redact_url(broker_url), "5" if self.mqtt5 else "3.1.1")
        else:
            self.close()
            self._raise_tls_refusal(broker_url)
            tried = "MQTT 5 or 3.1.1" if mqtt_version == "auto" else f"MQTT {mqtt_version}"
            raise EdgeDeployError(f"the MQTT broker at {redact_url(broker_url)} did not accept the connection "
                                  f"({tried}); check the URL, the credentials and --mqtt-version")

    def _raise_tls_refusal(self, broker_url: str) -> None:
        """Raise the reason TLS fails, when it does (paho only says the connection was lost)."""
        if self._tls is not None:
            reason = tls_refusal(self._url.hostname or "127.0.0.1", self._url.port or 8883, self._tls)
            if reason is not None:
                raise EdgeDeployError(f"cannot connect to the MQTT broker at {redact_url(broker_url)}: {reason}")

    def _open(self, broker_url: str, protocol: Any) -> Any:
        import paho.mqtt.client as mqtt

        url = self._url
        self._answer.clear()
        self._refused_version = False
        client = _buffered_client()(mqtt.CallbackAPIVersion.VERSION2,
                                    client_id=f"edgedeploy-ctl-{secrets.token_hex(4)}", protocol=protocol)
        if url.username:
            client.username_pw_set(url.username, url.password)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.suppress_exceptions = True  # belt and braces: our callbacks contain and log their own errors
        client.reconnect_delay_set(1, 2)
        client.max_inflight_messages_set(self._max_inflight(protocol == mqtt.MQTTv5))
        try:
            port = url.port or (8883 if url.scheme == "mqtts" else 1883)
            client.connect(url.hostname or "127.0.0.1", port, keepalive=30)
        except ssl.SSLError:
            self._raise_tls_refusal(broker_url)
            raise EdgeDeployError(f"TLS with the MQTT broker at {redact_url(broker_url)} failed") from None
        except OSError as exc:
            raise EdgeDeployError(f"cannot reach the MQTT broker at {redact_url(broker_url)} ({exc}); "
                                  "is it running?") from None
        client.loop_start()
        return client

    def _wait_connected(self, timeout: float) -> bool:
        """True once connected; False when the broker refused or dropped this version, or stayed silent."""
        self._answer.wait(timeout)
        return self._connected.wait(0.2) if self._answer.is_set() and not self._refused_version else False

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self._refused_version = reason_code.value in (1, 132)  # unacceptable / unsupported version
            self._answer.set()
            log.warning("broker refused the connection: %s", reason_code)
            return
        kinds = dict.fromkeys((*self.KINDS, "responses"))  # answers to requests, whatever a subclass adds
        client.subscribe([(topic("+", kind, self.prefix), self._qos(kind)) for kind in kinds])
        self._connected.set()
        self._answer.set()

    def _max_inflight(self, mqtt5: bool) -> int:
        """QoS 1 publishes paho keeps unacknowledged at once (0: no limit)."""
        return 1000  # a wave of thousands of orders is not sent 20 at a time

    def _qos(self, kind: str) -> int:
        """The QoS this link subscribes to ``kind`` with."""
        return 1

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if not self._connected.is_set():  # closed before any CONNACK: the broker did not take this version
            self._refused_version = True
            self._answer.set()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            self._take(message)
        except Exception:  # whatever a device sends, the network loop lives on
            log.exception("dropped a message on %s", brief(message.topic, 200))

    def _take(self, message: Any) -> None:
        try:
            device_id, kind = parse_topic(message.topic, self.prefix)
            body = parse_message(kind, message.payload) if message.payload else None
        except ValidationError as exc:
            log.info("ignoring a message on %s: %s", brief(message.topic, 200), exc)
            return
        if kind == "responses":
            self._deliver(device_id, body)
            return
        if kind not in ("reported", "status", "desired"):
            self._other(kind, device_id, body)
            return
        with self.changed:
            target = {"reported": self.reported, "desired": self.desired}.get(kind, self.status)
            if body is None:
                target.pop(device_id, None)
            else:
                target[device_id] = body
                if kind != "desired":
                    self.last_seen[device_id] = time.time()
            self._stored(kind, device_id)
            self.changed.notify_all()

    def resync(self, device_ids: list[str], kind: str = "reported") -> None:
        """Ask the broker again for these devices' retained ``kind`` messages.

        A broker drops QoS 1 messages beyond a client's queue limit (Mosquitto's
        ``max_queued_messages``, 1,000 by default) when a wave's reports arrive faster than they are
        read; the retained copy is still there. A subscription to each topic delivers it again; it is
        dropped at once, the wildcard subscription carrying on.
        """
        for start in range(0, len(device_ids), 100):
            topics = [topic(d, kind, self.prefix) for d in device_ids[start:start + 100]]
            self._client.subscribe([(t, self._qos(kind)) for t in topics])
            self._client.unsubscribe(topics)

    def _stored(self, kind: str, device_id: str) -> None:
        """Called (under ``changed``) after a retained message of ``device_id`` was stored."""

    def _other(self, kind: str, device_id: str, body: dict[str, Any] | None) -> None:
        """A message of a kind beyond the retained three (telemetry, events, ...); ignored here."""

    def _deliver(self, device_id: str, response: dict[str, Any] | None) -> None:
        if response is None or response.get("device_id") != device_id:
            log.info("ignoring a response on %s's topic that names device %r", device_id,
                     brief(str((response or {}).get("device_id")), 80))
            return
        for listener in list(self._listeners):
            try:
                listener(response)
            except Exception:  # one listener's bug must not starve the others or the network loop
                log.exception("a response listener failed")

    def on_response(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener(response)`` (from paho's thread) for every response a device publishes."""
        self._listeners.append(listener)

    def publish_request(self, device_id: str, message: dict[str, Any]) -> None:
        """Publish a signed request (QoS 1, not retained); paho resends it if the link is reconnecting."""
        import paho.mqtt.client as mqtt

        info = self._client.publish(topic(device_id, "requests", self.prefix), encode_message("requests", message),
                                    qos=1, retain=False)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise EdgeDeployError(f"the request for {device_id} could not be sent ({mqtt.error_string(info.rc)})")

    def settle(self, quiet: float = 0.3, limit: float = 3.0) -> None:
        """Wait until retained messages stopped arriving (``quiet`` seconds without one)."""
        deadline = time.monotonic() + limit
        with self.changed:
            while time.monotonic() < deadline and self.changed.wait(quiet):
                pass

    def wait_change(self, timeout: float) -> None:
        """Block until any message arrives or ``timeout`` passes."""
        with self.changed:
            self.changed.wait(timeout)

    def publish_desired(self, device_id: str, message: dict[str, Any]) -> None:
        """Publish a retained QoS 1 desired state (a signed order) and wait for the broker to take it."""
        self.publish_desired_many([(device_id, message)])

    def publish_desired_many(self, orders: list[tuple[str, dict[str, Any]]], timeout: float = 30.0) -> None:
        """Publish many retained QoS 1 orders at once, then wait until the broker acknowledged all of them."""
        self.publish_payloads([(device_id, encode_message("desired", message)) for device_id, message in orders],
                              timeout)

    def publish_payloads(self, payloads: list[tuple[str, bytes]], timeout: float = 30.0) -> None:
        """:meth:`publish_desired_many` for orders already encoded (``encode_message("desired", ...)``)."""
        infos = [(device_id, self._client.publish(topic(device_id, "desired", self.prefix), payload, qos=1,
                                                  retain=True))
                 for device_id, payload in payloads]
        deadline = time.monotonic() + timeout
        for device_id, info in infos:
            while not info.is_published() and time.monotonic() < deadline:
                try:
                    info.wait_for_publish(max(0.01, min(1.0, deadline - time.monotonic())))
                except (RuntimeError, ValueError):
                    time.sleep(0.2)  # not connected right now: paho resends once it reconnects
            if not info.is_published():
                raise EdgeDeployError(f"the broker did not acknowledge the order for {device_id}; is it running?")

    def close(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()


def _tls_context(scheme: str, tls: BrokerTLS | None) -> ssl.SSLContext | None:
    """The checked TLS context of an ``mqtts://`` link; None for ``mqtt://`` (refused with TLS files)."""
    if scheme != "mqtts":
        if tls is not None and (tls.ca_file or tls.cert_file or tls.key_file):
            raise UsageError("a CA file or client certificate was given for an mqtt:// broker: use mqtts://")
        return None
    tls = tls or BrokerTLS()
    tls.check()
    return tls.context()


def broker_tls(ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None,
               environ: Mapping[str, str] = os.environ) -> BrokerTLS:
    """The controller's broker TLS files: those given, else ``$EDGEDEPLOY_BROKER_CA``, ``_CERT``, ``_KEY``."""
    def pick(given: Path | None, variable: str) -> Path | None:
        return given if given is not None else (Path(environ[variable]) if environ.get(variable) else None)

    return BrokerTLS(pick(ca_file, "EDGEDEPLOY_BROKER_CA"), pick(cert_file, "EDGEDEPLOY_BROKER_CERT"),
                     pick(key_file, "EDGEDEPLOY_BROKER_KEY"), names=("--ca-file", "--tls-cert", "--tls-key"))


MQTTControllerLink = _Link  # the controller side of the MQTT fleet transport (its entry point's target)


class FleetController:
    """Lists devices and runs rollouts; every step is persisted so a restart resumes a rollout."""

    def __init__(self, broker_url: str = DEFAULT_BROKER, prefix: str = DEFAULT_PREFIX,
                 home: Path | None = None, mqtt_version: str = "auto", order_ttl_s: float = ORDER_TTL_S,
                 tls: BrokerTLS | None = None) -> None:
        self.broker_url = broker_url
        self.tls = tls  # an mqtts:// broker's CA file and client identity (see broker_tls)
        self.prefix = prefix
        self.mqtt_version = mqtt_version
        self.home = Path(home) if home else edgedeploy_home()
        self.order_ttl_s = order_ttl_s
        self.sequences = SequenceCounter(self.home)
        self._link: ControllerTransport | None = None
        self._ops: FleetOps | None = None

    # -- connection --------------------------------------------------------------------------
    def _connect(self) -> ControllerTransport:
        if self._link is None:
            options: dict[str, Any] = {"mqtt_version": self.mqtt_version}
            if self.tls is not None:  # a transport without TLS never sees the option
                options["tls"] = self.tls
            self._link = controller_transport(self.broker_url)(self.broker_url, self.prefix, **options)
            self._link.settle()
        return self._link

    def operations(self) -> FleetOps:
        """Requests to devices (logs, run-time parameters, restarts) over this controller's link."""
        if self._ops is None:
            self._ops = FleetOps(self._connect(), self.home)
        return self._ops

    def close(self) -> None:
        """Disconnect from the broker."""
        if self._link is not None:
            self._link.close()
            self._link = None
            self._ops = None

    def __enter__(self) -> FleetController:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- devices -----------------------------------------------------------------------------
    def devices(self) -> list[dict[str, Any]]:
        """Every device that reported: id, online, model, model_version, bundle_sha256, state, last_seen."""
        link = self._connect()
        with link.changed:
            ids = sorted(set(link.reported) | set(link.status))
            return [self._device_row(link, d) for d in ids]

    def select(self, selector: str) -> list[dict[str, Any]]:
        """The devices ``selector`` picks: the online ones, and every one ``device:`` names.

        NotFoundError when ``device:`` names a device that never reported.
        """
        chosen = DeviceSelector.parse(selector)
        rows = [d for d in self.devices() if chosen.matches(d) and (d["online"] or chosen.kind == "device")]
        if chosen.kind == "device":
            missing = sorted(set(chosen.values) - {d["device_id"] for d in rows})
            if missing:
                raise NotFoundError(f"unknown device(s): {', '.join(missing)}; see `edgedeploy fleet devices`")
        return rows

    @staticmethod
    def _device_row(link: ControllerTransport, device_id: str) -> dict[str, Any]:
        return device_row(device_id, link.reported.get(device_id) or {}, link.status.get(device_id) or {},
                          link.last_seen.get(device_id))

    # -- rollouts ----------------------------------------------------------------------------
    def rollout(self, bundle_path: Path, selector: str, server_url: str, canary: int = 1,
                wave: str | int = "25%", max_failures: str | float = "10%", wait: bool = False,
                wave_timeout: float = 300.0) -> str:
        """Start (and with ``wait`` finish) a rollout of ``bundle_path`` to the selected devices."""
        DeviceSelector.parse(selector)
        parse_wave(wave)
        target = publish_target(bundle_path, server_url, self.home)
        name = target["model"]["name"]
        rows = self.select(selector)
        link = self._connect()
        previous = {d["device_id"]: self._previous(link, d["device_id"], name, server_url) for d in rows}
        rollout_id = f"r-{time.strftime('%Y%m%d%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
        plan = RolloutPlan.create(rollout_id, target, selector, previous, canary, wave, max_failures, wave_timeout)
        self._save(plan)
        log.info("rollout %s: %d device(s) in %d wave(s)", rollout_id, len(previous), len(plan.waves))
        self.step(plan)
        if wait:
            self.resume(rollout_id)
        return rollout_id

    @staticmethod
    def _previous(link: ControllerTransport, device_id: str, name: str, server_url: str) -> dict[str, Any] | None:
        """What model ``name`` runs on the device now (the rollback target), or None."""
        report = model_report(link.reported.get(device_id), name)
        active = report.active if report else None
        if active is None or not active.bundle_sha256:
            return None
        url = active.bundle_url or f"{server_url.rstrip('/')}/bundles/{active.bundle_sha256}.edb"
        return {"bundle_sha256": active.bundle_sha256, "bundle_url": url,
                "model": {"name": active.name or name, "version": active.version}}

    def load(self, rollout_id: str) -> RolloutPlan:
        """The persisted plan of ``rollout_id``."""
        path = _rollouts_dir(self.home) / f"{rollout_id}.json"
        if "/" in rollout_id or not path.is_file():
            raise NotFoundError(f"no rollout {rollout_id!r}; see `edgedeploy fleet status`")
        return RolloutPlan.from_dict(read_json(path))

    def list_rollouts(self) -> list[dict[str, Any]]:
        """Short status of every persisted rollout, oldest first."""
        plans = [RolloutPlan.from_dict(read_json(p)) for p in _rollouts_dir(self.home).glob("r-*.json")]
        return [{k: p.status()[k] for k in ("rollout_id", "state", "succeeded", "failed", "pending", "selector")}
                for p in sorted(plans, key=lambda p: p.created)]

    def _save(self, plan: RolloutPlan) -> None:
        atomic_write_json(_rollouts_dir(self.home) / f"{plan.rollout_id}.json", plan.to_dict())

    def step(self, plan: RolloutPlan) -> RolloutPlan:
        """Apply what devices reported and take every action that is due; persists the plan."""
        link = self._connect()
        with link.changed:
            reports = {d: dict(link.reported[d]) for d in plan.devices if d in link.reported}
        for device_id, report in reports.items():
            plan.record_report(device_id, report)
        plan.expire(time.time())
        while True:
            action, devices = plan.next_action()
            if action == "publish":
                self._save(plan)  # the order is on record before it is sent
                for device_id in plan.start_wave(time.time()):
                    self._order(link, plan, device_id, plan.target)
                    plan.record_report(device_id, reports.get(device_id, {}))
            elif action == "rollback":
                self._rollback(link, plan, plan.reason or "too many devices failed")
            elif action == "done":
                if plan.state == "running":
                    plan.finish()
                break
            else:
                break
            self._save(plan)
        self._save(plan)
        return plan

    def _order(self, link: ControllerTransport, plan: RolloutPlan, device_id: str, target: dict[str, Any] | None,
               rollback: bool = False) -> None:
        name = plan.target["model"]["name"]
        deployment_id = plan.rollout_id + ("-rollback" if rollback else "")
        if target is None:  # the device ran nothing before: remove the model again
            order = ModelOrder(name, deployment_id, action=OrderAction.REMOVE, allow_downgrade=rollback,
                               rollout_id=plan.rollout_id)
        else:
            order = ModelOrder(name, deployment_id, target["bundle_url"], target["bundle_sha256"],
                               target["model"].get("version"), allow_downgrade=rollback, rollout_id=plan.rollout_id)
        link.publish_desired(device_id, self.signed_order(link, device_id, order))

    def signed_order(self, link: ControllerTransport, device_id: str, order: ModelOrder) -> dict[str, Any]:
        """The device's next desired state: what it was told for its other models, plus ``order``."""
        from packager.keys import load_order_key

        key = load_order_key(self.home)
        with link.changed:
            retained, report = link.desired.get(device_id), link.reported.get(device_id) or {}
        current = own_order(retained, TrustStore([key.public_key]))
        seen = max(current.seq if current and current.seq is not None else -1,
                   report["last_seq"] if isinstance(report.get("last_seq"), int) else -1)
        return compose_desired(device_id, current, order, self.sequences.next(device_id, seen),
                               time.time() + self.order_ttl_s, key)

    def _rollback(self, link: ControllerTransport, plan: RolloutPlan, reason: str) -> None:
        devices = plan.begin_rollback(reason)
        self._save(plan)
        log.warning("rollout %s: rolling back %d device(s): %s", plan.rollout_id, len(devices), reason)
        for device_id in devices:
            self._order(link, plan, device_id, plan.devices[device_id]["previous"], rollback=True)
        plan.finish_rollback(devices)

    def status(self, rollout_id: str, advance: bool = True) -> dict[str, Any]:
        """The rollout's status; a running plan is advanced one step first (so status resumes it)."""
        plan = self.load(rollout_id)
        if advance and plan.state not in TERMINAL:
            plan = self.step(plan)
        return plan.status()

    def resume(self, rollout_id: str, timeout: float | None = None,
               on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Drive a persisted rollout until it ends (or ``timeout`` seconds pass); returns its status.

        ``on_step`` gets the status after every step (the CLI's live progress).
        """
        plan = self.load(rollout_id)
        link = self._connect()
        deadline = None if timeout is None else time.monotonic() + timeout
        while plan.state not in TERMINAL:
            plan = self.step(plan)
            if on_step is not None:
                on_step(plan.status())
            if plan.state in TERMINAL or (deadline is not None and time.monotonic() > deadline):
                break
            link.wait_change(0.5)
        return plan.status()

    def abort(self, rollout_id: str) -> dict[str, Any]:
        """Stop a rollout and send every updated device its previous bundle."""
        plan = self.load(rollout_id)
        if plan.state in TERMINAL:
            raise UsageError(f"rollout {rollout_id} already ended ({plan.state})")
        self._rollback(self._connect(), plan, "aborted by the user")
        self._save(plan)
        return plan.status()
