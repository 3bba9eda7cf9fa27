"""The fleet agent's configuration: ``agent.yaml`` loaded and checked against a JSON schema.

The keys are a contract (see CLI.md). Unknown keys are an error that names the key, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import yaml

from edge_agent.auth import read_token
from edge_agent.broker_tls import BrokerTLS
from edge_agent.delta import DEFAULT_PATCH_MEMORY_BYTES
from edge_agent.errors import EdgeDeployError, NotFoundError, ValidationError
from edge_agent.fleet_messages import DEFAULT_PREFIX, check_device_id
from edge_agent.serving_config import DEFAULT_MAX_INFLIGHT_BYTES, DEFAULT_MAX_REQUEST_BYTES, ServingConfig
from edge_agent.timezones import check_timezone

__all__ = ["AGENT_CONFIG_SCHEMA", "MQTT_VERSION_NAMES", "AgentConfig", "load_agent_config", "parse_agent_config"]

log = logging.getLogger(__name__)

MQTT_VERSION_NAMES = ("auto", "5", "3.1.1")
_PORT = {"type": "integer", "minimum": 0, "maximum": 65535}
_STR_LIST = {"type": "array", "items": {"type": "string", "minLength": 1}}

AGENT_CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["device_id", "broker", "data_dir"],
    "properties": {
        "device_id": {"type": "string", "minLength": 1},
        "profile": {"type": "string"},
        "groups": _STR_LIST,
        "tags": {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}},
        "broker": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9+.-]*://"},  # a fleet transport's scheme
        "username": {"type": ["string", "null"]},
        "password": {"type": ["string", "null"]},
        "ca_file": {"type": ["string", "null"]},
        "tls_cert": {"type": ["string", "null"]},
        "tls_key": {"type": ["string", "null"]},
        "bundle_token_file": {"type": ["string", "null"]},
        "data_dir": {"type": "string", "minLength": 1},
        "trusted_keys": _STR_LIST,
        "controller_keys": _STR_LIST,
        "http_port": _PORT,
        "grpc_port": _PORT,
        "host": {"type": "string", "minLength": 1},
        "telemetry_period_s": {"type": "number", "exclusiveMinimum": 0},
        "telemetry_queue_max": {"type": "integer", "minimum": 1},
        "topic_prefix": {"type": "string", "minLength": 1},
        "max_download_bytes": {"type": "integer", "minimum": 1},
        "keys_file": {"type": ["string", "null"]},
        "auth_enabled": {"type": "boolean"},
        "max_request_bytes": {"type": "integer", "minimum": 1},
        "max_inflight_bytes": {"type": "integer", "minimum": 1},
        "keepalive_s": {"type": "integer", "minimum": 5},
        "reconnect_min_s": {"type": "number", "exclusiveMinimum": 0},
        "reconnect_max_s": {"type": "number", "exclusiveMinimum": 0},
        "log_level": {"type": "string", "pattern": "^(?i:debug|info|warning|error)$"},
        "simulate_accelerators": {"type": "boolean"},
        "mqtt_version": {"enum": list(MQTT_VERSION_NAMES) + [5]},  # YAML reads a bare 5 as a number
        "download_deadline_s": {"type": "number", "exclusiveMinimum": 0},
        "download_min_bytes_per_s": {"type": "number", "minimum": 0},
        "timezone": {"type": "string", "minLength": 1},
        "delta_updates": {"type": "boolean"},
        "delta_patch_memory_bytes": {"type": "integer", "minimum": 0},
        "tuf_root": {"type": ["string", "null"], "minLength": 1},
        "tuf_metadata_url": {"type": ["string", "null"], "pattern": "^https?://"},
    },
}


@dataclass
class AgentConfig:
    """One device's agent settings (paths resolved against the config file's folder)."""

    device_id: str
    broker: str
    data_dir: Path
    profile: str = "cpu-x86_64"
    groups: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    # the device's own identity on an mqtts:// broker (edgedeploy fleet enroll), and the bundle server's token
    tls_cert: Path | None = None
    tls_key: Path | None = None
    bundle_token_file: Path | None = None
    trusted_keys: list[Path] = field(default_factory=list)
    # order-signing keys besides the ``orders`` blocks of trusted_keys files (edge_agent.orders)
    controller_keys: list[Path] = field(default_factory=list)
    http_port: int = 8001
    grpc_port: int = 8002
    host: str = "127.0.0.1"
    telemetry_period_s: float = 30.0
    telemetry_queue_max: int = 1000
    topic_prefix: str = DEFAULT_PREFIX
    max_download_bytes: int = 2 * 1024 * 1024 * 1024
    keys_file: Path | None = None
    auth_enabled: bool = False
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES
    keepalive_s: int = 30
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0
    log_level: str = "INFO"
    # serve FPGA bundles through the board's simulator when the board is absent (test benches, CI)
    simulate_accelerators: bool = False
    # auto: MQTT 5, falling back to 3.1.1 on a broker that refuses or drops an MQTT 5 CONNECT
    mqtt_version: str = "auto"
    # a download that takes longer, or runs slower over any 30 s, is abandoned (resumed next time)
    download_deadline_s: float = 3600.0
    download_min_bytes_per_s: float = 1024.0
    # IANA name of the device's local time (maintenance windows); None: the system's zone
    timezone: str | None = None
    # ask for a delta against the active bundle first (edge_agent.fetch); a patch may hold this much
    # memory, or half of what is available when that is less
    delta_updates: bool = True
    delta_patch_memory_bytes: int = DEFAULT_PATCH_MEMORY_BYTES
    # the TUF root a device starts trusting (edgedeploy repo export-root): with it, a bundle is fetched only
    # as a target of the repository's signed metadata (edge_agent.tuf_fetch)
    tuf_root: Path | None = None
    tuf_metadata_url: str | None = None  # default: metadata/ beside the bundle URL's folder

    @property
    def broker_host(self) -> str:
        """Host name of the broker URL."""
        return urlsplit(self.broker).hostname or "127.0.0.1"

    @property
    def broker_port(self) -> int:
        """Port of the broker URL (1883, or 8883 for mqtts)."""
        return urlsplit(self.broker).port or (8883 if self.broker_tls else 1883)

    @property
    def broker_tls(self) -> bool:
        """True for ``mqtts://``."""
        return self.broker.startswith("mqtts://")

    @property
    def broker_identity(self) -> BrokerTLS:
        """The files of the broker connection: ``ca_file``, ``tls_cert``, ``tls_key``."""
        return BrokerTLS(self.ca_file, self.tls_cert, self.tls_key)

    @property
    def serving(self) -> ServingConfig:
        """The servers' settings. A view, not a base class: ``tls_cert``/``tls_key`` in agent.yaml are
        the device's MQTT identity, not the servers' certificate."""
        return ServingConfig(host=self.host, http_port=self.http_port, grpc_port=self.grpc_port,
                             keys_file=self.keys_file, auth_enabled=self.auth_enabled,
                             max_request_bytes=self.max_request_bytes, max_inflight_bytes=self.max_inflight_bytes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view (the password is masked)."""
        doc = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        doc["trusted_keys"] = [str(p) for p in self.trusted_keys]
        doc["controller_keys"] = [str(p) for p in self.controller_keys]
        if doc.get("password"):
            doc["password"] = "***"
        return doc


def _schema_error(error: jsonschema.ValidationError, source: str) -> ValidationError:
    if error.validator == "additionalProperties":
        known = set(AGENT_CONFIG_SCHEMA["properties"])
        unknown = sorted(set(error.instance) - known) if isinstance(error.instance, dict) else []
        if unknown and not error.path:
            return ValidationError(f"{source}: unknown key {unknown[0]!r} "
                                   f"(known keys: {', '.join(sorted(known))})")
    where = ".".join(str(p) for p in error.path) or "(top level)"
    return ValidationError(f"{source}: {where}: {error.message}")


def _check_transport(broker: str, source: str) -> None:
    from edge_agent.transport import transport_names

    scheme = broker.split("://", 1)[0]
    names = transport_names()
    if scheme not in names:
        raise ValidationError(f"{source}: broker: no fleet transport for {scheme}:// URLs "
                              f"(installed: {', '.join(names) or 'none'})")


def parse_agent_config(document: Any, base: Path | None = None, source: str = "agent config") -> AgentConfig:
    """Validate a loaded YAML document and build the config; ValidationError says what is wrong."""
    if not isinstance(document, dict):
        raise ValidationError(f"{source}: expected a mapping of keys, got {type(document).__name__}")
    errors = sorted(jsonschema.Draft202012Validator(AGENT_CONFIG_SCHEMA).iter_errors(document),
                    key=lambda e: (len(e.path), e.validator != "additionalProperties"))
    if errors:
        raise _schema_error(errors[0], source)
    check_device_id(document["device_id"])
    _check_transport(document["broker"], source)
    if "timezone" in document:
        try:
            check_timezone(document["timezone"])
        except ValidationError as exc:
            raise ValidationError(f"{source}: timezone: {exc}") from None
    base = base or Path.cwd()

    def path(value: str | None) -> Path | None:
        return None if value is None else (base / Path(value).expanduser())

    values = dict(document)
    values["data_dir"] = path(values["data_dir"])
    values["trusted_keys"] = [path(p) for p in values.get("trusted_keys", [])]
    values["controller_keys"] = [path(p) for p in values.get("controller_keys", [])]
    for key in ("ca_file", "keys_file", "tls_cert", "tls_key", "bundle_token_file", "tuf_root"):
        if values.get(key) is not None:
            values[key] = path(values[key])
    values["tags"] = {str(k): str(v) for k, v in (values.get("tags") or {}).items()}
    values["mqtt_version"] = str(values.get("mqtt_version", "auto"))
    values["log_level"] = str(values.get("log_level", "INFO")).upper()  # `debug` as well as `DEBUG`
    config = AgentConfig(**values)
    if config.reconnect_max_s < config.reconnect_min_s:
        raise ValidationError(f"{source}: reconnect_max_s must be >= reconnect_min_s")
    _check_credentials(config, source)
    return config


def _check_credentials(config: AgentConfig, source: str) -> None:
    """Read the certificate, key and token files now, so ``--check`` names what is wrong with them."""
    if urlsplit(config.broker).password is not None:
        raise ValidationError(f"{source}: broker: give the password as the password key, not in the URL "
                              "(a URL shows in log lines)")
    if (config.tls_cert or config.tls_key) and not config.broker_tls:
        raise ValidationError(f"{source}: tls_cert and tls_key need an mqtts:// broker")
    try:
        if config.broker_tls:
            config.broker_identity.check()
        if config.bundle_token_file is not None:
            read_token(config.bundle_token_file)
    except EdgeDeployError as exc:
        raise ValidationError(f"{source}: {exc}") from None


def load_agent_config(path: Path | str) -> AgentConfig:
    """Read and validate ``agent.yaml``; NotFoundError / ValidationError on a bad file."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"agent config {path} does not exist")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValidationError(f"{path}: not valid YAML: {exc}") from None
    return parse_agent_config(document, base=path.resolve().parent, source=str(path))
