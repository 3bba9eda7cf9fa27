"""Service records, shared by every deploy target: ``EDGEDEPLOY_HOME/services/NAME/``.

Each service has one folder, whatever runs it: ``service.json`` (the record, written atomically;
its ``target`` field names the target that runs the service, so :mod:`packager.services` knows
where to send each call) and ``keys.json`` (the primary and secondary keys, mode 0600). A target
keeps its own files beside them (the local target: the log, the agent's state, the bundles).
"""

from __future__ import annotations

import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.atomic import atomic_write_json, read_json
from edge_agent.errors import AlreadyExistsError, DeploymentError, NotFoundError, UsageError
from edge_agent.home import edgedeploy_home

__all__ = ["KEY_NAMES", "ServiceFiles", "ServiceStore", "check_service_name", "services_root"]

KEY_NAMES = ("primary", "secondary")
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def services_root() -> Path:
    """``EDGEDEPLOY_HOME/services``, where every service keeps its folder."""
    return edgedeploy_home() / "services"


def check_service_name(name: str) -> str:
    """Refuse a service name that is not a DNS label (it becomes a folder, a container, a pod)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise UsageError(
            f"invalid service name {name!r}: use 1-63 lowercase letters, digits and '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class ServiceFiles:
    """The paths of one service's folder."""

    root: Path

    @property
    def record(self) -> Path:
        """``service.json``: the record."""
        return self.root / "service.json"

    @property
    def keys(self) -> Path:
        """``keys.json``: the primary and secondary keys."""
        return self.root / "keys.json"

    @property
    def log(self) -> Path:
        """``service.log``: a local service's stdout and stderr."""
        return self.root / "service.log"

    @property
    def agent_state(self) -> Path:
        """``agent-state.json``: written by a local agent (real ports, pid, readiness)."""
        return self.root / "agent-state.json"

    @property
    def bundles(self) -> Path:
        """``bundles/``: the served bundle, copied in."""
        return self.root / "bundles"

    @property
    def work(self) -> Path:
        """``work/``: a local agent's extracted models."""
        return self.root / "work"


class ServiceStore:
    """Every service's folder, record and keys (under ``root``, default ``EDGEDEPLOY_HOME/services``)."""

    def __init__(self, root: Path | None = None) -> None:
        self._root = root

    @property
    def root(self) -> Path:
        """The folder holding one folder per service (EDGEDEPLOY_HOME is read at each use)."""
        return self._root if self._root is not None else services_root()

    def files(self, name: str) -> ServiceFiles:
        """The paths of service ``name`` (which may not exist)."""
        return ServiceFiles(self.root / check_service_name(name))

    def claim(self, name: str) -> ServiceFiles:
        """Create service ``name``'s folder, atomically; AlreadyExistsError when the name is taken."""
        files = self.files(name)
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            files.root.mkdir()
        except FileExistsError:
            raise AlreadyExistsError(
                f"service {name!r} exists; change it with 'edgedeploy service update {name} --bundle B' "
                f"or remove it with 'edgedeploy service delete {name}'") from None
        return files

    def remove(self, name: str) -> None:
        """Remove service ``name``'s folder and everything in it."""
        shutil.rmtree(self.files(name).root, ignore_errors=True)

    def names(self) -> list[str]:
        """Names of every service with a record, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob("*/service.json"))

    def record(self, name: str, target: str | None = None) -> dict[str, Any]:
        """The record of ``name``; NotFoundError if there is none (or, given ``target``, it runs elsewhere)."""
        files = self.files(name)
        try:
            record = dict(read_json(files.record))
        except FileNotFoundError:
            raise NotFoundError(f"no service named {name!r}; see 'edgedeploy service list'") from None
        except ValueError:
            raise DeploymentError(f"the record of service {name!r} is corrupt: {files.record}") from None
        if target is not None and record.get("target", "local") != target:
            raise NotFoundError(f"service {name!r} is a {record.get('target')} service, not a {target} one")
        return record

    def save(self, name: str, record: dict[str, Any]) -> None:
        """Write the record of ``name`` (atomically: a crash leaves the old one or the new one)."""
        atomic_write_json(self.files(name).record, record)

    def keys(self, name: str) -> dict[str, str]:
        """``{"primary_key", "secondary_key"}`` of service ``name``."""
        self.record(name)
        try:
            document = read_json(self.files(name).keys)
            return {f"{which}_key": str(document[f"{which}_key"]) for which in KEY_NAMES}
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            raise DeploymentError(f"the keys of service {name!r} are missing or corrupt") from None

    def write_keys(self, name: str, keys: dict[str, str]) -> None:
        """Store ``keys`` for service ``name`` (mode 0600)."""
        atomic_write_json(self.files(name).keys, keys, mode=0o600)

    def rotated_keys(self, name: str, which: str) -> dict[str, str]:
        """The keys of ``name`` with ``which`` (primary or secondary) replaced; nothing is written yet."""
        if which not in KEY_NAMES:
            raise UsageError(f"--regenerate takes primary or secondary, not {which!r}")
        keys = self.keys(name)
        keys[f"{which}_key"] = secrets.token_urlsafe(32)
        return keys
