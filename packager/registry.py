"""The model registry: named, versioned model files or folders with tags, properties and hashes.

The embedded store lives in ``$EDGEDEPLOY_HOME/registry``: ``registry.db`` (SQLite, WAL mode) for
metadata, ``blobs/sha256/ab/abcd...`` for content-addressed files, and ``models/<name>/<version>/``
for materialized copies handed out by :func:`get_model_path`. Storage sits behind the two small
protocols of :mod:`packager.registry_store` (``MetadataStore``, ``BlobStore``), so a PostgreSQL or
S3 backend is a new module there and this one does not change.

Guarantees:

* versions count up from 1 per name; a per-name counter is never decremented, so the number of
  a deleted version (even the latest) is never handed out again;
* concurrent registrations of one name get distinct numbers with no gaps (allocation and insert
  happen in one ``BEGIN IMMEDIATE`` transaction);
* a registration killed half-way leaves no visible version: blobs are made durable first, then
  the version row and its file rows are committed in one transaction. Leftover temporary files
  and unreferenced blobs are harmless and are removed by the next delete;
* deletes take an exclusive lock on ``registry.lock`` while readers and writers take a shared
  one, so a blob is never removed while a registration or a materialization still needs it.

A one-file model is stored with its file name; its sha256 is the file's. A folder model keeps its
relative layout; its size is the total of its files and its sha256 is the sha256 of the lines
``"<relative posix path>\\0<file sha256>\\n"`` in sorted path order.
"""

from __future__ import annotations

import builtins
import fcntl
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from edge_agent.errors import NotFoundError, UsageError, ValidationError
from edge_agent.home import edgedeploy_home
from packager.registry_store import (
    BlobStore,
    FileBlobStore,
    FileEntry,
    MetadataStore,
    ModelRecord,
    SqliteMetadataStore,
    copy_verified,
    link_or_copy,
)

__all__ = [
    "ModelRecord",
    "Registry",
    "delete_model",
    "download_model",
    "get_model",
    "get_model_path",
    "list_models",
    "parse_key_values",
    "parse_model_ref",
    "register_model",
    "validate_name",
]

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid model name, else raise ValidationError saying the rule."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValidationError(
            f"invalid model name {name!r}: use 1-128 letters, digits, '_', '.' or '-', starting with a "
            "letter or digit"
        )
    return name


def parse_model_ref(ref: str) -> tuple[str, int | None]:
    """Split ``"name"`` or ``"name:3"`` into (name, version or None)."""
    name, sep, version = ref.rpartition(":")
    if not sep:
        return validate_name(ref), None
    if not version.isdigit() or int(version) < 1:
        raise UsageError(f"invalid model reference {ref!r}: the version after ':' must be a number >= 1")
    return validate_name(name), int(version)


def parse_key_values(items: Iterable[str] | None, what: str = "tag") -> dict[str, str]:
    """Turn ``["k=v", ...]`` into a dict; a missing '=' or an empty key is a UsageError."""
    result: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"invalid {what} {item!r}: write it as KEY=VALUE with a non-empty KEY")
        result[key] = value
    return result


def _check_mapping(values: Mapping[str, object] | None, what: str) -> dict[str, str]:
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise UsageError(f"{what}s must be a mapping of KEY to VALUE, got {type(values).__name__}")
    result = {}
    for key, value in values.items():
        if not isinstance(key, str) or not key.strip() or "=" in key:
            raise UsageError(f"invalid {what} key {key!r}: use a non-empty key without '='")
        result[key] = str(value)
    return result


def _folder_digest(files: list[FileEntry]) -> str:
    digest = hashlib.sha256()
    for entry in sorted(files, key=lambda f: f.path):
        digest.update(f"{entry.path}\0{entry.sha256}\n".encode())
    return digest.hexdigest()


