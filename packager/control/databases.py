"""SQLite and PostgreSQL behind one small interface, for :mod:`packager.control.store`.

A :class:`Backend` is what differs between the two: connecting, transactions, the batch write of many
rows (``executemany`` on SQLite; ``COPY`` into a temporary table, then one ``INSERT ... SELECT ... ON
CONFLICT`` on PostgreSQL), atomic sequence numbers, sizes, and the :class:`Lead` lock that makes one
controller the leader (an ``flock`` beside the SQLite file; a session-level advisory lock held on a
PostgreSQL connection of its own, with TCP keepalives on both ends so a vanished leader's session
ends within about 25 s). SQL is written once with ``?`` placeholders; the PostgreSQL backend turns
them into psycopg's ``%s``.

A :class:`Table` maps rows (dicts) to database values and back: JSON columns are text in both
databases on this side (PostgreSQL's JSONB is read as text), and what PostgreSQL cannot store — NUL
characters, lone surrogates, non-finite floats — is replaced before it reaches either database.

psycopg is imported only by the PostgreSQL backend: a SQLite store needs nothing beyond the stdlib.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from edge_agent.errors import EdgeDeployError, UsageError, brief

__all__ = [
    "AdvisoryLead",
    "Backend",
    "FileLead",
    "Lead",
    "Pool",
    "PostgresBackend",
    "RawJSON",
    "SqliteBackend",
    "Table",
    "backend_for",
    "dump_json",
    "one_line",
    "raw_json",
    "redact_store_url",
    "to_text",
]

_BUSY_TIMEOUT_S = 60.0  # SQLite: how long a writer waits for another one before the store counts as unavailable
_CONNECT_TIMEOUT_S = 10
_IDLE_CONNECTIONS = 4  # kept open per store: a PostgreSQL server allows about 100 connections in all
# The lead session notices a dead peer after idle + interval * count seconds; so does the server.
_KEEPALIVES = {"keepalives": "1", "keepalives_idle": "10", "keepalives_interval": "5", "keepalives_count": "3"}
_SQLITE_UNAVAILABLE = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CANTOPEN",
                       "SQLITE_READONLY")


def _advisory_key(name: str) -> int:
    """A stable signed 64-bit key for a PostgreSQL advisory lock."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


_LEAD_KEY = _advisory_key("edgedeploy.control leader")
_MIGRATION_KEY = _advisory_key("edgedeploy.control migrations")


# -- values in and out ---------------------------------------------------------------------------------

