"""Versioned migrations of the controller's store, applied in order by :meth:`Store.open`.

A migration is a module ``NNNN_name.py`` in this package (``0001_initial.py``) whose ``SQL`` holds
statements separated by ``;``. It is written once for both databases: column types that differ are
placeholders the dialect fills in (:data:`COLUMN_TYPES`), so JSON is ``TEXT`` on SQLite and ``JSONB``
on PostgreSQL. The store applies each pending migration in its own transaction and records it in
``schema_migrations`` (version, name, applied_at); a store whose newest version is above the last
module here was written by a newer edgedeploy and is refused.

A migration that has shipped is never edited: a change to the schema is the next number. The
modules are plain Python files of this package, so the wheel carries them with the code.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass

__all__ = ["BOOKKEEPING", "COLUMN_TYPES", "Migration", "migrations", "render"]

COLUMN_TYPES: dict[str, dict[str, str]] = {
    "sqlite": {"json": "TEXT", "real": "REAL", "bigint": "INTEGER", "bool": "INTEGER",
               "id": "INTEGER PRIMARY KEY"},  # the rowid: numbered by SQLite on insert
    "postgresql": {"json": "JSONB", "real": "DOUBLE PRECISION", "bigint": "BIGINT", "bool": "BOOLEAN",
                   "id": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"},
}

# Created before any migration runs, since it records them.
BOOKKEEPING = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version {bigint} PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at {real} NOT NULL
)"""

_MODULE_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)")


@dataclass(frozen=True)
class Migration:
    """One numbered step of the schema."""

    version: int
    name: str
    sql: str

    def statements(self, dialect: str) -> list[str]:
        """The migration's statements for ``dialect`` (``"sqlite"`` or ``"postgresql"``), in order."""
        return [part.strip() for part in render(self.sql, dialect).split(";") if part.strip()]


def render(sql: str, dialect: str) -> str:
    """``sql`` with its column-type placeholders filled in for ``dialect``."""
    return sql.format(**COLUMN_TYPES[dialect])


def migrations() -> list[Migration]:
    """Every migration of this package in version order; numbered 1, 2, 3... without a gap."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        match = _MODULE_NAME.fullmatch(info.name)
        if match:
            module = importlib.import_module(f"{__name__}.{info.name}")
            found.append(Migration(int(match.group(1)), match.group(2), module.SQL))
    found.sort(key=lambda migration: migration.version)
    numbers = [migration.version for migration in found]
    if numbers != list(range(1, len(found) + 1)):
        raise RuntimeError(f"store migrations are not numbered 1..{len(found)}: {numbers}")
    return found
