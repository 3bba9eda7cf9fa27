"""Zero-downtime hand-over of a listening port between two serving processes (Linux ``SO_REUSEPORT``).

A container update runs the new server on the same ports as the old one (``--reuse-port``), so
clients keep their address. Closing the old listener would reset the connections still waiting in
its accept queue, so before it closes, the old process attaches a one-instruction classic BPF
program to the port's reuse group that sends every new connection to the *other* socket, drains
what is already queued, and only then closes. The kernel keeps a group's sockets in join order and
moves the last into a freed slot, so with two members the older is index 0 and the newer index 1;
an index past the end falls back to the normal hash, so the program is harmless once alone.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import socket
import struct

__all__ = ["listening_socket", "release_steering", "steer_to_newer"]

log = logging.getLogger(__name__)

_SO_ATTACH_REUSEPORT_CBPF = 51
_SO_DETACH_REUSEPORT_BPF = 68
_BPF_RET_K = 0x06  # BPF_RET | BPF_K: "return the constant k"


def listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A bound, listening TCP socket (IPv4 or IPv6 by ``host``), sharing the port when asked."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def steer_to_newer(sock: socket.socket) -> bool:
    """Send the reuse group's new connections to its newer member; False where Linux refuses."""
    program = ctypes.create_string_buffer(struct.pack("HBBI", _BPF_RET_K, 0, 0, 1))
    fprog = struct.pack("HL", 1, ctypes.addressof(program))  # struct sock_fprog {len; filter*}
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError as exc:
        log.warning("cannot steer new connections before closing (%s); closing anyway", exc)
        return False
    return True


def release_steering(sock: socket.socket) -> None:
    """Detach any program a previous server left on the group (done once this one listens)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_DETACH_REUSEPORT_BPF, 0)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.EINVAL, errno.ENOPROTOOPT):
            log.warning("cannot detach the reuse-port program: %s", exc)
