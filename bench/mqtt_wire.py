"""A minimal MQTT 3.1.1 client for load generation: one connection, driven by its owner's thread.

paho-mqtt spends about 70 us of Python per QoS 1 message on this machine (building the packet,
one send per packet, a Properties and a ReasonCode object per PUBACK): 100,000 simulated devices
that report ten messages each would make the simulator, not the controller, the thing measured.
This client writes packets into one buffer that goes out in large sends and parses PUBACKs in
bulk, about ten times cheaper. It implements only what a simulated device needs: CONNECT (clean
session, keepalive, optional last will), SUBSCRIBE at QoS 0/1, PUBLISH at QoS 0/1 both ways
(incoming QoS 1 is acknowledged), PUBACK, PINGREQ and DISCONNECT. It owns no thread: the owner
calls :meth:`WireClient.flush` and :meth:`WireClient.read` (a ``selectors`` loop over
:meth:`WireClient.fileno`), so every socket and buffer is touched by one thread only.
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass
from typing import NoReturn

from edge_agent.errors import EdgeDeployError

__all__ = ["MAX_PACKET_IDS", "Will", "WireClient", "WireError"]

MAX_PACKET_IDS = 65535
_CONNECT, _CONNACK, _PUBLISH, _PUBACK, _SUBSCRIBE, _SUBACK = 1, 2, 3, 4, 8, 9
_PINGREQ, _PINGRESP, _DISCONNECT = 12, 13, 14
_READ_CHUNK = 1 << 20
_CONNACK_CODES = {1: "unacceptable protocol version", 2: "client id rejected", 3: "server unavailable",
                  4: "bad user name or password", 5: "not authorized"}


class WireError(EdgeDeployError):
    """The connection failed or the broker sent something this client cannot take."""


@dataclass(frozen=True)
class Will:
    """The message the broker publishes when the connection drops without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def _length(value: int) -> bytes:
    """MQTT's variable-length integer (remaining length)."""
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return len(data).to_bytes(2, "big") + data


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + _length(len(body)) + body


