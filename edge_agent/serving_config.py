"""The settings of the gRPC and REST servers: one dataclass, the one source of their names and defaults.

``edge-agent serve`` extends it (:class:`edge_agent.cli.ServeConfig`), the fleet daemon's
``agent.yaml`` gives a view of it (:attr:`edge_agent.config.AgentConfig.serving`), and
:class:`edge_agent.server.ServingApp` reads it. Nothing here imports a transport.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_MAX_INFLIGHT_BYTES", "DEFAULT_MAX_REQUEST_BYTES", "ServingConfig"]

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_INFLIGHT_BYTES = 256 * 1024 * 1024  # four requests of the default size at once


@dataclass(kw_only=True)
class ServingConfig:
    """Where and how to serve. Port 0 picks a free port (read ``ServingApp.http_port`` after start)."""

    host: str = "127.0.0.1"
    http_port: int = 0
    grpc_port: int = 0
    keys_file: Path | None = None
    auth_enabled: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    # bytes of requests answered at once, REST and gRPC together; beyond it 503 / RESOURCE_EXHAUSTED
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES
    # share the ports with the server being replaced (see edge_agent.handover)
    reuse_port: bool = False
    handover_drain_seconds: float = 0.5
