"""An example deploy target from a third-party package: local services at a lower CPU priority.

The agent of each service runs under ``nice -n 10``, so serving yields the CPU to interactive work
on a shared machine. Records, keys, status, logs, update and delete are the local target's; only
the command line changes. The package declares the target with one entry point::

    [project.entry-points."edgedeploy.targets"]
    niced = "niced_target:NicedTarget"

and then ``edgedeploy deploy NAME --bundle B --target niced`` works, as do ``service show``,
``keys``, ``update``, ``delete`` on that service (its record says ``"target": "niced"``).
"""

from __future__ import annotations

from pathlib import Path

from packager.targets.base import DeploymentSpec
from packager.targets.local import LocalTarget
from packager.targets.store import ServiceFiles, ServiceStore


class NicedTarget(LocalTarget):
    """The local target with the agent started by ``nice`` (which execs it: the pid stays the same)."""

    name = "niced"

    def __init__(self, store: ServiceStore | None = None, niceness: int = 10) -> None:
        super().__init__(store)
        self.niceness = niceness

    def agent_command(self, spec: DeploymentSpec, files: ServiceFiles, bundle: Path, model: str,
                      auth: bool) -> list[str]:
        """``nice -n N`` before the local agent's command line."""
        return ["nice", "-n", str(self.niceness), *super().agent_command(spec, files, bundle, model, auth)]
