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
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edge_agent.errors import DeploymentError, UsageError
from packager.targets import DeploymentSpec, DeployTarget, Service, ServiceStore, get_target

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


@contextlib.contextmanager
def _opened(target: DeployTarget) -> Iterator[DeployTarget]:
    """A target for one call; its connection (a Docker or Kubernetes client) is closed afterwards."""
    try:
        yield target
    finally:
        target.close()


def _target_of(name: str) -> contextlib.AbstractContextManager[DeployTarget]:
    """The target that runs service ``name`` (its record names it), for one call; NotFoundError if none."""
    store = ServiceStore()
    return _opened(get_target(str(store.record(name).get("target", "local")), store))


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
    for name in ServiceStore().names():
        try:
            found.append(get_service(name))
        except (DeploymentError, UsageError) as exc:  # a corrupt record, a target no longer installed
            log.warning("skipping service %s: %s", name, exc)
    return found


def logs(name: str, tail: int | None = None) -> str:
    """The log of service ``name`` (the last ``tail`` lines when given)."""
    with _target_of(name) as target:
        return str(target.logs(name, tail))


def get_keys(name: str) -> dict[str, str]:
    """``{"primary_key", "secondary_key"}`` of service ``name``."""
    with _target_of(name) as target:
        return target.keys(name)


def regenerate_key(name: str, which: str) -> dict[str, str]:
    """Replace the ``primary`` or ``secondary`` key where the service reads it; the old one is refused.

    A Kubernetes service's Secret is updated in the cluster (then the local copy); when the cluster
    cannot be reached this raises DeploymentError and the old keys stay.
    """
    with _target_of(name) as target:
        return target.regenerate_key(name, which)


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
    return get_service(name).run(data, timeout)