def _clean_text(text: str) -> str:
    if text.isascii() and "\x00" not in text:
        return text
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def _clean(value: Any) -> Any:
    """``value`` with NULs and lone surrogates replaced in every string and non-finite floats as None."""
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {_clean_text(str(key)): _clean(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(item) for item in value]
    return value


_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # built once: json.dumps(**options) builds one a call


class RawJSON(str):
    """JSON text stored as it is (a device's own message): made by :func:`raw_json`, which checks it."""


_UNSTORABLE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")  # a NUL, or a surrogate (paired ones are rechecked)


def raw_json(data: bytes) -> RawJSON | None:
    """Valid JSON ``data`` as text both databases store unchanged; None when it must be cleaned first
    (a NUL or a surrogate escape, which PostgreSQL refuses, or bytes that are not UTF-8)."""
    if _UNSTORABLE.search(data):
        return None
    try:
        return RawJSON(data.decode("utf-8"))
    except UnicodeDecodeError:
        return None


def dump_json(value: Any) -> str | None:
    """``value`` as compact JSON text that both databases store (see the module docstring); None stays None."""
    if value is None:
        return None
    if isinstance(value, RawJSON):
        return str(value)
    try:
        text = _JSON.encode(value)
    except ValueError:  # NaN or infinity somewhere
        return _JSON.encode(_clean(value))
    # ASCII output: a NUL or a surrogate is an escape; paired surrogates are fine but rare enough to recheck
    if "\\u0000" in text or "\\ud" in text:
        return _JSON.encode(_clean(value))
    return text


def to_text(value: Any) -> str | None:
    """``value`` as text both databases store; None stays None."""
    return None if value is None else _clean_text(value if isinstance(value, str) else str(value))


def _to_real(value: Any) -> float | None:
    number = None if value is None else float(value)
    return number if number is not None and math.isfinite(number) else None


def _to_int(value: Any) -> int | None:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return int(value)


def _to_bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _load_json(value: Any) -> Any:
    return None if value is None else json.loads(value)


_ENCODE: dict[str, Callable[[Any], Any]] = {"text": to_text, "json": dump_json, "real": _to_real,
                                            "int": _to_int, "bool": _to_bool}
_DECODE: dict[str, Callable[[Any], Any]] = {"json": _load_json, "bool": _to_bool}


@dataclass(frozen=True)
class Table:
    """A table's columns (name, kind), its key (the first columns), required columns and defaults."""

    name: str
    columns: tuple[tuple[str, str], ...]
    keys: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """The column names, in order."""
        return [name for name, _kind in self.columns]

    @cached_property
    def _plan(self) -> list[tuple[str, Callable[[Any], Any], Any, bool]]:
        return [(name, _ENCODE[kind], self.defaults.get(name), name in self.required) for name, kind in self.columns]

    def encode(self, row: Mapping[str, Any]) -> tuple[Any, ...]:
        """``row`` as database values in column order; a missing column takes its default (else NULL)."""
        values = []
        for name, convert, default, required in self._plan:
            value = row.get(name)
            if value is None:
                if required:
                    raise UsageError(f"a {self.name} row needs {name!r}")
                value = default
            values.append(convert(value))
        return tuple(values)

    def decode(self, names: Sequence[str], rows: Iterable[Sequence[Any]],
               as_text: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Rows read back as dicts: JSON decoded (but for the columns ``as_text``), SQLite's 0/1 as booleans."""
        kinds = dict(self.columns)
        converters = [(i, _DECODE[kinds[name]]) for i, name in enumerate(names)
                      if kinds.get(name) in _DECODE and name not in as_text]
        decoded = []
        for row in rows:
            values = list(row)
            for i, convert in converters:
                values[i] = convert(values[i])
            decoded.append(dict(zip(names, values, strict=True)))
        return decoded


def _insert_sql(table: Table, source: str) -> str:
    return f"INSERT INTO {table.name} ({', '.join(table.names)}) {source}"


def _upsert_sql(table: Table, source: str) -> str:
    updates = ", ".join(f"{name} = excluded.{name}" for name in table.names if name not in table.keys)
    return f"{_insert_sql(table, source)} ON CONFLICT ({', '.join(table.keys)}) DO UPDATE SET {updates}"


def _placeholders(table: Table) -> str:
    return f"VALUES ({', '.join('?' for _name in table.names)})"


def one_line(error: BaseException) -> str:
    """A database error's message on one short line (libpq's span several)."""
    return brief(" ".join(str(error).split()) or type(error).__name__, 300)


# -- the two databases ---------------------------------------------------------------------------------

class Lead(Protocol):
    """The lock that makes one controller the leader."""

    def acquire(self) -> bool:
        """Take the lock without waiting; False when another holder has it."""
        ...

    def alive(self) -> bool:
        """Whether the lock taken is still held (False when never taken or lost)."""
        ...

    def release(self) -> None:
        """Let the lock go (a no-op when not held)."""
        ...


class Backend(Protocol):
    """What differs between SQLite and PostgreSQL. SQL comes with ``?`` placeholders; ``conn`` is a DB-API
    connection of the backend's driver, used by one thread at a time."""

    dialect: str  # a key of packager.control.migrations.COLUMN_TYPES
    url: str  # for logs: absolute path, no password

    def connect(self) -> Any:
        """A new connection in autocommit mode (transactions come from :meth:`transaction`)."""
        ...

    def setup(self, conn: Any) -> None:
        """Once per open, before the migrations (SQLite: switch to WAL)."""
        ...

    def usable(self, conn: Any) -> bool:
        """Whether ``conn`` may go back to the pool: open, not broken, outside a transaction."""
        ...

    def unavailable(self, error: BaseException) -> bool:
        """Whether ``error`` says the database cannot be reached now (rather than a wrong statement)."""
        ...

    def is_database_error(self, error: BaseException) -> bool:
        """Whether ``error`` comes from the driver."""
        ...

    def execute(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement; returns the driver's cursor."""
        ...

    def transaction(self, conn: Any) -> AbstractContextManager[Any]:
        """One write transaction: committed when the block ends, rolled back when it raises."""
        ...

    def lock_migrations(self, conn: Any) -> None:
        """Inside a transaction: make concurrent migrators take turns."""
        ...

    def upsert(self, conn: Any, table: Table, rows: list[tuple[Any, ...]]) -> None:
        """Insert or replace encoded ``rows`` (unique keys, in key order) by the table's key."""
        ...

    def append(self, conn: Any, table: Table, rows: list[tuple[Any, ...]]) -> None:
        """Insert encoded ``rows``."""
        ...

    def any_of(self, column: str, values: list[str]) -> tuple[str, Any]:
        """A condition ``column`` is one of ``values`` (any number of them), and its one parameter."""
        ...

    def next_sequences(self, conn: Any, floors: dict[str, int]) -> dict[str, int]:
        """Inside a transaction: each device's ``max(stored, floor) + 1``, stored."""
        ...

    def size_bytes(self, conn: Any) -> int:
        """The space the store's tables take."""
        ...

    def lead(self) -> Lead:
        """The leadership lock of this database (not yet taken)."""
        ...


class FileLead:
    """An exclusive ``flock`` on a file: held while the descriptor is open, freed when the process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        if not self.alive():  # the file was replaced between open and flock: the lock guards nothing
            self.release()
            return False
        return True

    def alive(self) -> bool:
        if self._fd is None:
            return False
        try:
            here, there = os.fstat(self._fd), os.stat(self.path)
        except FileNotFoundError:
            return False
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # frees the lock; the file stays, so no one locks a file another is about to open


class SqliteBackend:
    """One SQLite file in WAL mode with full sync; a second process on the same host may share it."""

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"

    def connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One pooled connection serves one thread at a time, whichever thread that is.
        conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA synchronous = FULL")
        except BaseException:
            conn.close()
            raise
        return conn

    def setup(self, conn: sqlite3.Connection) -> None:
        # Switching to WAL takes a brief exclusive lock without waiting on the busy timeout: first openers retry.
        for attempt in range(50):
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 49:
                    raise
                time.sleep(0.05)

    def usable(self, conn: sqlite3.Connection) -> bool:
        return not conn.in_transaction

    def unavailable(self, error: BaseException) -> bool:
        if isinstance(error, OSError):
            return True
        name = getattr(error, "sqlite_errorname", "")
        return isinstance(error, sqlite3.OperationalError) and name.startswith(_SQLITE_UNAVAILABLE)

    def is_database_error(self, error: BaseException) -> bool:
        return isinstance(error, sqlite3.Error)

    def execute(self, conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return conn.execute(sql, params)

    @contextmanager
    def transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def lock_migrations(self, conn: sqlite3.Connection) -> None:
        """Nothing to do: ``BEGIN IMMEDIATE`` already makes migrating writers take turns."""

    def upsert(self, conn: sqlite3.Connection, table: Table, rows: list[tuple[Any, ...]]) -> None:
        conn.executemany(_upsert_sql(table, _placeholders(table)), rows)

    def append(self, conn: sqlite3.Connection, table: Table, rows: list[tuple[Any, ...]]) -> None:
        conn.executemany(_insert_sql(table, _placeholders(table)), rows)

    def any_of(self, column: str, values: list[str]) -> tuple[str, Any]:
        return f"{column} IN (SELECT value FROM json_each(?))", json.dumps(values)

    def next_sequences(self, conn: sqlite3.Connection, floors: dict[str, int]) -> dict[str, int]:
        # "WHERE true" tells SQLite's parser that ON CONFLICT belongs to the INSERT, not to a join
        sql = ("INSERT INTO sequences (device_id, seq) SELECT key, value + 1 FROM json_each(?) WHERE true "
               "ON CONFLICT (device_id) DO UPDATE SET seq = max(sequences.seq + 1, excluded.seq) "
               "RETURNING device_id, seq")
        return dict(conn.execute(sql, (json.dumps(floors, sort_keys=True),)).fetchall())

    def size_bytes(self, conn: sqlite3.Connection) -> int:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        return int(pages * conn.execute("PRAGMA page_size").fetchone()[0])

    def lead(self) -> Lead:
        return FileLead(self.path.with_name(self.path.name + ".lead"))


class AdvisoryLead:
    """A session-level advisory lock on a connection of its own; the server frees it when the session ends."""

    def __init__(self, connect: Callable[[], Any]) -> None:
        self._connect = connect
        self._conn: Any = None  # kept between attempts, so a standby polls without reconnecting
        self._held = False

    def acquire(self) -> bool:
        import psycopg

        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()  # a broken session: closed, not left to the garbage collector
            self._conn = self._connect()
        try:
            self._held = bool(self._conn.execute("SELECT pg_try_advisory_lock(%s)", (_LEAD_KEY,)).fetchone()[0])
        except psycopg.Error:
            self.release()
            raise
        return self._held

    def alive(self) -> bool:
        import psycopg

        if not self._held:
            return False
        try:
            self._conn.execute("SELECT 1")
        except psycopg.Error:
            self.release()
            return False
        return True

    def release(self) -> None:
        import psycopg

        conn, held, self._conn, self._held = self._conn, self._held, None, False
        if conn is None:
            return
        if held and not conn.closed and not conn.broken:
            # freed now, not when the server notices the session ended: a standby may take over at once
            # (an error means the session is gone, and its locks with it)
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock(%s)", (_LEAD_KEY,))
        conn.close()


class PostgresBackend:
    """A PostgreSQL database through psycopg 3, connections in autocommit mode."""

    dialect = "postgresql"

    def __init__(self, params: dict[str, Any], url: str) -> None:
        self.url = url
        self._params = {"connect_timeout": str(_CONNECT_TIMEOUT_S), "application_name": "edgedeploy-controller",
                        **params}

    def connect(self, **extra: str) -> Any:
        import psycopg
        from psycopg.types.string import TextLoader

        conn = psycopg.connect(**{**self._params, **extra}, autocommit=True)
        conn.adapters.register_loader("jsonb", TextLoader)  # JSON comes back as text, decoded like SQLite's
        return conn

    def setup(self, conn: Any) -> None:
        """Nothing to set up before the migrations."""

    def usable(self, conn: Any) -> bool:
        from psycopg.pq import TransactionStatus

        return not conn.closed and not conn.broken and conn.info.transaction_status == TransactionStatus.IDLE

    def unavailable(self, error: BaseException) -> bool:
        import psycopg

        return isinstance(error, psycopg.OperationalError)

    def is_database_error(self, error: BaseException) -> bool:
        import psycopg

        return isinstance(error, psycopg.Error)

    def execute(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        return conn.execute(sql.replace("?", "%s"), params)

    def transaction(self, conn: Any) -> Any:
        return conn.transaction()

    def lock_migrations(self, conn: Any) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_KEY,))

    def upsert(self, conn: Any, table: Table, rows: list[tuple[Any, ...]]) -> None:
        stage, names = f"_stage_{table.name}", ", ".join(table.names)
        conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table.name}) ON COMMIT DELETE ROWS")
        self._copy(conn, stage, table, rows)
        conn.execute(_upsert_sql(table, f"SELECT {names} FROM {stage} ORDER BY {', '.join(table.keys)}"))

    def append(self, conn: Any, table: Table, rows: list[tuple[Any, ...]]) -> None:
        self._copy(conn, table.name, table, rows)

    @staticmethod
    def _copy(conn: Any, target: str, table: Table, rows: list[tuple[Any, ...]]) -> None:
        with conn.cursor() as cursor, cursor.copy(f"COPY {target} ({', '.join(table.names)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)

    def any_of(self, column: str, values: list[str]) -> tuple[str, Any]:
        return f"{column} = ANY(?)", values

    def next_sequences(self, conn: Any, floors: dict[str, int]) -> dict[str, int]:
        sql = ("INSERT INTO sequences (device_id, seq) SELECT d, f + 1 "
               "FROM unnest(%s::text[], %s::bigint[]) AS t(d, f) ORDER BY d "
               "ON CONFLICT (device_id) DO UPDATE SET seq = GREATEST(sequences.seq + 1, excluded.seq) "
               "RETURNING device_id, seq")
        ids = sorted(floors)
        return dict(conn.execute(sql, (ids, [floors[i] for i in ids])).fetchall())

    def size_bytes(self, conn: Any) -> int:
        sql = ("SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
               "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' AND n.nspname = current_schema()")
        return int(conn.execute(sql).fetchone()[0])

    def lead(self) -> Lead:
        return AdvisoryLead(self._lead_connection)

    def _lead_connection(self) -> Any:
        conn = self.connect(**_KEEPALIVES)
        for name in ("idle", "interval", "count"):  # the server's side of the same keepalives
            conn.execute(f"SET tcp_keepalives_{name} = {_KEEPALIVES['keepalives_' + name]}")
        return conn


# -- URLs ------------------------------------------------------------------------------------------------

_URL_FORMS = "use sqlite:///PATH, a file path, or postgresql://USER@HOST:PORT/DB"


def redact_store_url(url: str) -> str:
    """``url`` without a password in its user part or its query (``?password=``), for logs."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    netloc = f"{userinfo.partition(':')[0]}{at}{hostport}"
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "password"])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def backend_for(url: str) -> Backend:
    """The backend a ``--store`` value names; UsageError naming ``--store`` when it names none."""
    if not url.strip():
        raise UsageError(f"--store: empty; {_URL_FORMS}")
    if "://" not in url:
        if url.lower().startswith(("sqlite:", "postgresql:", "postgres:")):
            shown = brief(redact_store_url(url), 200)
            raise UsageError(f"--store: {shown} lacks the // after the scheme; {_URL_FORMS}")
        return SqliteBackend(Path(url).expanduser().absolute())
    scheme = url.partition("://")[0].lower()
    if scheme == "sqlite":
        return _sqlite_backend(url)
    if scheme in ("postgresql", "postgres"):
        return _postgres_backend(url)
    shown = brief(redact_store_url(url), 200)
    raise UsageError(f"--store: unknown scheme {brief(scheme, 40)!r} in {shown}; {_URL_FORMS}")


def _sqlite_backend(url: str) -> SqliteBackend:
    rest = url.partition("://")[2]
    if not rest.startswith("/") or len(rest) < 2:
        raise UsageError(f"--store: {brief(url, 200)} names no file: use sqlite:///relative/path or "
                         "sqlite:////absolute/path")
    return SqliteBackend(Path(rest[1:]).expanduser().absolute())


def _postgres_backend(url: str) -> PostgresBackend:
    shown = brief(redact_store_url(url), 200)
    try:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict
    except ModuleNotFoundError:
        raise EdgeDeployError("a PostgreSQL store needs the 'psycopg' module, which this install lacks: "
                              "pip install 'edgedeploy[controller]'") from None
    try:
        urlsplit(url).port  # noqa: B018 - reading the port is what checks it
        params = conninfo_to_dict(url)
    except (ValueError, psycopg.ProgrammingError) as exc:
        raise UsageError(f"--store: {shown} is not a PostgreSQL URL ({one_line(exc)})") from None
    return PostgresBackend(params, redact_store_url(url))


# -- connections -----------------------------------------------------------------------------------------

class Pool:
    """Connections each used by one thread at a time and kept for the next call (a few idle at most)."""

    def __init__(self, connect: Callable[[], Any], usable: Callable[[Any], bool]) -> None:
        self._connect, self._usable = connect, usable
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def connection(self) -> Iterator[Any]:
        with self._lock:
            if self._closed:
                raise EdgeDeployError("the store is closed")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
        try:
            yield conn
        finally:
            self._give_back(conn)

    def _give_back(self, conn: Any) -> None:
        with self._lock:
            keep = not self._closed and len(self._idle) < _IDLE_CONNECTIONS and self._usable(conn)
            if keep:
                self._idle.append(conn)
        if not keep:
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed, idle, self._idle = True, self._idle, []
        for conn in idle:
            conn.close()
