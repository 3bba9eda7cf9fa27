"""The topic contract between the fleet controller and edge agents, and its typed messages.

Topics, under a prefix (default ``edgedeploy``)::

    {prefix}/devices/{device_id}/desired    retained, QoS 1, controller -> device: what to run
    {prefix}/devices/{device_id}/reported   retained, QoS 1, device -> controller: what it runs
    {prefix}/devices/{device_id}/status     retained, QoS 1, device: online; its last will: offline
    {prefix}/devices/{device_id}/telemetry  QoS 0, device -> controller, every telemetry period
    {prefix}/devices/{device_id}/events     QoS 1, device -> controller, one per state transition
    {prefix}/devices/{device_id}/requests   QoS 1, controller -> device: an operation (logs, config...)
    {prefix}/devices/{device_id}/responses  QoS 1, device -> controller: its answer, by request id

Every message is a JSON object with ``"schema": 2`` (:data:`SCHEMA_VERSION`); receivers also
accept ``"schema": 1``. Schema 2's desired message is a set of named models (:class:`DesiredState`
of :class:`ModelOrder`), schema 1's is one model. A desired message is an *order*: it carries the
device id, a sequence number, an expiry and the controller's signature (:mod:`edge_agent.orders`).
The reported message (:class:`DeviceReport`) holds one :class:`ModelReport` per model, and the
fields of schema 1 for the model ordered last. A message that is not JSON, is larger than
:data:`MAX_MESSAGE_BYTES`, has an unknown schema version or lacks a required field is refused by
:func:`parse_message` with a ValidationError; receivers log it and go on.

A request (:class:`OperationRequest`) is signed by the controller's order key like an order, for
one device, with an expiry and a request id (:mod:`edge_agent.operations` checks it); the device
answers with an :class:`OperationResponse` carrying the same request id. A refused request's
``error_type`` names the error class (:data:`RESPONSE_ERRORS`), so the controller raises the
same kind of error the device did.
"""

from __future__ import annotations

import enum
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from edge_agent.errors import (
    EdgeDeployError,
    InvalidInputError,
    ModelNotReadyError,
    NotFoundError,
    UnavailableError,
    UsageError,
    ValidationError,
    brief,
)
from edge_agent.jsonlimits import loads_bounded

__all__ = [
    "ACCEPTED_SCHEMAS",
    "DEFAULT_PREFIX",
    "MAX_MESSAGE_BYTES",
    "MESSAGE_KINDS",
    "OPERATIONS",
    "RESPONSE_ERRORS",
    "SCHEMA_VERSION",
    "BundleRef",
    "DeployState",
    "DesiredState",
    "DeviceReport",
    "ModelOrder",
    "ModelReport",
    "OperationRequest",
    "OperationResponse",
    "OrderAction",
    "check_device_id",
    "check_model_name",
    "check_request_id",
    "encode_message",
    "error_type_of",
    "parse_message",
    "parse_topic",
    "topic",
]

SCHEMA_VERSION = 2
ACCEPTED_SCHEMAS = (1, 2)
DEFAULT_PREFIX = "edgedeploy"
MAX_MESSAGE_BYTES = 256 * 1024
MESSAGE_KINDS = ("desired", "reported", "status", "telemetry", "events", "requests", "responses")
OPERATIONS = ("logs", "config", "get-config", "restart")
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # it names a folder on the device
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")

