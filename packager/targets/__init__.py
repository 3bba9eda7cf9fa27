"""Deploy targets: where a service runs. Each is one module with one class (see :mod:`.base`).

``local`` runs ``edge-agent serve`` as a process, ``docker`` in a container built from the bundle,
``kubernetes`` as a Deployment applied to a cluster. Targets are plug-ins: each is an entry point
in the ``edgedeploy.targets`` group (name = the ``--target`` value, value = the class), so a new
one is one module plus one line in its package's ``pyproject.toml``::

    [project.entry-points."edgedeploy.targets"]
    niced = "niced_target:NicedTarget"

Target-specific options (``base_image`` for docker; ``kubeconfig``, ``image``, ``bundle_server``,
``namespace`` for kubernetes) pass through :func:`get_target` to the targets whose ``__init__``
names them; the others never see them.
"""

from __future__ import annotations

import inspect
from typing import Any

from edge_agent.errors import UsageError
from edge_agent.plugins import TARGETS_GROUP, load_plugin, plugin_names
from packager.targets.base import DeploymentSpec, DeployTarget, Service, ServiceState, check_service_name
from packager.targets.store import ServiceStore

__all__ = [
    "DeployTarget",
    "DeploymentSpec",
    "Service",
    "ServiceState",
    "ServiceStore",
    "check_service_name",
    "get_target",
    "target_names",
]


def target_names() -> list[str]:
    """The ``--target`` values installed here (``edgedeploy.targets`` entry points), sorted."""
    return plugin_names(TARGETS_GROUP)


def get_target(name: str, store: ServiceStore | None = None, **options: Any) -> DeployTarget:
    """The target called ``name`` over ``store``, given the ``options`` it takes (None means its default).

    UsageError, naming the installed targets, when ``name`` is not one of them.
    """
    factory = load_plugin(TARGETS_GROUP, name, "deploy target", UsageError)
    given = {key: value for key, value in options.items() if value is not None}
    target = factory(store=store or ServiceStore(), **_accepted(factory, given))
    missing = [member for member in _MEMBERS if not callable(getattr(target, member, None))]
    if missing:
        raise UsageError(f"deploy target {name!r} does not implement packager.targets.DeployTarget "
                         f"(missing {', '.join(missing)})")
    if getattr(target, "name", None) != name:
        # records carry the target's name: a different one would send later calls elsewhere
        raise UsageError(f"deploy target {name!r} calls itself {getattr(target, 'name', None)!r}: its entry "
                         "point must have the same name")
    return target


_MEMBERS = ("deploy", "wait_ready", "status", "logs", "update", "delete", "keys", "regenerate_key", "close")


def _accepted(factory: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The options ``factory``'s signature takes (all of them if it takes ``**kwargs``)."""
    parameters = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return options
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {key: value for key, value in options.items() if key in names}
