"""Fleet transports: how desired and reported messages travel between the controller and devices.

A transport is two small classes, found by the broker URL's scheme through entry points, as every
plug-in is (:mod:`edge_agent.plugins`; MQTT is the one shipped; a new one is one module plus two
entry points in its package's metadata)::

    [project.entry-points."edgedeploy.fleet_transports"]             # the device side
    mqtt = "edge_agent.mqtt:AgentLink"
    [project.entry-points."edgedeploy.fleet_controller_transports"]  # the controller side
    mqtt = "packager.fleet:MQTTControllerLink"

Both carry the messages of :mod:`edge_agent.fleet_messages` as plain dicts; the agent checks
every order's signature itself (:mod:`edge_agent.orders`), so a transport need not be trusted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from edge_agent.errors import UsageError
from edge_agent.plugins import load_plugin, plugin_names

__all__ = [
    "CONTROLLER_GROUP",
    "DEVICE_GROUP",
    "ControllerTransport",
    "DeviceTransport",
    "controller_transport",
    "device_transport",
    "transport_names",
]

DEVICE_GROUP = "edgedeploy.fleet_transports"
CONTROLLER_GROUP = "edgedeploy.fleet_controller_transports"


@runtime_checkable
class DeviceTransport(Protocol):
    """The agent's link: built as ``Factory(config, on_desired, on_connected, on_request=...)``.

    ``on_desired(message)`` gets each well-formed desired message (from the transport's thread),
    ``on_request(message)`` each well-formed request addressed to this device's requests topic (the
    agent checks its signature, see :mod:`edge_agent.operations`); ``on_connected()`` runs after
    each (re)connect, so the agent can publish its reported state.
    """

    connected: threading.Event

    def start(self) -> None:
        """Connect in the background; keep reconnecting until :meth:`stop`."""

    def stop(self) -> None:
        """Say offline where the transport can, and disconnect."""

    def publish(self, kind: str, body: dict[str, Any], qos: int = 1, retain: bool = False) -> bool:
        """Send a message of ``kind`` for this device; False when it could not be handed on."""


@runtime_checkable
class ControllerTransport(Protocol):
    """The controller's link: built as ``Factory(broker_url, prefix, mqtt_version=...)``, connected
    when it returns; a transport that speaks TLS also takes ``tls=`` (an
    :class:`edge_agent.broker_tls.BrokerTLS`), passed only when the user gave TLS files.

    It keeps the latest ``reported``, ``status`` and ``desired`` message of every device (guarded
    by ``changed``, notified on each arrival) and when each device was last heard from; it hands
    each device's ``responses`` to the listeners added with :meth:`on_response`.
    """

    reported: dict[str, dict[str, Any]]
    status: dict[str, dict[str, Any]]
    desired: dict[str, dict[str, Any]]
    last_seen: dict[str, float]
    changed: threading.Condition

    def settle(self, quiet: float = 0.3, limit: float = 3.0) -> None:
        """Return once the stored (retained) messages have arrived."""

    def wait_change(self, timeout: float) -> None:
        """Block until any message arrives or ``timeout`` passes."""

    def publish_desired(self, device_id: str, message: dict[str, Any]) -> None:
        """Deliver a device's desired state so it gets it now or when it next connects."""

    def resync(self, device_ids: list[str], kind: str = "reported") -> None:
        """Have the stored (retained) ``kind`` messages of these devices delivered again."""

    def publish_desired_many(self, orders: list[tuple[str, dict[str, Any]]], timeout: float = 30.0) -> None:
        """Deliver many desired states at once (a wave); returns when the transport took every one."""

    def publish_request(self, device_id: str, message: dict[str, Any]) -> None:
        """Send a signed request to a device's requests topic (not retained; its expiry bounds a late delivery)."""

    def on_response(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener(response)`` (from the transport's thread) for every response that arrives."""

    def close(self) -> None:
        """Disconnect."""


def transport_names(group: str = DEVICE_GROUP) -> list[str]:
    """The URL schemes with an installed transport in ``group``."""
    return plugin_names(group)


def _load(group: str, url: str) -> Callable[..., Any]:
    scheme = url.split("://", 1)[0] if "://" in url else url
    factory: Callable[..., Any] = load_plugin(group, scheme, "fleet transport", UsageError)
    return factory


def device_transport(url: str) -> Callable[..., DeviceTransport]:
    """The device-side transport class for a broker URL (by its scheme)."""
    return _load(DEVICE_GROUP, url)


def controller_transport(url: str) -> Callable[..., ControllerTransport]:
    """The controller-side transport class for a broker URL (by its scheme)."""
    return _load(CONTROLLER_GROUP, url)
