"""Deployed services, the Python twin of ``edgedeploy deploy`` and ``edgedeploy service``::

    import packager as ed

    service = ed.deploy("digits", "digits.edb", port=0)     # starts and waits until ready
    print(service.scoring_uri)
    ed.run("digits", {"data": [[0.0] * 64]})                # POST /score, with the key if needed
    ed.update("digits", "digits-v2.edb")                     # hot swap, no failed requests
    ed.delete("digits")

Every service keeps a record under ``EDGEDEPLOY_HOME/services/NAME``; the record names its target,
and each call is dispatched to that target (see :mod:`packager.targets`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edge_agent.errors import (
    AuthError,
    DeploymentError,
    EdgeDeployError,
    InferenceError,
    InvalidInputError,
    ModelNotReadyError,
    NotFoundError,
    PayloadTooLargeError,
)
from packager.targets import DeploymentSpec, LocalTarget, Service, get_target
from packager.targets.local import error_text, http_request

__all__ = [
    "Service",
    "delete",
    "deploy",
    "get_keys",
    "get_service",
    "list_services",
    "logs",
    "regenerate_key",
    "run",
    "update",
    "wait_for_deployment",
]

log = logging.getLogger(__name__)

_STATUS_ERRORS: dict[int, type[EdgeDeployError]] = {
    400: InvalidInputError,
    401: AuthError,
    403: AuthError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    500: InferenceError,
    503: ModelNotReadyError,
}


def _local() -> LocalTarget:
    return LocalTarget()


@contextlib.contextmanager
def _opened(target: Any) -> Iterator[Any]:
    """A target for one call; its connection (a Docker or Kubernetes client) is closed afterwards."""
    try:
        yield target
    finally:
        close = getattr(target, "close", None)
        if close is not None:
            close()


def _target_of(name: str) -> Any:
    """The target that runs service ``name`` (from its record), for one call; NotFoundError if none."""
    record = _local().record(name)
    kubeconfig = record.get("kubeconfig")
    return _opened(get_target(str(record.get("target", "local")), kubeconfig=Path(kubeconfig) if kubeconfig else None))


def deploy(
    name: str,
    bundle: str | Path,
    target: str = "local",
    port: int | None = None,
    grpc_port: int | None = None,
    auth: bool | None = None,
    cpu: float | None = None,
    memory_mb: int | None = None,
    replicas: int | None = None,
    wait: bool = True,
    host: str = "127.0.0.1",
    timeout: float = 60.0,
    **target_options: Any,
) -> Service:
    """Deploy ``bundle`` as service ``name`` and (with ``wait``) return once it answers.

    ``port``/``grpc_port`` None or 0 pick free ports. ``auth`` None means off for a service bound
    to loopback and on otherwise. A bad bundle, a taken port or a process that dies while starting
    raises, and leaves nothing running. ``target_options`` go to the target: ``base_image`` for
    docker; ``kubeconfig``, ``image``, ``bundle_server`` and ``namespace`` for kubernetes.
    """
    spec = DeploymentSpec(name=name, bundle=Path(bundle), port=port, grpc_port=grpc_port, auth=auth,
                          host=host, cpu=cpu, memory_mb=memory_mb, replicas=replicas)
    with _opened(get_target(target, **target_options)) as chosen:
        return chosen.deploy(spec, wait=wait, timeout=timeout)


def wait_for_deployment(name: str, timeout: float = 60.0) -> Service:
    """Block until service ``name`` is ready; DeploymentError if it dies or the timeout passes."""
    with _target_of(name) as target:
        return target.wait_ready(name, timeout)


def get_service(name: str) -> Service:
    """Service ``name`` with its live state; NotFoundError if there is none."""
    with _target_of(name) as target:
        return target.status(name)


def list_services() -> list[Service]:
    """Every service, sorted by name, each with its live state (an unreadable one is skipped)."""
    found = []
    for name in _local().names():
        try:
            found.append(get_service(name))
        except DeploymentError as exc:
            log.warning("skipping service %s: %s", name, exc)
    return found


def logs(name: str, tail: int | None = None) -> str:
    """The log of service ``name`` (the last ``tail`` lines when given)."""
    with _target_of(name) as target:
        return str(target.logs(name, tail))


def get_keys(name: str) -> dict[str, str]:
    """``{"primary_key", "secondary_key"}`` of service ``name``."""
    return _local().keys(name)


def regenerate_key(name: str, which: str) -> dict[str, str]:
    """Replace the ``primary`` or ``secondary`` key; the old one is refused from then on."""
    return _local().regenerate_key(name, which)


def update(name: str, bundle: str | Path) -> Service:
    """Hot-swap service ``name`` to ``bundle`` with no failed requests."""
    with _target_of(name) as target:
        return target.update(name, Path(bundle))


def delete(name: str) -> None:
    """Stop service ``name`` and remove everything it left; NotFoundError if there is none."""
    with _target_of(name) as target:
        target.delete(name)


def run(name: str, data: Any, timeout: float = 30.0) -> Any:
    """Score on service ``name`` through ``POST /score`` and return the decoded answer.

    ``data`` is the request body: a JSON-able object (e.g. ``{"data": [[...]]}``), a JSON string,
    or raw ``bytes`` (sent as ``application/octet-stream``, e.g. an image for an entry script).
    Error answers raise the matching ``edge_agent.errors`` type with the server's message.
    """
    service = get_service(name)
    if not service.scoring_uri:
        raise ModelNotReadyError(f"service {name!r} has no scoring address yet (state {service.state})")
    body, content_type = _encode(data)
    headers = {"Content-Type": content_type}
    if service.auth_enabled:
        headers["Authorization"] = f"Bearer {get_keys(name)['primary_key']}"
    status, answer = http_request("POST", service.scoring_uri, body, headers, timeout=timeout)
    if status != 200:
        error = _STATUS_ERRORS.get(status, DeploymentError)
        raise error(f"service {name!r} answered HTTP {status}: {error_text(answer)}")
    try:
        return json.loads(answer)
    except ValueError:
        return answer


def _encode(data: Any) -> tuple[bytes, str]:
    if isinstance(data, bytes | bytearray):
        return bytes(data), "application/octet-stream"
    if isinstance(data, str):
        return data.encode(), "application/json"
    return json.dumps(data).encode(), "application/json"