# Fields each kind must carry (besides "schema"), by schema; more fields are allowed.
_REQUIRED: dict[str, dict[int, tuple[str, ...]]] = {
    # 1: {"deployment_id", "bundle_url", "bundle_sha256", "model": {"name", "version"},
    #     "allow_downgrade", "rollout_id", "action"?: "remove"} plus the order fields
    # 2: {"device_id", "seq", "expires", "models": {name: <schema-1 body>}, "signature"}
    "desired": {1: ("deployment_id", "bundle_url", "bundle_sha256", "model"),
                2: ("device_id", "seq", "expires", "models")},
    # {"device_id", "state", "ts", "models": {name: ModelReport}, ... see DeviceReport}
    "reported": {1: ("device_id", "state", "ts"), 2: ("device_id", "state", "ts")},
    # {"online": bool, "ts"}
    "status": {1: ("online",), 2: ("online",)},
    # {"device_id", "ts", "uptime_s", "cpu_percent", "memory_rss_mb", "models": {name: {...}}}
    "telemetry": {1: ("device_id", "ts"), 2: ("device_id", "ts")},
    # {"device_id", "model", "deployment_id", "from", "to", "reason", "refused"?, "ts"}
    "events": {1: ("device_id", "to", "ts"), 2: ("device_id", "to", "ts")},
    # {"request_id", "op", "model"?, "args", "device_id", "expires", "signature"}: schema 2 only
    "requests": {2: ("request_id", "op", "device_id")},
    # {"request_id", "device_id", "ok", "result" | "error" and "error_type", "ts"}
    "responses": {2: ("request_id", "device_id", "ok")},
}
# A refused request's error_type: the first row whose class matches names it; the controller raises
# the first class listed under that name.
RESPONSE_ERRORS: tuple[tuple[str, type[EdgeDeployError]], ...] = (
    ("not-found", NotFoundError),
    ("invalid", ValidationError),
    ("invalid", UsageError),
    ("invalid", InvalidInputError),
    ("unavailable", UnavailableError),
    ("unavailable", ModelNotReadyError),
    ("failed", EdgeDeployError),
)


