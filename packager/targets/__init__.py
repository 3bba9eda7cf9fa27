"""Deploy targets: where a service runs. Each is one module with one class (see :mod:`.base`).

``local`` runs ``edge-agent serve`` as a process, ``docker`` in a container built from the bundle,
``kubernetes`` as a Deployment applied to a cluster. Target-specific options (``base_image`` for
docker; ``kubeconfig``, ``image``, ``bundle_server``, ``namespace`` for kubernetes) pass through
:func:`get_target`; the others ignore them.
"""

from __future__ import annotations

from typing import Any

from edge_agent.errors import UsageError
from packager.targets.base import DeploymentSpec, DeployTarget, Service, ServiceState, check_service_name
from packager.targets.local import LocalTarget

__all__ = [
    "KNOWN_TARGETS",
    "DeployTarget",
    "DeploymentSpec",
    "LocalTarget",
    "Service",
    "ServiceState",
    "check_service_name",
    "get_target",
]

KNOWN_TARGETS = ("local", "docker", "kubernetes")


def get_target(name: str, **options: Any) -> DeployTarget:
    """The target called ``name``, with its own options (None values mean the default)."""
    options = {key: value for key, value in options.items() if value is not None}
    if name == "local":
        return LocalTarget()
    if name == "docker":
        from packager.targets.docker import DockerTarget

        return DockerTarget(**{k: v for k, v in options.items() if k in ("base_image",)})
    if name == "kubernetes":
        from packager.targets.kubernetes_cluster import KubernetesTarget

        keep = ("kubeconfig", "image", "bundle_server", "namespace")
        return KubernetesTarget(**{k: v for k, v in options.items() if k in keep})
    raise UsageError(f"unknown target {name!r}; choose one of {', '.join(KNOWN_TARGETS)}")