def _folder_members(folder: Path) -> list[tuple[str, Path]]:
    members = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise ValidationError(f"{path} is a link or special file; a model folder may hold only regular "
                                  "files and folders")
        if path.is_file():
            members.append((rel, path))
    if not members:
        raise ValidationError(f"model folder {folder} holds no files; point at a folder with the model files")
    return members


def _detect_framework(members: list[tuple[str, Path]]) -> str | None:
    if any(rel.lower().endswith(".onnx") for rel, _ in members):
        return "onnx"
    return None


class Registry:
    """A model registry rooted at ``home/registry`` (``home`` defaults to ``$EDGEDEPLOY_HOME``)."""

    def __init__(self, home: Path | None = None, metadata: MetadataStore | None = None,
                 blobs: BlobStore | None = None) -> None:
        self.root = Path(home if home is not None else edgedeploy_home()) / "registry"
        self.root.mkdir(parents=True, exist_ok=True)
        self.metadata: MetadataStore = metadata or SqliteMetadataStore(self.root / "registry.db")
        self.blobs: BlobStore = blobs or FileBlobStore(self.root / "blobs")
        self._models_dir = self.root / "models"

    @contextmanager
    def _lock(self, exclusive: bool) -> Iterator[None]:
        with open(self.root / "registry.lock", "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def register(self, name: str, path: Path | str, tags: Mapping[str, object] | None = None,
                 properties: Mapping[str, object] | None = None, description: str = "",
                 framework: str | None = None) -> ModelRecord:
        """Store a model file or folder as the next version of ``name``; returns the new record."""
        validate_name(name)
        tags_, props = _check_mapping(tags, "tag"), _check_mapping(properties, "property")
        source = Path(path)
        if not source.exists():
            raise NotFoundError(f"{source} does not exist; pass the path of an existing model file or folder")
        members = [(source.name, source)] if source.is_file() else _folder_members(source)
        for _, member in members:
            if not os.access(member, os.R_OK):
                raise UsageError(f"cannot read {member}; check its permissions")
        with self._lock(exclusive=False):
            files = tuple(FileEntry(rel, *self.blobs.put_file(p)) for rel, p in members)
            record = ModelRecord(
                name=name, version=0, kind="file" if source.is_file() else "folder", filename=source.name,
                sha256=files[0].sha256 if source.is_file() else _folder_digest(list(files)),
                size=sum(f.size for f in files), files=files, tags=tags_, properties=props,
                description=str(description or ""), framework=framework or _detect_framework(members),
                created=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            )
            stored = self.metadata.add_version(record)
        logger.info("registered %s (%s bytes, sha256 %s)", stored.ref, stored.size, stored.sha256)
        return stored

    def list(self, name: str | None = None, tags: Mapping[str, object] | None = None) -> list[ModelRecord]:
        """Every version, optionally of one name and carrying all of ``tags`` (KEY: VALUE)."""
        wanted = _check_mapping(tags, "tag")
        return [r for r in self.metadata.records(name)
                if all(r.tags.get(k) == v for k, v in wanted.items())]

    def get(self, name: str, version: int | None = None) -> ModelRecord:
        """One version (the latest when ``version`` is None); NotFoundError if it does not exist."""
        validate_name(name)
        record = self.metadata.get(name, version)
        if record is not None:
            return record
        versions = self.metadata.versions(name)
        if not versions:
            raise NotFoundError(f"no model named {name!r} in the registry; see `edgedeploy model list`")
        known = ", ".join(str(v) for v in versions)
        raise NotFoundError(f"model {name!r} has no version {version} (versions: {known}); "
                            f"pick one of those")

    def get_model_path(self, name: str, version: int | None = None) -> Path:
        """A local path to the model: the file for a one-file model, the folder otherwise.

        The files are hard links to the read-only blobs (copies across file systems) under
        ``models/<name>/<version>/``; do not modify them.
        """
        record = self.get(name, version)
        version_dir = self._models_dir / name / str(record.version)
        target = version_dir / record.filename
        with self._lock(exclusive=False):
            if version_dir.is_dir() and not target.exists():
                shutil.rmtree(version_dir, ignore_errors=True)  # someone removed files: rebuild it
            if not version_dir.is_dir():
                self._materialize(record, version_dir)
        return target

    def _materialize(self, record: ModelRecord, version_dir: Path) -> None:
        version_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=version_dir.parent, prefix=".tmp-"))
        try:
            for entry in record.files:
                rel = entry.path if record.kind == "file" else f"{record.filename}/{entry.path}"
                link_or_copy(self.blobs.local_path(entry.sha256), staging / rel)
            try:
                os.rename(staging, version_dir)  # atomic: the version folder appears complete or not at all
            except OSError:
                if not version_dir.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def download(self, name: str, version: int | None, out_dir: Path | str) -> Path:
        """Copy the model into ``out_dir`` (byte-identical, checked); returns the file or folder path."""
        record = self.get(name, version)
        target = Path(out_dir) / record.filename
        with self._lock(exclusive=False):
            for entry in record.files:
                dest = target if record.kind == "file" else target / entry.path
                copy_verified(self.blobs.local_path(entry.sha256), dest, entry.sha256)
        return target

    def delete(self, name: str, version: int | None = None, all_versions: bool = False) -> builtins.list[int]:
        """Delete one version, or every version with ``all_versions``; returns the deleted numbers.

        Blobs no remaining version references are removed. The name's version counter is kept.
        """
        validate_name(name)
        if not all_versions and version is None:
            raise UsageError(f"say which version of {name!r} to delete (NAME:VERSION) or pass --all-versions")
        with self._lock(exclusive=True):
            records = self.metadata.records(name) if all_versions else [self.get(name, version)]
            if not records:
                self.get(name)  # raises the not-found error
            versions = [r.version for r in records]
            self.metadata.delete(name, versions)
            self._collect_garbage(name, records)
        logger.info("deleted %s versions %s", name, versions)
        return versions

    def _collect_garbage(self, name: str, records: builtins.list[ModelRecord]) -> None:
        # Called under the exclusive lock: no registration or materialization is in progress.
        # Every unreferenced blob goes, including complete blobs of a registration killed before
        # its commit.
        referenced = self.metadata.referenced_blobs()
        for digest in set(self.blobs.digests()) - referenced:
            self.blobs.delete(digest)
        self.blobs.clean_temporary()
        name_dir = self._models_dir / name
        for record in records:
            shutil.rmtree(name_dir / str(record.version), ignore_errors=True)
        if name_dir.is_dir():
            for leftover in name_dir.glob(".tmp-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            if not any(name_dir.iterdir()):
                name_dir.rmdir()


def register_model(name: str, path: Path | str, tags: Mapping[str, object] | None = None,
                   properties: Mapping[str, object] | None = None, description: str = "",
                   framework: str | None = None) -> ModelRecord:
    """Register a model file or folder in the default registry (``edgedeploy model register``)."""
    return Registry().register(name, path, tags, properties, description, framework)


def list_models(name: str | None = None, tags: Mapping[str, object] | None = None) -> list[ModelRecord]:
    """Registered versions, filtered by name and tags (``edgedeploy model list``)."""
    return Registry().list(name, tags)


def get_model(name: str, version: int | None = None) -> ModelRecord:
    """One registered version, the latest by default (``edgedeploy model show``)."""
    return Registry().get(name, version)


def get_model_path(name: str, version: int | None = None) -> Path:
    """Local path of a registered model, the latest by default (``edgedeploy model path``)."""
    return Registry().get_model_path(name, version)


def download_model(name: str, version: int | None, out_dir: Path | str) -> Path:
    """Copy a registered model into ``out_dir`` (``edgedeploy model download``)."""
    return Registry().download(name, version, out_dir)


def delete_model(name: str, version: int | None = None, all_versions: bool = False) -> list[int]:
    """Delete one version or all versions of a model (``edgedeploy model delete``)."""
    return Registry().delete(name, version, all_versions)
