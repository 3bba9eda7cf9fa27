"""Device profiles: YAML documents that say what a kind of device can run.

Profiles are data, not code. They are looked up by name in, in order: the folders in
``$EDGEDEPLOY_PROFILES`` (``:``-separated), ``$EDGEDEPLOY_HOME/profiles``, and the built-in
profiles: the repository's ``device-profiles/`` folder in a checkout, which a wheel carries as
``edge_agent/device_profiles/`` (see ``setup.py``). Every profile is validated against that folder's
``schema.json``; an invalid one is refused with the path of the bad field.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from edge_agent.errors import NotFoundError, ValidationError
from edge_agent.home import edgedeploy_home

__all__ = ["BUILTIN_PROFILES_DIR", "DeviceProfile", "list_profiles", "load_profile", "validate_profile"]


def _builtin_profiles_dir() -> Path:
    """The repository's ``device-profiles/`` in a checkout, else the copy an installed wheel carries."""
    checkout = Path(__file__).resolve().parent.parent / "device-profiles"
    if (checkout / "schema.json").is_file():
        return checkout
    return Path(__file__).resolve().parent / "device_profiles"


BUILTIN_PROFILES_DIR = _builtin_profiles_dir()
_SCHEMA_PATH = BUILTIN_PROFILES_DIR / "schema.json"


@dataclass(frozen=True)
class DeviceProfile:
    """A validated device profile. ``document`` is the YAML content as loaded."""

    document: dict[str, Any]
    source: str

    @property
    def name(self) -> str:
        return str(self.document["name"])

    @property
    def backend(self) -> str:
        return str(self.document["backend"])

    @property
    def architecture(self) -> str:
        return str(self.document["architecture"])

    @property
    def execution_providers(self) -> list[str]:
        return list(self.document["execution_providers"])

    @property
    def precisions(self) -> list[str]:
        return list(self.document["precisions"])

    @property
    def default_quantization(self) -> str:
        return str(self.document["default_quantization"])

    @property
    def optimization_level(self) -> str:
        return str(self.document.get("optimization_level", "extended"))

    @property
    def accelerators(self) -> list[dict[str, Any]]:
        return list(self.document["accelerators"])

    def to_dict(self) -> dict[str, Any]:
        return dict(self.document)


@functools.cache
def _schema() -> dict[str, Any]:
    return dict(json.loads(_SCHEMA_PATH.read_text()))


def _field_path(error: jsonschema.ValidationError) -> str:
    path = ""
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def validate_profile(document: Any, source: str = "<profile>") -> DeviceProfile:
    """Validate a profile document; the error names the file and the bad field."""
    if not isinstance(document, dict):
        raise ValidationError(f"{source}: a device profile must be a YAML mapping")
    errors = sorted(jsonschema.Draft202012Validator(_schema()).iter_errors(document), key=lambda e: e.path)
    if errors:
        first = errors[0]
        raise ValidationError(f"{source}: invalid field {_field_path(first)}: {first.message}")
    return DeviceProfile(document, source)


def _search_path() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("EDGEDEPLOY_PROFILES", "").split(":") if p]
    return [*dirs, edgedeploy_home() / "profiles", BUILTIN_PROFILES_DIR]


def _load_file(path: Path) -> DeviceProfile:
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValidationError(f"{path}: not valid YAML ({exc})") from None
    profile = validate_profile(document, str(path))
    if path.suffix in (".yaml", ".yml") and profile.name != path.stem:
        raise ValidationError(f"{path}: invalid field name: {profile.name!r} must match the file name")
    return profile


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Load a profile by name (from the search path) or from a YAML file path."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return _load_file(candidate)
    for folder in _search_path():
        path = folder / f"{name_or_path}.yaml"
        if path.is_file():
            return _load_file(path)
    known = ", ".join(p.name for p in list_profiles())
    raise NotFoundError(f"unknown device profile {str(name_or_path)!r}; known profiles: {known}")


def list_profiles() -> list[DeviceProfile]:
    """Every profile on the search path (an earlier folder shadows a later one of the same name)."""
    found: dict[str, DeviceProfile] = {}
    for folder in _search_path():
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            found.setdefault(path.stem, _load_file(path))
    return [found[name] for name in sorted(found)]
