"""The agent's MQTT adapter (paho-mqtt 2.x): session, last will, desired-state and request subscriptions.

``mqtt_version: auto`` (the default) speaks MQTT 5 and falls back to 3.1.1 when the broker refuses
the protocol version, closes the connection on an MQTT 5 CONNECT without a CONNACK (RabbitMQ's
MQTT plugin before 3.13), or leaves it unanswered on a live connection (amqtt); ``5`` and ``3.1.1``
pin one version. The session is persistent (clean_start False plus a session expiry in v5, clean_session False in
3.1.1) so QoS 1 desired states sent while the device was away are delivered. The last will marks
the device offline (retained); on every connect it publishes ``online: true`` (retained) and
re-subscribes. paho reconnects by itself with exponential backoff between the configured bounds.
Incoming messages that are malformed, oversized, nested too deep or of an unknown kind are logged
and dropped; any exception in a callback is contained there (logged), so paho's network thread
lives on and acknowledges the message instead of leaving it for the broker to redeliver forever.
A message that cannot be published (too large, not connected) is logged, never raised.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.broker_tls import tls_refusal
from edge_agent.errors import MAX_ERROR_CHARS, ValidationError, brief
from edge_agent.fleet_messages import encode_message, parse_message, parse_topic, topic

from .config import AgentConfig

__all__ = ["MQTT_VERSIONS", "SESSION_EXPIRY_S", "AgentLink", "shrink_strings"]

log = logging.getLogger(__name__)
SESSION_EXPIRY_S = 7 * 24 * 3600
_CONNACK_TIMEOUT_S = 5.0
_BAD_PROTOCOL = (1, 132)  # 3.1.1 "unacceptable protocol version", v5 "unsupported protocol version"
MQTT_VERSIONS = {"auto": paho.MQTTv5, "5": paho.MQTTv5, "3.1.1": paho.MQTTv311}


def shrink_strings(value: Any, limit: int = MAX_ERROR_CHARS) -> Any:
    """``value`` with every string in it cut to ``limit`` characters (see :func:`brief`).

    A message that would exceed the broker limit is still sent in this form, so the controller
    learns the state even when an order carried huge identifiers.
    """
    if isinstance(value, str):
        return brief(value, limit)
    if isinstance(value, dict):
        return {brief(k, limit): shrink_strings(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [shrink_strings(v, limit) for v in value]
    return value


class AgentLink:
    """One device's connection to the broker.

    ``on_desired(message)`` is called (from paho's thread) with each valid desired state,
    ``on_request(message)`` with each well-formed request on this device's requests topic;
    ``on_connected()`` after each successful (re)connect.
    """

    def __init__(self, config: AgentConfig, on_desired: Callable[[dict[str, Any]], None],
                 on_connected: Callable[[], None] | None = None,
                 on_request: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.config = config
        self.on_desired = on_desired
        self.on_connected = on_connected
        self.on_request = on_request
        self.protocol = MQTT_VERSIONS[config.mqtt_version]
        self._answered = False  # the broker sent a CONNACK at least once
        self._tls_refusal: str | None = None  # the last TLS refusal logged (each is logged once)
        self._tls_context = config.broker_identity.context() if config.broker_tls else None
        self.connected = threading.Event()
        self._lock = threading.Lock()
        self._client = self._make_client()

    # --- set-up --------------------------------------------------------------------------------
    def _topic(self, kind: str) -> str:
        return topic(self.config.device_id, kind, self.config.topic_prefix)

    @property
    def _inbound(self) -> tuple[str, ...]:
        """The kinds this device subscribes to."""
        return ("desired", "requests") if self.on_request is not None else ("desired",)

    def _make_client(self) -> paho.Client:
        v5 = self.protocol == paho.MQTTv5
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-agent-{self.config.device_id}",
                             protocol=self.protocol, clean_session=None if v5 else False)
        if self.config.username:
            client.username_pw_set(self.config.username, self.config.password)
        if self._tls_context is not None:
            client.tls_set_context(self._tls_context)
            client.on_connect_fail = self._on_connect_fail
        client.will_set(self._topic("status"), self._status(False), qos=1, retain=True)
        client.reconnect_delay_set(min_delay=max(1, int(self.config.reconnect_min_s)),
                                   max_delay=max(1, int(self.config.reconnect_max_s)))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.suppress_exceptions = True  # belt and braces: our callbacks contain and log their own errors
        return client

    def _status(self, online: bool) -> bytes:
        return encode_message("status", {"online": online, "device_id": self.config.device_id, "ts": time.time()})

    def start(self) -> None:
        """Connect in the background (retries with backoff until the broker answers)."""
        properties = None
        kwargs: dict[str, Any] = {}
        if self.protocol == paho.MQTTv5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = SESSION_EXPIRY_S
            kwargs = {"clean_start": False, "properties": properties}
        self._client.connect_async(self.config.broker_host, self.config.broker_port,
                                   keepalive=self.config.keepalive_s, **kwargs)
        self._client.loop_start()
        if self.protocol == paho.MQTTv5:
            watchdog = threading.Timer(_CONNACK_TIMEOUT_S, self._check_connack, args=(self._client,))
            watchdog.daemon = True
            watchdog.start()

    def _may_fall_back(self, client: paho.Client) -> bool:
        """True while ``client`` is our MQTT 5 attempt in ``auto`` mode and no CONNACK came yet."""
        with self._lock:
            current = client is self._client
        return (current and self.config.mqtt_version == "auto" and self.protocol == paho.MQTTv5
                and not self._answered)

    def _check_connack(self, client: paho.Client) -> None:
        """Some 3.1.1-only brokers (amqtt) never answer an MQTT 5 CONNECT: fall back on silence too.

        Only when the TCP connection stands (``client.socket()``): a broker that is down says
        nothing about the protocol, and plain reconnects handle it.
        """
        if self._may_fall_back(client) and client.socket() is not None:
            self._fallback()

    def stop(self) -> None:
        """Publish ``online: false`` (a clean stop does not fire the will) and disconnect."""
        with self._lock:
            client = self._client
        if self.connected.is_set():
            info = client.publish(self._topic("status"), self._status(False), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=3)
            except (RuntimeError, ValueError):
                log.debug("offline status not confirmed before disconnect")
        client.disconnect()
        client.loop_stop()

    def _fallback(self) -> None:
        """The broker refused MQTT 5: start again with 3.1.1."""
        with self._lock:
            old = self._client
            self.protocol = paho.MQTTv311
            self._client = self._make_client()
        old.disconnect()
        old.loop_stop()
        log.warning("broker %s does not speak MQTT 5; using 3.1.1", self.config.broker)
        self.start()

    # --- callbacks (paho's thread) ---------------------------------------------------------------
    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        self._answered = True
        self._tls_refusal = None
        if reason_code.is_failure:
            if self._may_fall_back(client) and reason_code.value in _BAD_PROTOCOL:
                threading.Thread(target=self._fallback, daemon=True).start()
            else:
                log.warning("broker %s refused the connection: %s", self.config.broker, reason_code)
            return
        log.info("connected to %s (MQTT %s)", self.config.broker, "5" if self.protocol == paho.MQTTv5 else "3.1.1")
        client.subscribe([(self._topic(kind), 1) for kind in self._inbound])
        client.publish(self._topic("status"), self._status(True), qos=1, retain=True)
        self.connected.set()
        if self.on_connected is not None:
            try:
                self.on_connected()
            except Exception:  # a callback bug must not kill paho's thread
                log.exception("on_connected failed")

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        if not was_connected and self._explain_tls():
            return  # refused for its certificate, not for the MQTT version: falling back would not help
        if self._may_fall_back(client):
            # The TCP connection stood (a broker that is down reports a connect failure instead) and
            # was closed before any CONNACK: what RabbitMQ's MQTT plugin does with an MQTT 5 CONNECT.
            threading.Thread(target=self._fallback, daemon=True).start()
            return
        log.info("disconnected from %s (%s); reconnecting with backoff", self.config.broker, reason_code)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self._explain_tls()  # paho retries in silence: say once why, when TLS is the reason

    def _explain_tls(self) -> bool:
        """After a failed mqtts connection, log why TLS failed (once per reason); True when it did."""
        if self._tls_context is None:
            return False
        reason = tls_refusal(self.config.broker_host, self.config.broker_port, self._tls_context)
        if reason is not None and reason != self._tls_refusal:
            log.warning("cannot connect to %s: %s", self.config.broker, reason)
        self._tls_refusal = reason
        return reason is not None

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            self._take_message(message)
        except Exception:  # whatever a message does, the loop lives on and acknowledges it
            log.exception("a message on %s could not be handled; dropped", brief(message.topic, 200))

    def _take_message(self, message: paho.MQTTMessage) -> None:
        try:
            device_id, kind = parse_topic(message.topic, self.config.topic_prefix)
            if device_id != self.config.device_id or kind not in self._inbound:
                raise ValidationError(f"unexpected message on {message.topic!r}")
            if not message.payload:
                log.info("%s of %s was cleared", kind, device_id)
                return
            body = parse_message(kind, bytes(message.payload))
        except ValidationError as exc:
            log.warning("ignored a message on %s: %s", brief(message.topic, 200), exc)
            return
        handler = self.on_request if kind == "requests" else self.on_desired
        try:
            if handler is not None:
                handler(body)
        except Exception:  # never let a handler bug stop the agent
            log.exception("handling the %s message failed", kind)

    # --- publishing ----------------------------------------------------------------------------
    def publish(self, kind: str, body: dict[str, Any], qos: int = 1, retain: bool = False) -> bool:
        """Encode and publish; False (logged, never raised) when it was not handed to the broker link.

        A body over the message limit is sent with its strings cut short rather than not at all.
        """
        try:
            try:
                payload = encode_message(kind, body)
            except ValidationError as exc:
                log.warning("%s message shortened: %s", kind, exc)
                payload = encode_message(kind, shrink_strings(body))
            with self._lock:
                client = self._client
            info = client.publish(self._topic(kind), payload, qos=qos, retain=retain)
        except Exception as exc:  # noqa: BLE001 - a report that cannot go out must not stop its sender
            log.error("could not publish a %s message: %s", kind, brief(exc, 500))
            return False
        return info.rc == paho.MQTT_ERR_SUCCESS