class DeployState(enum.StrEnum):
    """States of one model's deployment on a device, shared by the agent and the controller."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    HEALTH_CHECKING = "health-checking"
    ACTIVE = "active"
    FAILED = "failed"
    ROLLED_BACK = "rolled-back"

    @classmethod
    def parse(cls, value: Any) -> DeployState:
        """The state named ``value``; ValidationError for anything else."""
        try:
            return cls(value)
        except ValueError:
            raise ValidationError(f"unknown deployment state {value!r}") from None


class OrderAction(enum.StrEnum):
    """What an order asks for one model."""

    DEPLOY = "deploy"
    REMOVE = "remove"  # unload the model (a rollback to a device that ran nothing before)


def check_device_id(device_id: Any) -> str:
    """Refuse a device id that cannot be a single MQTT topic level."""
    if not isinstance(device_id, str) or not _DEVICE_ID.match(device_id):
        raise ValidationError(f"invalid device id {device_id!r}: use letters, digits, '.', '_', ':' or '-'")
    return device_id


def check_model_name(name: Any) -> str:
    """Refuse a model name that cannot be a folder name on the device."""
    if not isinstance(name, str) or not _MODEL_NAME.match(name):
        raise ValidationError(f"invalid model name {name!r}: use letters, digits, '.', '_' or '-'")
    return name


def _optional_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise ValidationError(f"field {key!r} must be a string, not {type(value).__name__}")
    return value


@dataclass(frozen=True)
class ModelOrder:
    """The desired state of one named model: a bundle to run, or its removal."""

    name: str
    deployment_id: str
    bundle_url: str = ""
    bundle_sha256: str = ""
    version: int | str | None = None
    action: OrderAction = OrderAction.DEPLOY
    allow_downgrade: bool = False
    rollout_id: str | None = None

    @classmethod
    def from_body(cls, body: Any, name: str | None = None) -> ModelOrder:
        """Parse a schema-1 desired body (or one entry of schema 2's ``models``)."""
        if not isinstance(body, dict):
            raise ValidationError("a model order must be a JSON object")
        model = body["model"] if isinstance(body.get("model"), dict) else {}
        name = check_model_name(name if name is not None else model.get("name"))
        if model.get("name") not in (None, name):
            raise ValidationError(f"model order {name!r} names model {model.get('name')!r}")
        version = model.get("version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int | str)):
            raise ValidationError(f"model {name!r}: version must be a number or a string")
        action = OrderAction.REMOVE if body.get("action") == "remove" or not body.get("bundle_sha256") \
            else OrderAction.DEPLOY
        return cls(name=name, deployment_id=_optional_str(body, "deployment_id") or "",
                   bundle_url=_optional_str(body, "bundle_url") or "",
                   bundle_sha256=_optional_str(body, "bundle_sha256") or "", version=version, action=action,
                   allow_downgrade=body.get("allow_downgrade") is True,
                   rollout_id=_optional_str(body, "rollout_id"))

    def to_body(self) -> dict[str, Any]:
        """The JSON form (schema 1's desired fields)."""
        body: dict[str, Any] = {"deployment_id": self.deployment_id, "bundle_url": self.bundle_url,
                                "bundle_sha256": self.bundle_sha256,
                                "model": {"name": self.name, "version": self.version},
                                "allow_downgrade": self.allow_downgrade, "rollout_id": self.rollout_id}
        if self.action == OrderAction.REMOVE:
            body["action"] = "remove"
        return body


@dataclass(frozen=True)
class DesiredState:
    """A device's desired state: named model orders plus the order envelope (see edge_agent.orders)."""

    models: dict[str, ModelOrder]
    device_id: str | None = None
    seq: int | None = None
    expires: float | None = None
    schema: int = SCHEMA_VERSION

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> DesiredState:
        """Typed view of a parsed desired message of schema 1 (one model) or 2 (a set)."""
        if message.get("schema") == 1:
            orders = [ModelOrder.from_body(message)]
        else:
            models = message.get("models")
            if not isinstance(models, dict):
                raise ValidationError("desired message: 'models' must be an object of model name -> order")
            orders = [ModelOrder.from_body(body, name) for name, body in sorted(models.items())]
        seq, expires = message.get("seq"), message.get("expires")
        if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 0):
            raise ValidationError("desired message: 'seq' must be a whole number >= 0")
        if expires is not None and (isinstance(expires, bool) or not isinstance(expires, int | float)):
            raise ValidationError("desired message: 'expires' must be a time in seconds")
        device_id = message.get("device_id")
        return cls({o.name: o for o in orders}, None if device_id is None else check_device_id(device_id),
                   seq, None if expires is None else float(expires), int(message["schema"]))

    def to_body(self) -> dict[str, Any]:
        """The schema-2 body (without ``schema`` and ``signature``)."""
        return {"device_id": self.device_id, "seq": self.seq, "expires": self.expires,
                "models": {name: order.to_body() for name, order in sorted(self.models.items())}}


@dataclass(frozen=True)
class BundleRef:
    """A bundle installed for one model (a reported ``active`` or ``previous``)."""

    name: str | None
    version: int | str | None
    bundle_sha256: str | None
    bundle_url: str | None = None
    deployment_id: str | None = None

    @classmethod
    def from_body(cls, body: Any) -> BundleRef | None:
        """Parse a reported ``active``/``previous`` (schema 1 and 2 shapes); None when absent."""
        if not isinstance(body, dict) or not body.get("bundle_sha256"):
            return None
        model = body["model"] if isinstance(body.get("model"), dict) else {}
        return cls(model.get("name") or body.get("name"), model.get("version", body.get("version")),
                   body.get("bundle_sha256"), body.get("bundle_url"), body.get("deployment_id"))

    def to_body(self) -> dict[str, Any]:
        """The JSON form."""
        return {"model": {"name": self.name, "version": self.version}, "name": self.name, "version": self.version,
                "bundle_sha256": self.bundle_sha256, "bundle_url": self.bundle_url,
                "deployment_id": self.deployment_id}


@dataclass(frozen=True)
class ModelReport:
    """What one model on a device is doing."""

    name: str
    state: DeployState
    deployment_id: str | None = None
    rollout_id: str | None = None
    active: BundleRef | None = None
    previous: BundleRef | None = None
    error: str | None = None
    ts: float | None = None
    params: dict[str, Any] | None = None  # run-time parameters set by a ``config`` request

    @classmethod
    def from_body(cls, name: str, body: dict[str, Any]) -> ModelReport:
        """Parse one entry of ``models`` (or the top level of a schema-1 report)."""
        params = body.get("params")
        return cls(name, DeployState.parse(body.get("state", "idle")), body.get("deployment_id"),
                   body.get("rollout_id"), BundleRef.from_body(body.get("active")),
                   BundleRef.from_body(body.get("previous")), body.get("error"), body.get("ts"),
                   params if isinstance(params, dict) else None)

    def to_body(self) -> dict[str, Any]:
        """The JSON form (``params`` only once some were set)."""
        body = {"state": self.state.value, "deployment_id": self.deployment_id, "rollout_id": self.rollout_id,
                "active": self.active.to_body() if self.active else None,
                "previous": self.previous.to_body() if self.previous else None, "error": self.error,
                "ts": self.ts}
        return body if self.params is None else {**body, "params": self.params}


@dataclass(frozen=True)
class DeviceReport:
    """A device's reported state: every model, plus who the device is (``info``: profile, groups, ports...)."""

    device_id: str
    models: dict[str, ModelReport]
    ts: float
    info: dict[str, Any] = field(default_factory=dict)
    refused: str | None = None  # the last order this device refused, as one line
    primary: str | None = None  # the model ordered last: schema 1's top-level fields describe it

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> DeviceReport:
        """Typed view of a parsed reported message (schema 1: the top level is the one model)."""
        models: dict[str, ModelReport] = {}
        if isinstance(message.get("models"), dict):
            for name, body in message["models"].items():
                if isinstance(body, dict):
                    models[name] = ModelReport.from_body(name, body)
        else:
            single = ModelReport.from_body("", message)
            name = (single.active or single.previous or BundleRef(None, None, None)).name
            if name:
                models[name] = ModelReport.from_body(name, message)
        info = {k: v for k, v in message.items() if k not in ("schema", "models", "refused", "primary")}
        return cls(str(message.get("device_id")), models, float(message.get("ts") or 0.0), info,
                   message.get("refused"), message.get("primary") or next(iter(models), None))

    def to_body(self) -> dict[str, Any]:
        """The JSON form: ``models`` plus schema 1's fields for the primary model."""
        primary = self.models.get(self.primary or "")
        legacy = primary.to_body() if primary else {"state": DeployState.IDLE.value, "deployment_id": None,
                                                    "rollout_id": None, "active": None, "previous": None,
                                                    "error": None}
        legacy.pop("ts", None)
        legacy.pop("params", None)
        return {**self.info, **legacy, "device_id": self.device_id, "ts": self.ts, "primary": self.primary,
                "refused": self.refused, "models": {n: m.to_body() for n, m in sorted(self.models.items())}}


def check_request_id(value: Any) -> str:
    """Refuse a request id that is not a short token (it is echoed in the response and the log)."""
    if not isinstance(value, str) or not _REQUEST_ID.match(value):
        raise ValidationError(f"invalid request id {brief(str(value), 80)!r}: use up to 64 letters, digits, "
                              "'.', '_', ':' or '-'")
    return value


@dataclass(frozen=True)
class OperationRequest:
    """An operation the controller asks of one device: ``logs``, ``config``, ``get-config`` or ``restart``.

    ``model`` names the model for every operation but ``logs``; ``args`` holds the operation's
    arguments (``{"tail": N}`` for logs, ``{"params": {...}}`` for config).
    """

    request_id: str
    op: str
    device_id: str
    expires: float | None = None
    model: str | None = None
    args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> OperationRequest:
        """Typed view of a parsed request message; ValidationError names the bad field."""
        op = message.get("op")
        if op not in OPERATIONS:
            raise ValidationError(f"unknown operation {brief(str(op), 80)!r}: use {', '.join(OPERATIONS)}")
        model = message.get("model")
        if model is not None:
            model = check_model_name(model)
        elif op != "logs":
            raise ValidationError(f"operation {op!r} needs a 'model'")
        args = message.get("args", {})
        if not isinstance(args, dict):
            raise ValidationError("request: 'args' must be an object")
        expires = message.get("expires")
        if expires is not None and (isinstance(expires, bool) or not isinstance(expires, int | float)):
            raise ValidationError("request: 'expires' must be a time in seconds")
        return cls(check_request_id(message.get("request_id")), op, check_device_id(message.get("device_id")),
                   None if expires is None else float(expires), model, args)

    def to_body(self) -> dict[str, Any]:
        """The JSON form (without ``schema`` and ``signature``)."""
        body = {"request_id": self.request_id, "op": self.op, "device_id": self.device_id,
                "expires": self.expires, "args": self.args}
        return body if self.model is None else {**body, "model": self.model}


@dataclass(frozen=True)
class OperationResponse:
    """A device's answer to one request: ``result`` when ``ok``, else a one-line ``error`` and its type."""

    request_id: str
    device_id: str
    ok: bool
    result: Any = None
    error: str | None = None
    error_type: str | None = None
    ts: float = 0.0

    @classmethod
    def failure(cls, request_id: str, device_id: str, exc: BaseException) -> OperationResponse:
        """The answer to a request that failed with ``exc`` (its one line and its type)."""
        return cls(request_id, device_id, False, error=brief(exc), error_type=error_type_of(exc), ts=time.time())

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> OperationResponse:
        """Typed view of a parsed response message."""
        error = message.get("error")
        return cls(str(message["request_id"]), str(message["device_id"]), message["ok"] is True,
                   message.get("result"), None if error is None else brief(error),
                   _optional_str(message, "error_type"), float(message.get("ts") or 0.0))

    def to_body(self) -> dict[str, Any]:
        """The JSON form (``result`` when ok, ``error`` and ``error_type`` otherwise)."""
        body: dict[str, Any] = {"request_id": self.request_id, "device_id": self.device_id, "ok": self.ok,
                                "ts": self.ts}
        if self.ok:
            return {**body, "result": self.result}
        return {**body, "error": self.error, "error_type": self.error_type}

    def raise_for_error(self) -> Any:
        """The result; a refused request raises the kind of error the device raised, with its line."""
        if self.ok:
            return self.result
        kind = next((k for name, k in RESPONSE_ERRORS if name == self.error_type), EdgeDeployError)
        raise kind(f"{self.device_id}: {self.error or 'the request failed'}")


def error_type_of(exc: BaseException) -> str:
    """The ``error_type`` a response gives for ``exc`` (see :data:`RESPONSE_ERRORS`)."""
    return next((name for name, kind in RESPONSE_ERRORS if isinstance(exc, kind)), "failed")


def topic(device_id: str, kind: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The topic of message ``kind`` for ``device_id``; ``device_id='+'`` gives a subscription filter."""
    if kind not in MESSAGE_KINDS:
        raise ValidationError(f"unknown message kind {kind!r}")
    if device_id != "+":
        check_device_id(device_id)
    return f"{prefix}/devices/{device_id}/{kind}"


def parse_topic(name: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, str]:
    """(device_id, kind) of a topic; ValidationError when it is not one of ours."""
    parts = name.split("/")
    if len(parts) != len(prefix.split("/")) + 3 or "/".join(parts[:-3]) != prefix or parts[-3] != "devices":
        raise ValidationError(f"not an edgedeploy device topic: {name!r}")
    device_id, kind = parts[-2], parts[-1]
    if kind not in MESSAGE_KINDS:
        raise ValidationError(f"unknown message kind in topic {name!r}")
    return check_device_id(device_id), kind


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))  # built once (json.dumps builds one a call)


def encode_message(kind: str, body: dict[str, Any]) -> bytes:
    """JSON bytes of a message of ``kind`` (schema 2 unless ``body`` names one); checks required fields."""
    message = {"schema": SCHEMA_VERSION, **body}
    _check_fields(kind, message)
    data = _ENCODER.encode(message).encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValidationError(f"{kind} message is {len(data)} bytes, over the {MAX_MESSAGE_BYTES} limit")
    return data


def parse_message(kind: str, payload: bytes) -> dict[str, Any]:
    """Decode and check a message; ValidationError says why it is refused."""
    # bounded first: 100,000 nested brackets would raise RecursionError inside the parser
    message = loads_bounded(payload, max_bytes=MAX_MESSAGE_BYTES, what=f"{kind} message")
    if not isinstance(message, dict):
        raise ValidationError(f"{kind} message is not a JSON object")
    _check_fields(kind, message)
    return message


def _check_fields(kind: str, message: dict[str, Any]) -> None:
    if kind not in _REQUIRED:
        raise ValidationError(f"unknown message kind {kind!r}")
    schema = message.get("schema")
    if isinstance(schema, bool) or schema not in ACCEPTED_SCHEMAS:
        accepted = " or ".join(str(v) for v in ACCEPTED_SCHEMAS)
        raise ValidationError(f"{kind} message has schema {schema!r}, expected {accepted}")
    required = _REQUIRED[kind].get(schema)
    if required is None:
        raise ValidationError(f"{kind} message has schema {schema!r}, expected {SCHEMA_VERSION}")
    missing = [name for name in required if name not in message]
    if missing:
        raise ValidationError(f"{kind} message lacks field(s): {', '.join(missing)}")
    if kind == "desired":
        _check_model_objects(message, schema)


def _check_model_objects(message: dict[str, Any], schema: int) -> None:
    """Each order's ``model`` is an object (schema 1: the message itself; schema 2: each entry)."""
    models = message.get("models")
    orders = [message] if schema == 1 else list(models.values()) if isinstance(models, dict) else []
    for order in orders:
        if isinstance(order, dict) and "model" in order and not isinstance(order["model"], dict):
            raise ValidationError(f"desired message: 'model' must be an object with 'name' and 'version', "
                                  f"got {type(order['model']).__name__}")
