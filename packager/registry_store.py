"""Storage behind the model registry: a metadata store and a blob store, each a small protocol.

The embedded default is :class:`SqliteMetadataStore` (one SQLite file in WAL mode) plus
:class:`FileBlobStore` (content-addressed files ``blobs/sha256/ab/abcd...``). Another backend
(PostgreSQL for metadata, S3 for blobs) is a new module implementing :class:`MetadataStore` or
:class:`BlobStore`; :mod:`packager.registry` only talks to the protocols.

Durability rules the registry relies on:

* a blob is written to a temporary file, fsynced, and renamed into place (and its folder
  fsynced) before :meth:`BlobStore.put_file` returns, so it is durable before any metadata row
  points at it;
* :meth:`MetadataStore.add_version` allocates the version number and inserts the version and its
  file rows in one ``BEGIN IMMEDIATE`` transaction, so concurrent writers get distinct,
  gap-free numbers and a killed writer leaves either the whole version or nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from edge_agent.atomic import fsync_dir
from edge_agent.errors import IntegrityError

__all__ = [
    "BlobStore",
    "FileBlobStore",
    "FileEntry",
    "MetadataStore",
    "ModelRecord",
    "SqliteMetadataStore",
    "copy_verified",
    "link_or_copy",
]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_BUSY_TIMEOUT_MS = 60_000


@dataclass(frozen=True)
class FileEntry:
    """One stored file of a model: its path relative to the model, its blob digest and size."""

    path: str
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class ModelRecord:
    """One registered model version.

    ``kind`` is ``"file"`` or ``"folder"``; ``filename`` is the base name of the registered file or
    folder; ``files`` lists every stored file (one entry, path = ``filename``, for a file model).
    """

    name: str
    version: int
    sha256: str
    size: int
    kind: str
    filename: str
    files: tuple[FileEntry, ...]
    tags: dict[str, str] = field(default_factory=dict)
    properties: dict[str, str] = field(default_factory=dict)
    description: str = ""
    framework: str | None = None
    created: str = ""

    @property
    def ref(self) -> str:
        """``name:version``."""
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """The ``model show --json`` document."""
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "tags": dict(self.tags),
            "properties": dict(self.properties),
            "description": self.description,
            "created": self.created,
            "framework": self.framework,
            "kind": self.kind,
            "filename": self.filename,
            "files": [f.to_dict() for f in self.files],
        }


class BlobStore(Protocol):
    """Content-addressed bytes, keyed by sha256 hex digest."""

    def put_file(self, source: Path) -> tuple[str, int]:
        """Store a file durably; return its (sha256, size)."""
        ...

    def has(self, digest: str) -> bool:
        """Whether the blob is stored."""
        ...

    def local_path(self, digest: str) -> Path:
        """A local read-only file holding the blob (NotFoundError if missing)."""
        ...

    def delete(self, digest: str) -> None:
        """Remove a blob (no error if it is gone)."""
        ...

    def digests(self) -> Iterator[str]:
        """Every stored blob's digest."""
        ...

    def clean_temporary(self) -> None:
        """Remove leftovers of interrupted writes; only called when no write is in progress."""
        ...


class MetadataStore(Protocol):
    """Model versions and their files."""

    def add_version(self, record: ModelRecord) -> ModelRecord:
        """Allocate the next version of ``record.name`` and store the record atomically."""
        ...

    def get(self, name: str, version: int | None) -> ModelRecord | None:
        """One version (the latest when ``version`` is None), or None."""
        ...

    def versions(self, name: str) -> list[int]:
        """The existing versions of a name, ascending."""
        ...

    def records(self, name: str | None = None) -> list[ModelRecord]:
        """All versions (of one name), ordered by name and version."""
        ...

    def delete(self, name: str, versions: list[int]) -> None:
        """Remove versions in one transaction (the version counter is kept)."""
        ...

    def referenced_blobs(self) -> set[str]:
        """Every blob digest some version still uses."""
        ...


