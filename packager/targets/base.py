"""The deploy-target protocol: what every place a service can run (local, Docker, Kubernetes) offers.

A target takes a :class:`DeploymentSpec` and answers with :class:`Service` records; it keeps each
service's record and keys in the shared :class:`~packager.targets.store.ServiceStore`. Adding a
target is one module with one class implementing :class:`DeployTarget` plus one entry point in
the ``edgedeploy.targets`` group (see :mod:`packager.targets`); the CLI and the Python API in
:mod:`packager.services` never change.
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from edge_agent.errors import ModelNotReadyError, UsageError
from packager.targets import client
from packager.targets.store import ServiceStore, check_service_name

__all__ = ["DeployTarget", "DeploymentSpec", "Service", "ServiceState", "check_service_name", "free_port",
           "wait_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    """Block until something accepts TCP connections on ``host:port``; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


class ServiceState:
    """Live states a service can be in (derived from the process and its readiness probe)."""

    STARTING = "starting"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    STOPPED = "stopped"


@dataclass
class DeploymentSpec:
    """What the user asked for: a bundle to serve under a name, and how to expose and size it."""

    name: str
    bundle: Path
    port: int | None = None
    grpc_port: int | None = None
    auth: bool | None = None
    host: str = "127.0.0.1"
    cpu: float | None = None
    memory_mb: int | None = None
    replicas: int | None = None

    def validate(self) -> None:
        """Check names and numbers before anything is started; raises UsageError."""
        check_service_name(self.name)
        for label, port in (("--port", self.port), ("--grpc-port", self.grpc_port)):
            if port is not None and not 0 <= port <= 65535:
                raise UsageError(f"{label} {port} is not a TCP port (0-65535; 0 picks a free one)")
        if self.port and self.grpc_port and self.port == self.grpc_port:
            raise UsageError("--port and --grpc-port must differ")
        if self.cpu is not None and self.cpu <= 0:
            raise UsageError(f"--cpu must be positive, not {self.cpu}")
        if self.memory_mb is not None and self.memory_mb <= 0:
            raise UsageError(f"--memory-mb must be positive, not {self.memory_mb}")
        if self.replicas is not None and self.replicas < 1:
            raise UsageError(f"--replicas must be at least 1, not {self.replicas}")


@dataclass
class Service:
    """A deployed service as users see it (``service show``), with its live ``state``."""

    name: str
    state: str
    target: str
    scoring_uri: str | None
    swagger_uri: str | None
    grpc_target: str | None
    auth_enabled: bool
    model: str | None = None
    version: int | None = None
    pid: int | None = None
    bundle_sha256: str | None = None
    http_port: int | None = None
    grpc_port: int | None = None
    created: str | None = None
    updated: str | None = None
    resources: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The ``service show --json`` document."""
        return asdict(self)

    def run(self, data: Any, timeout: float = 30.0) -> Any:
        """Score ``data`` on this service (``POST /score``, with its key when auth is on).

        See :func:`packager.services.run` for what ``data`` may be and the errors raised.
        """
        if not self.scoring_uri:
            raise ModelNotReadyError(f"service {self.name!r} has no scoring address yet (state {self.state})")
        key = self.get_keys()["primary_key"] if self.auth_enabled else None
        return client.score(self.name, self.scoring_uri, data, key, timeout)

    def get_keys(self) -> dict[str, str]:
        """This service's primary and secondary keys."""
        return ServiceStore().keys(self.name)


@runtime_checkable
class DeployTarget(Protocol):
    """A place services run. Each method raises ``edge_agent.errors`` types only.

    A target class is built as ``Target(store=ServiceStore(...), **options)``: ``store`` holds the
    records and keys of every target's services, and ``options`` are the ``deploy`` options its
    ``__init__`` names (``base_image``, ``kubeconfig``, ...; others are not passed). ``name`` is the
    ``--target`` value, written into each record so later calls come back to this target.
    """

    name: str

    def deploy(self, spec: DeploymentSpec, wait: bool = True, timeout: float = 60.0) -> Service:
        """Start a new service from ``spec``; with ``wait`` return only once it is ready."""
        ...

    def wait_ready(self, name: str, timeout: float = 60.0) -> Service:
        """Block until the service answers its readiness probe; DeploymentError if it cannot."""
        ...

    def status(self, name: str) -> Service:
        """The service with its live state; NotFoundError if there is none."""
        ...

    def logs(self, name: str, tail: int | None = None) -> str:
        """The service's log text (the last ``tail`` lines when given)."""
        ...

    def update(self, name: str, bundle: Path) -> Service:
        """Replace the served bundle with no failed requests."""
        ...

    def delete(self, name: str) -> None:
        """Stop the service and remove everything it left; NotFoundError if there is none."""
        ...

    def keys(self, name: str) -> dict[str, str]:
        """``{"primary_key", "secondary_key"}``: what the service accepts as bearer tokens."""
        ...

    def regenerate_key(self, name: str, which: str) -> dict[str, str]:
        """Replace the ``primary`` or ``secondary`` key where the service reads it; the old one is refused."""
        ...

    def close(self) -> None:
        """Release what the target holds (an engine or cluster connection); called after every call."""
        ...
