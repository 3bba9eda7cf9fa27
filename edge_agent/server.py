"""One process serving a data plane over gRPC (Open Inference Protocol) and REST, on one event loop."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edge_agent.auth import AuthKeys
from edge_agent.dataplane import DataPlane, InflightBytes
from edge_agent.grpc.servicer import AuthInterceptor, InferenceServicer, add_to_server
from edge_agent.handover import listening_socket, release_steering, steer_to_newer
from edge_agent.rest import build_app
from edge_agent.serving_config import DEFAULT_MAX_REQUEST_BYTES, ServingConfig

__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "ServingApp", "ServingConfig"]

log = logging.getLogger(__name__)
class ServingApp:
    """The gRPC and REST servers of one data plane."""

    def __init__(self, dataplane: DataPlane, config: ServingConfig) -> None:
        self.dataplane = dataplane
        self.config = config
        self.keys = AuthKeys(config.keys_file, config.auth_enabled)
        self.inflight = InflightBytes(config.max_inflight_bytes)
        self.http_port = 0
        self.grpc_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._http_socket: socket.socket | None = None
        self._health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()

    async def start(self) -> None:
        """Bind both servers; raises OSError when a port is taken."""
        await self._start_grpc()
        try:
            await self._start_http()
        except BaseException:
            await self.stop(grace=0)
            raise
        log.info("serving REST on %s:%s and gRPC on %s:%s", self.config.host, self.http_port, self.config.host,
                 self.grpc_port)

    async def _start_grpc(self) -> None:
        limit = self.config.max_request_bytes
        # no interceptor at all when auth is off: it would cost every call a hop for nothing
        interceptors = [AuthInterceptor(self.keys)] if self.keys.enabled else []
        server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", int(self.config.reuse_port))])
        add_to_server(InferenceServicer(self.dataplane, self.inflight), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        address = f"{self.config.host}:{self.config.grpc_port}"
        if self.config.tls_cert and self.config.tls_key:
            credentials = grpc.ssl_server_credentials(
                [(Path(self.config.tls_key).read_bytes(), Path(self.config.tls_cert).read_bytes())])
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot bind gRPC to {address}")
        await server.start()
        self._grpc, self.grpc_port = server, port
        await self._set_health()

    async def _set_health(self) -> None:
        status = health_pb2.HealthCheckResponse.SERVING
        result = self._health.set("", status)
        if result is not None:
            await result

    async def _start_http(self) -> None:
        app = build_app(self.dataplane, self.keys, self.config.max_request_bytes, self.inflight)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        context = None
        if self.config.tls_cert and self.config.tls_key:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(self.config.tls_cert), str(self.config.tls_key))
        self._runner = runner
        sock = listening_socket(self.config.host, self.config.http_port, self.config.reuse_port)
        self._http_socket = sock
        await web.SockSite(runner, sock, ssl_context=context).start()
        if self.config.reuse_port:
            release_steering(sock)
        self.http_port = int(sock.getsockname()[1])

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let requests in flight finish (up to ``grace`` seconds), close.

        With ``reuse_port``, new connections are first steered to the server sharing the port and
        the ones already queued here are served, so a hand-over resets none.
        """
        steer = self.config.reuse_port and self._http_socket is not None and grace > 0
        if steer and self._http_socket is not None and steer_to_newer(self._http_socket):
            await asyncio.sleep(self.config.handover_drain_seconds)
        if self._grpc is not None:
            await self._grpc.stop(grace)
            self._grpc = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