def _hash_copy(src: Path, dst_handle: Any) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(src, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            dst_handle.write(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class FileBlobStore:
    """Blobs as read-only files ``<root>/sha256/ab/abcd...``; writes go through ``<root>/tmp``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._tmp = self.root / "tmp"

    def _path(self, digest: str) -> Path:
        return self.root / "sha256" / digest[:2] / digest

    def put_file(self, source: Path) -> tuple[str, int]:
        """Copy ``source`` into a temp file while hashing, fsync, rename to its digest path."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix=f"{os.getpid()}-", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                digest, size = _hash_copy(source, handle)
                handle.flush()
                os.fsync(handle.fileno())
            self._install(tmp, digest)
        finally:
            tmp.unlink(missing_ok=True)
        return digest, size

    def _install(self, tmp: Path, digest: str) -> None:
        final = self._path(digest)
        if final.is_file() and final.stat().st_size == tmp.stat().st_size:
            return  # same content already stored durably; the temp file is dropped
        shard_is_new = not final.parent.exists()
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o444)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if shard_is_new:
            fsync_dir(final.parent.parent)

    def has(self, digest: str) -> bool:
        """Whether the blob file exists."""
        return self._path(digest).is_file()

    def local_path(self, digest: str) -> Path:
        """The blob file itself (treat as read-only)."""
        path = self._path(digest)
        if not path.is_file():
            raise IntegrityError(
                f"blob {digest[:16]}… is missing from {self.root}; re-register the model to restore it"
            )
        return path

    def delete(self, digest: str) -> None:
        """Unlink the blob file."""
        self._path(digest).unlink(missing_ok=True)

    def digests(self) -> Iterator[str]:
        """Digests of the blob files on disk."""
        shards = self.root / "sha256"
        if shards.is_dir():
            for blob in shards.glob("??/*"):
                yield blob.name

    def clean_temporary(self) -> None:
        """Remove every partial write left by a killed process."""
        if self._tmp.is_dir():
            for leftover in self._tmp.iterdir():
                leftover.unlink(missing_ok=True)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS model_names (
    name TEXT PRIMARY KEY,
    next_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS model_versions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    kind TEXT NOT NULL,
    filename TEXT NOT NULL,
    tags TEXT NOT NULL,
    properties TEXT NOT NULL,
    description TEXT NOT NULL,
    framework TEXT,
    created TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS model_files (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (name, version, path)
);
CREATE INDEX IF NOT EXISTS model_files_blob ON model_files (sha256);
"""


class SqliteMetadataStore:
    """Metadata in one SQLite file (WAL mode, busy timeout, full sync), one connection per call.

    Version numbers come from a per-name counter (``model_names.next_version``) that is never
    decremented, so a deleted version's number — even the latest's — is never handed out again.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._ready = False

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            if not self._ready:
                self._init_schema(conn)
            conn.execute("PRAGMA synchronous = FULL")
            yield conn
        finally:
            conn.close()

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        # Switching to WAL needs a brief exclusive lock; first openers may race, so retry.
        for attempt in range(50):
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.executescript(_SCHEMA)
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 49:
                    raise
                time.sleep(0.05)
        self._ready = True

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def add_version(self, record: ModelRecord) -> ModelRecord:
        """Take the next number from the name's counter and insert version and files, atomically."""
        with self._write() as conn:
            query = "SELECT next_version FROM model_names WHERE name = ?"
            row = conn.execute(query, (record.name,)).fetchone()
            version = row[0] if row else 1
            conn.execute(
                "INSERT INTO model_names (name, next_version) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET next_version = excluded.next_version",
                (record.name, version + 1),
            )
            stored = replace(record, version=version)
            self._insert(conn, stored)
        return stored

    @staticmethod
    def _insert(conn: sqlite3.Connection, r: ModelRecord) -> None:
        conn.execute(
            "INSERT INTO model_versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (r.name, r.version, r.sha256, r.size, r.kind, r.filename, json.dumps(r.tags, sort_keys=True),
             json.dumps(r.properties, sort_keys=True), r.description, r.framework, r.created),
        )
        conn.executemany(
            "INSERT INTO model_files VALUES (?, ?, ?, ?, ?)",
            [(r.name, r.version, f.path, f.sha256, f.size) for f in r.files],
        )

    def get(self, name: str, version: int | None) -> ModelRecord | None:
        """One version, or the highest existing one when ``version`` is None."""
        with self._connect() as conn:
            if version is None:
                row = conn.execute(
                    "SELECT * FROM model_versions WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)
                ).fetchone()
            else:
                row = conn.execute(
                    "SELECT * FROM model_versions WHERE name = ? AND version = ?", (name, version)
                ).fetchone()
            return self._record(conn, row) if row else None

    def versions(self, name: str) -> list[int]:
        """Existing versions of ``name``."""
        with self._connect() as conn:
            rows = conn.execute("SELECT version FROM model_versions WHERE name = ? ORDER BY version", (name,))
            return [r[0] for r in rows]

    def records(self, name: str | None = None) -> list[ModelRecord]:
        """Every version, or every version of one name."""
        with self._connect() as conn:
            if name is None:
                rows = conn.execute("SELECT * FROM model_versions ORDER BY name, version").fetchall()
            else:
                rows = conn.execute(
                    "SELECT * FROM model_versions WHERE name = ? ORDER BY version", (name,)
                ).fetchall()
            return [self._record(conn, row) for row in rows]

    def delete(self, name: str, versions: list[int]) -> None:
        """Drop version and file rows; ``model_names`` keeps the counter."""
        with self._write() as conn:
            for version in versions:
                conn.execute("DELETE FROM model_files WHERE name = ? AND version = ?", (name, version))
                conn.execute("DELETE FROM model_versions WHERE name = ? AND version = ?", (name, version))

    def referenced_blobs(self) -> set[str]:
        """Digests of every stored file row."""
        with self._connect() as conn:
            return {r[0] for r in conn.execute("SELECT DISTINCT sha256 FROM model_files")}

    @staticmethod
    def _record(conn: sqlite3.Connection, row: tuple[Any, ...]) -> ModelRecord:
        name, version, sha256, size, kind, filename, tags, props, description, framework, created = row
        files = conn.execute(
            "SELECT path, sha256, size FROM model_files WHERE name = ? AND version = ? ORDER BY path",
            (name, version),
        ).fetchall()
        return ModelRecord(
            name=name, version=version, sha256=sha256, size=size, kind=kind, filename=filename,
            files=tuple(FileEntry(*f) for f in files), tags=json.loads(tags), properties=json.loads(props),
            description=description, framework=framework, created=created,
        )


def copy_verified(blob: Path, dest: Path, digest: str) -> None:
    """Copy a blob to ``dest`` atomically, checking its sha256 on the way (IntegrityError if not)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            got, _ = _hash_copy(blob, handle)
        if got != digest:
            raise IntegrityError(
                f"stored blob {digest[:16]}… is corrupted (sha256 {got[:16]}…); re-register the model"
            )
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, dest)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def link_or_copy(blob: Path, dest: Path) -> None:
    """Hard-link a blob to ``dest`` (read-only, no extra space), or copy it across file systems."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(blob, dest)
    except OSError:
        shutil.copyfile(blob, dest)
        os.chmod(dest, 0o444)

