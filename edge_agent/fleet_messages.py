"""The MQTT topic contract between the fleet controller and edge agents.

Topics, under a prefix (default ``edgedeploy``)::

    {prefix}/devices/{device_id}/desired    retained, QoS 1, controller -> device: what to run
    {prefix}/devices/{device_id}/reported   retained, QoS 1, device -> controller: what it runs
    {prefix}/devices/{device_id}/status     retained, QoS 1, device: online; its last will: offline
    {prefix}/devices/{device_id}/telemetry  QoS 0, device -> controller, every telemetry period
    {prefix}/devices/{device_id}/events     QoS 1, device -> controller, one per state transition

Every message is a JSON object with ``"schema": 1``. A message that is not JSON, is larger than
:data:`MAX_MESSAGE_BYTES`, has another schema version or lacks a required field is refused by
:func:`parse_message` with a ValidationError; receivers log it and go on.
"""

from __future__ import annotations

import json
import re
from typing import Any

from edge_agent.errors import ValidationError
from edge_agent.jsonlimits import loads_bounded

__all__ = [
    "DEFAULT_PREFIX",
    "MAX_MESSAGE_BYTES",
    "MESSAGE_KINDS",
    "SCHEMA_VERSION",
    "encode_message",
    "parse_message",
    "parse_topic",
    "topic",
]

SCHEMA_VERSION = 1
DEFAULT_PREFIX = "edgedeploy"
MAX_MESSAGE_BYTES = 256 * 1024
MESSAGE_KINDS = ("desired", "reported", "status", "telemetry", "events")
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")

# Fields each kind must carry (besides "schema"); more fields are allowed.
_REQUIRED: dict[str, tuple[str, ...]] = {
    # {"deployment_id", "bundle_url", "bundle_sha256", "model": {"name", "version"},
    #  "allow_downgrade": false, "rollout_id": "r-..." | null}
    # optional "action": "remove" (bundle_url/bundle_sha256 ""): unload the model; a rollback sends
    # it to a device that ran nothing before the rollout.
    "desired": ("deployment_id", "bundle_url", "bundle_sha256", "model"),
    # {"device_id", "state", "deployment_id", "active": {...} | null, "previous": {...} | null,
    #  "error": str | null, "profile", "groups", "tags", "http_port", "grpc_port", "agent_version", "ts"}
    "reported": ("device_id", "state", "ts"),
    # {"online": bool, "ts"}
    "status": ("online",),
    # {"device_id", "ts", "uptime_s", "cpu_percent", "memory_rss_mb", "models": {name: {...}}}
    "telemetry": ("device_id", "ts"),
    # {"device_id", "deployment_id", "from", "to", "reason", "ts"}
    "events": ("device_id", "to", "ts"),
}


def check_device_id(device_id: str) -> str:
    """Refuse a device id that cannot be a single MQTT topic level."""
    if not _DEVICE_ID.match(device_id or ""):
        raise ValidationError(f"invalid device id {device_id!r}: use letters, digits, '.', '_', ':' or '-'")
    return device_id


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


def encode_message(kind: str, body: dict[str, Any]) -> bytes:
    """JSON bytes of a message of ``kind``, with the schema version added; checks required fields."""
    message = {"schema": SCHEMA_VERSION, **body}
    _check_fields(kind, message)
    data = json.dumps(message, sort_keys=True, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValidationError(f"{kind} message is {len(data)} bytes, over the {MAX_MESSAGE_BYTES} limit")
    return data


def parse_message(kind: str, payload: bytes) -> dict[str, Any]:
    """Decode and check a message; ValidationError says why it is refused."""
    # bounded first: 100,000 nested brackets would raise RecursionError inside the parser
    message = loads_bounded(payload, MAX_MESSAGE_BYTES, what=f"{kind} message")
    if not isinstance(message, dict):
        raise ValidationError(f"{kind} message is not a JSON object")
    if message.get("schema") != SCHEMA_VERSION:
        raise ValidationError(f"{kind} message has schema {message.get('schema')!r}, expected {SCHEMA_VERSION}")
    _check_fields(kind, message)
    return message


def _check_fields(kind: str, message: dict[str, Any]) -> None:
    if kind not in _REQUIRED:
        raise ValidationError(f"unknown message kind {kind!r}")
    missing = [name for name in _REQUIRED[kind] if name not in message]
    if missing:
        raise ValidationError(f"{kind} message lacks field(s): {', '.join(missing)}")
    if kind == "desired" and not isinstance(message["model"], dict):
        raise ValidationError(f"desired message: 'model' must be an object with 'name' and 'version', "
                              f"got {type(message['model']).__name__}")