class WireClient:
    """One MQTT 3.1.1 connection; ``unacked`` counts QoS 1 publishes the broker has not acknowledged."""

    def __init__(self, host: str, port: int, client_id: str, keepalive: int = 60, will: Will | None = None) -> None:
        self.host, self.port, self.client_id, self.keepalive, self.will = host, port, client_id, keepalive, will
        self.connected = False
        self._sock: socket.socket | None = None
        self._out = bytearray()
        self._in = bytearray()
        self._pending: set[int] = set()
        self._next_id = 0
        self._last_sent = 0.0

    @property
    def unacked(self) -> int:
        """QoS 1 messages sent and not acknowledged yet."""
        return len(self._pending)

    @property
    def wants_write(self) -> bool:
        """True while buffered bytes wait to be sent."""
        return bool(self._out)

    def fileno(self) -> int:
        """The socket's descriptor (for selectors); -1 when not connected."""
        return self._sock.fileno() if self._sock is not None else -1

    # --- connection ----------------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> None:
        """Open the connection and wait for the CONNACK; WireError says why it failed."""
        self.close(send_disconnect=False)
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except OSError as exc:
            raise WireError(f"cannot reach the MQTT broker at {self.host}:{self.port} ({exc}); is it running?") \
                from None
        flags = 0x02  # clean session
        payload = _string(self.client_id)
        if self.will is not None:
            flags |= 0x04 | self.will.qos << 3 | (0x20 if self.will.retain else 0)
            payload += _string(self.will.topic) + _string(self.will.payload)
        body = _string("MQTT") + bytes([4, flags]) + self.keepalive.to_bytes(2, "big") + payload
        try:
            sock.sendall(_packet(_CONNECT, 0, body))
            answer = self._read_exact(sock, 4, timeout)
        except OSError as exc:
            sock.close()
            raise WireError(f"the MQTT broker at {self.host}:{self.port} dropped the connection ({exc})") from None
        if answer[0] >> 4 != _CONNACK or answer[3] != 0:
            sock.close()
            reason = _CONNACK_CODES.get(answer[3], f"code {answer[3]}") if answer[0] >> 4 == _CONNACK else "no CONNACK"
            raise WireError(f"the MQTT broker at {self.host}:{self.port} refused the connection: {reason}")
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self.connected = sock, True
        self._out.clear()
        self._in.clear()
        self._pending.clear()
        self._last_sent = time.monotonic()

    @staticmethod
    def _read_exact(sock: socket.socket, size: int, timeout: float) -> bytes:
        sock.settimeout(timeout)
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("closed by the broker")
            data += chunk
        return data

    def close(self, send_disconnect: bool = True) -> None:
        """Send DISCONNECT (so no last will fires) and close the socket."""
        if self._sock is None:
            return
        if send_disconnect and self.connected:
            self._out += _packet(_DISCONNECT, 0, b"")
            self._sock.settimeout(5.0)
            with contextlib.suppress(OSError):  # closing anyway: the broker fires the will, which says the same
                self._sock.sendall(self._out)
        self._sock.close()
        self._sock, self.connected = None, False

    def _lost(self, why: str) -> NoReturn:
        if self._sock is not None:
            self._sock.close()
        self._sock, self.connected = None, False
        self._out.clear()
        self._pending.clear()  # nothing can be acknowledged on a closed connection
        raise WireError(f"lost the connection to {self.host}:{self.port}: {why}")

    # --- sending -------------------------------------------------------------------------------
    def _packet_id(self) -> int:
        if len(self._pending) >= MAX_PACKET_IDS - 1:
            raise WireError("every MQTT packet id is in use: wait for acknowledgements before publishing more")
        while True:
            self._next_id = self._next_id % MAX_PACKET_IDS + 1
            if self._next_id not in self._pending:
                return self._next_id

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        """Queue one PUBLISH (it goes out on the next :meth:`flush`); dropped while not connected."""
        if not self.connected:
            return
        head = _string(topic)
        if qos:
            packet_id = self._packet_id()
            self._pending.add(packet_id)
            head += packet_id.to_bytes(2, "big")
        self._out += _packet(_PUBLISH, qos << 1 | int(retain), head + payload)

    def subscribe(self, topics: list[tuple[str, int]]) -> None:
        """Queue one SUBSCRIBE for ``topics`` (filter, max QoS); the SUBACK is read and dropped."""
        body = self._packet_id().to_bytes(2, "big") + b"".join(_string(t) + bytes([q]) for t, q in topics)
        self._out += _packet(_SUBSCRIBE, 0x02, body)

    def flush(self) -> None:
        """Send what the socket takes now (never blocks)."""
        if self._sock is None or not self._out:
            return
        try:
            sent = self._sock.send(self._out)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(str(exc))
        del self._out[:sent]
        self._last_sent = time.monotonic()

    def ping_if_due(self, now: float) -> None:
        """Send PINGREQ when nothing went out for half the keepalive."""
        if self.connected and now - self._last_sent > self.keepalive / 2:
            self._out += _packet(_PINGREQ, 0, b"")
            self.flush()

    # --- receiving -----------------------------------------------------------------------------
    def read(self) -> list[tuple[str, bytes]]:
        """Read what arrived; returns the (topic, payload) of each incoming PUBLISH."""
        if self._sock is None:
            return []
        while True:
            try:
                chunk = self._sock.recv(_READ_CHUNK)
            except BlockingIOError:
                break
            except OSError as exc:
                self._lost(str(exc))
            if not chunk:
                self._lost("closed by the broker")
            self._in += chunk
            if len(chunk) < _READ_CHUNK:
                break
        return self._parse()

    def _parse(self) -> list[tuple[str, bytes]]:
        messages: list[tuple[str, bytes]] = []
        data, pos = self._in, 0
        while (header := self._header(data, pos)) is not None and header[0] + header[1] <= len(data):
            start, length = header
            self._handle(data[pos] >> 4, data[pos] & 0x0F, bytes(data[start:start + length]), messages)
            pos = start + length
        del data[:pos]
        return messages

    def _header(self, data: bytearray, pos: int) -> tuple[int, int] | None:
        """(where the body starts, its length) of the packet at ``pos``; None until the header is all here."""
        length = 0
        for shift, index in enumerate(range(pos + 1, min(pos + 5, len(data)))):
            length |= (data[index] & 0x7F) << (7 * shift)
            if not data[index] & 0x80:
                return index + 1, length
        if len(data) - pos >= 5:
            self._lost("malformed remaining length")
        return None

    def _handle(self, kind: int, flags: int, body: bytes, messages: list[tuple[str, bytes]]) -> None:
        if kind == _PUBACK:
            self._pending.discard(int.from_bytes(body[:2], "big"))
        elif kind == _PUBLISH:
            size = int.from_bytes(body[:2], "big")
            name, rest = body[2:2 + size].decode(errors="replace"), body[2 + size:]
            if (flags >> 1) & 3:
                self._out += _packet(_PUBACK, 0, rest[:2])
                rest = rest[2:]
            messages.append((name, rest))
        elif kind == _SUBACK:
            if 0x80 in body[2:]:
                raise WireError(f"the broker at {self.host}:{self.port} refused a subscription")
        elif kind != _PINGRESP:
            self._lost(f"unexpected packet type {kind}")
