"""Plug-ins found by entry points in installed package metadata.

Two groups: ``edgedeploy.runtimes`` (runtime backends; the name is a manifest's ``runtime.backend``,
the value a ``load(bundle_dir, manifest, info)`` function) and ``edgedeploy.targets`` (deploy
targets; the name is a ``--target`` value, the value a target class). A plug-in is one module plus
one line in its distribution's ``pyproject.toml``::

    [project.entry-points."edgedeploy.runtimes"]
    my-backend = "my_package.backend:load"

Metadata is read again whenever ``sys.path`` or one of its folders changes (a ``pip install``
adds a ``dist-info`` folder), so a package installed while a process runs is seen by its next
lookup; otherwise the last reading is reused (reading every installed package's metadata takes
tens of milliseconds). This module imports nothing a plug-in needs: looking up a name loads only
that plug-in's module.
"""

from __future__ import annotations

import functools
import os
import sys
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from edge_agent.errors import EdgeDeployError, brief

__all__ = ["RUNTIMES_GROUP", "TARGETS_GROUP", "load_plugin", "plugin_names"]

RUNTIMES_GROUP = "edgedeploy.runtimes"
TARGETS_GROUP = "edgedeploy.targets"


def plugin_names(group: str) -> list[str]:
    """The names of every installed plug-in of ``group``, sorted."""
    return sorted({entry.name for entry in _entries(group)})


def _entries(group: str) -> tuple[EntryPoint, ...]:
    return _read(group, _path_stamp())


@functools.lru_cache(maxsize=8)
def _read(group: str, stamp: tuple[tuple[str, int | None], ...]) -> tuple[EntryPoint, ...]:
    return tuple(entry_points(group=group))


def _path_stamp() -> tuple[tuple[str, int | None], ...]:
    """``sys.path`` with each folder's modification time: it changes when a package is installed."""
    stamp: list[tuple[str, int | None]] = []
    for folder in sys.path:
        try:
            stamp.append((folder, os.stat(folder or ".").st_mtime_ns))
        except OSError:
            stamp.append((folder, None))
    return tuple(stamp)


def _providers(entries: list[EntryPoint]) -> str:
    return ", ".join(sorted(f"{entry.value} from {entry.dist.name if entry.dist else '?'}" for entry in entries))


def load_plugin(group: str, name: str, what: str, error: type[EdgeDeployError]) -> Any:
    """The object plug-in ``name`` of ``group`` names, imported now.

    ``error`` is raised, naming the installed plug-ins, when no package provides ``name``; when two
    packages provide it differently (which one would win depends on sys.path order); and when its
    module cannot be imported.
    """
    found = [entry for entry in _entries(group) if entry.name == name]
    if not found:
        installed = ", ".join(plugin_names(group)) or "none"
        raise error(f"no {what} named {name!r} is installed (installed: {installed}); a {what} is a package "
                    f"with an entry point in the {group!r} group")
    if len({entry.value for entry in found}) > 1:
        raise error(f"{what} {name!r} is provided by several packages ({_providers(found)}): uninstall all but one")
    try:
        return found[0].load()
    except Exception as exc:  # noqa: BLE001 - importing a plug-in runs its code: any failure refuses it
        raise error(f"the {what} {name!r} ({found[0].value}) cannot be loaded: "
                    f"{type(exc).__name__}: {brief(str(exc), 300)}") from None
