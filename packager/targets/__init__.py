"""Deploy targets: where a service runs. ``local`` now; docker and kubernetes are one new module each."""

from __future__ import annotations

from packager.errors import DeploymentError, UsageError
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
_AVAILABLE = {"local": LocalTarget}


def get_target(name: str) -> DeployTarget:
    """The target called ``name``; refuses a target this version cannot deploy to yet."""
    if name not in KNOWN_TARGETS:
        raise UsageError(f"unknown target {name!r}; choose one of {', '.join(KNOWN_TARGETS)}")
    factory = _AVAILABLE.get(name)
    if factory is None:
        raise DeploymentError(
            f"the {name} target is not available in this version of edgedeploy; "
            "deploy with --target local"
        )
    return factory()
