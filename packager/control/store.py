"""The controller's store: one database for devices, deployments, rollouts, sequences, events, telemetry.

**URLs.** ``sqlite:///PATH`` follows SQLAlchemy's convention (``sqlite:///controller.db`` is relative
to the working folder, ``sqlite:////var/lib/edgedeploy/controller.db`` absolute); a plain file path
works too. ``postgresql://USER[:PASSWORD]@HOST[:PORT]/DB[?libpq options]`` (or ``postgres://``) needs
psycopg 3 (the ``controller`` extra). :attr:`Store.url` is the absolute SQLite URL, or the PostgreSQL
URL without its password: it goes to logs and the console.

**Schema.** Both databases carry the same tables, created and upgraded by the numbered migrations of
:mod:`packager.control.migrations` when the store opens, each in one transaction; JSON columns are
``TEXT`` on SQLite and ``JSONB`` on PostgreSQL, Python dicts and lists on both sides of this class.

**Threads.** Connections live in a small pool: a call takes one, runs, gives it back, so the
engine's thread and the HTTP server's threads each work on their own (SQLite's WAL lets readers go on
while the one writer writes). Every write method is one transaction; a connection that broke is
dropped, so the next call reconnects.

**Batches.** ``upsert_devices`` and ``put_rollout_devices`` replace whole rows by key: on SQLite one
``executemany`` in one transaction, on PostgreSQL one ``COPY`` into a temporary table and one
``INSERT ... SELECT ... ON CONFLICT``. Rows go in key order, so two writers lock rows in the same
order and never deadlock; a key given twice in one call keeps its last row. ``next_sequences`` is one
``INSERT ... ON CONFLICT DO UPDATE ... RETURNING`` over all its devices: PostgreSQL's row locks (and
SQLite's single writer) make it atomic across threads, processes and controllers.

**Leadership.** On PostgreSQL, a session-level advisory lock (``pg_try_advisory_lock``) on a
connection of its own: the server frees it when that session ends, so a leader killed with SIGKILL
loses it at once, and one cut off loses it within about 25 s (TCP keepalives are set on that session).
:meth:`Store.still_leading` runs one query on that connection. On SQLite (one host), an exclusive
``flock`` on ``<database>.lead`` beside the database, freed by the kernel when the process dies. The
``leader`` table names the holder, since when, and its last heartbeat, for the console.

**Hostile text.** Device reports reach these tables. What PostgreSQL cannot store — NUL characters
(U+FFFD instead), lone UTF-16 surrogates (``?`` instead) — and non-finite floats (NULL instead) are
replaced before either database sees them, so one device's report never fails a batch of 100,000.

**Errors.** A bad URL is a :class:`UsageError` naming ``--store``. A store that cannot be reached at
open or later (server down, database locked past the busy timeout, disk full) is
:class:`StoreUnavailableError`: ``cannot reach the store at URL (reason)``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from edge_agent.errors import EdgeDeployError, UnavailableError, UsageError
from packager.control.databases import Backend, Pool, Table, backend_for, dump_json, one_line, redact_store_url, to_text
from packager.control.migrations import BOOKKEEPING, migrations, render

__all__ = ["Store", "StoreUnavailableError", "redact_store_url"]

logger = logging.getLogger(__name__)

_HEARTBEAT_S = 5.0  # how often still_leading() writes the leader's heartbeat


class StoreUnavailableError(UnavailableError):
    """The store cannot be reached now (server down, locked, disk full); the same call may work later."""


_DEVICES = Table(
    "devices",
    (("device_id", "text"), ("online", "bool"), ("profile", "text"), ("groups", "json"), ("tags", "json"),
     ("reported", "json"), ("status", "json"), ("last_seen", "real"), ("first_seen", "real")),
    keys=("device_id",), required=("device_id",),
    defaults={"online": False, "groups": [], "tags": {}, "reported": {}, "status": {}})
_DEPLOYMENTS = Table("deployments", (("name", "text"), ("spec", "json"), ("created", "real"), ("updated", "real")))
_ROLLOUTS = Table("rollouts", (("rollout_id", "text"), ("doc", "json"), ("created", "real"), ("updated", "real")))
_ROLLOUT_DEVICES = Table(
    "rollout_devices",
    (("rollout_id", "text"), ("device_id", "text"), ("wave", "int"), ("state", "text"), ("target", "json"),
     ("previous", "json"), ("error", "text"), ("ordered_at", "real"), ("finished_at", "real")),
    keys=("rollout_id", "device_id"), required=("rollout_id", "device_id", "wave", "state"))
_EVENTS = Table(
    "events",
    (("ts", "real"), ("kind", "text"), ("device_id", "text"), ("rollout_id", "text"), ("deployment", "text"),
     ("message", "text"), ("data", "json")),
    required=("ts", "kind"), defaults={"data": {}})
_TELEMETRY = Table(
    "telemetry",
    (("device_id", "text"), ("ts", "real"), ("model", "text"), ("version", "json"), ("bundle_sha256", "text"),
     ("requests", "int"), ("errors", "int"), ("p50_ms", "real"), ("p95_ms", "real"), ("p99_ms", "real"),
     ("cpu_percent", "real"), ("memory_rss_mb", "real")),
    required=("device_id", "ts"))
_EVENT_NAMES = ["id", *_EVENTS.names]
_LEADER = Table("leader", (("holder", "text"), ("since", "real"), ("heartbeat", "real")))


# -- the store -------------------------------------------------------------------------------------------

class Store:
    """The controller's database; see the module docstring. Open with :meth:`open`, safe across threads."""

    url: str

    def __init__(self, backend: Backend) -> None:
        """Wrap ``backend`` without touching it; :meth:`open` is the way in."""
        self._backend = backend
        self.url = backend.url
        self._pool = Pool(backend.connect, backend.usable)
        self._lead = backend.lead()
        self._lead_mutex = threading.Lock()
        self._holder: str | None = None
        self._beat = 0.0

    @classmethod
    def open(cls, url: str) -> Store:
        """Open (creating when new) the store ``url`` names and bring its schema up to date."""
        store = cls(backend_for(url))
        try:
            with store._connection() as conn:
                store._backend.setup(conn)
            store._migrate()
        except BaseException as exc:
            store.close()
            if store._backend.is_database_error(exc) and not isinstance(exc, EdgeDeployError):
                raise EdgeDeployError(f"cannot use the store at {store.url} ({one_line(exc)})") from exc
            raise
        return store

    def close(self) -> None:
        """Give up the lead (when held) and close every connection; idempotent."""
        self.release_lead()
        self._pool.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _reaching(self) -> Iterator[None]:
        """Errors that say the database cannot be reached become StoreUnavailableError."""
        try:
            yield
        except Exception as exc:
            if self._backend.unavailable(exc):
                raise StoreUnavailableError(f"cannot reach the store at {self.url} ({one_line(exc)})") from exc
            raise

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        with self._reaching(), self._pool.connection() as conn:
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Any]:
        with self._connection() as conn, self._backend.transaction(conn):
            yield conn

    def _run(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._backend.execute(conn, sql, params)

    def _select(self, table: Table, tail: str = "", params: Sequence[Any] = (),
                names: Sequence[str] | None = None, as_text: Sequence[str] = ()) -> list[dict[str, Any]]:
        names = names or table.names
        with self._connection() as conn:
            rows = self._run(conn, f"SELECT {', '.join(names)} FROM {table.name} {tail}", params).fetchall()
        return table.decode(names, rows, as_text)

    # -- schema

    def _migrate(self) -> None:
        known = migrations()
        while True:
            with self._write() as conn:
                self._backend.lock_migrations(conn)
                self._run(conn, render(BOOKKEEPING, self._backend.dialect))
                current = self._version(conn)
                if current > known[-1].version:
                    raise EdgeDeployError(
                        f"the store at {self.url} has schema version {current}, newer than this edgedeploy's "
                        f"{known[-1].version}: upgrade edgedeploy, or give it a store of its own")
                if current == known[-1].version:
                    return
                step = known[current]  # versions are 1..N, so the next one sits at index `current`
                for statement in step.statements(self._backend.dialect):
                    self._run(conn, statement)
                self._run(conn, "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                          (step.version, step.name, time.time()))
            logger.info("store %s: applied migration %04d_%s", self.url, step.version, step.name)

    def _version(self, conn: Any) -> int:
        return int(self._run(conn, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0])

    def schema_version(self) -> int:
        """The version of the newest migration applied to this store."""
        with self._connection() as conn:
            return self._version(conn)

    # -- leadership

    def try_lead(self, holder: str) -> bool:
        """Take the lead without waiting; True when this store now leads (or still does) as ``holder``."""
        with self._lead_mutex:
            if self._holder is not None and self._lead.alive():
                if holder == self._holder:
                    self._heartbeat_when_due()
                else:
                    self._record_leader(holder, renew=False)
                return True
            self._holder = None
            with self._reaching():
                if not self._lead.acquire():
                    return False
            try:
                self._record_leader(holder, renew=False)
            except BaseException:
                self._lead.release()
                raise
            logger.info("store %s: %s leads", self.url, holder)
            return True

    def _record_leader(self, holder: str, renew: bool) -> None:
        now = time.time()
        with self._write() as conn:
            if renew:
                self._run(conn, "UPDATE leader SET heartbeat = ? WHERE id = 1 AND holder = ?", (now, holder))
            else:
                self._run(conn, "INSERT INTO leader (id, holder, since, heartbeat) VALUES (1, ?, ?, ?) "
                                "ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, since = excluded.since, "
                                "heartbeat = excluded.heartbeat", (to_text(holder), now, now))
        self._holder, self._beat = holder, time.monotonic()

    def _heartbeat_when_due(self) -> None:
        if self._holder is None or time.monotonic() - self._beat < _HEARTBEAT_S:
            return
        try:
            self._record_leader(self._holder, renew=True)
        except StoreUnavailableError as exc:  # the lock, not the row, is the lead: keep it
            logger.warning("store %s: leader heartbeat not written: %s", self.url, exc)

    def still_leading(self) -> bool:
        """Whether the lead taken by :meth:`try_lead` still holds (on PostgreSQL: one query on its session).

        At most every 5 s it also writes the leader's heartbeat; a failed heartbeat is logged, not fatal.
        """
        with self._lead_mutex:
            if self._holder is None:
                return False
            if not self._lead.alive():
                logger.warning("store %s: %s lost the lead", self.url, self._holder)
                self._holder = None
                return False
            self._heartbeat_when_due()
            return True

    def release_lead(self) -> None:
        """Give the lead up (a no-op when not leading); another controller may take it at once."""
        with self._lead_mutex:
            if self._holder is not None:
                try:
                    with self._write() as conn:
                        self._run(conn, "DELETE FROM leader WHERE id = 1 AND holder = ?", (self._holder,))
                except EdgeDeployError as exc:  # the lock goes anyway; the console sees an old heartbeat
                    logger.warning("store %s: leader row not removed: %s", self.url, exc)
            self._holder = None
            self._lead.release()

    def leader(self) -> dict[str, Any] | None:
        """Who leads, as recorded: ``{"holder", "since", "heartbeat"}``; None when no one does."""
        rows = self._select(_LEADER, "WHERE id = 1")
        return rows[0] if rows else None

    # -- devices, deployments, rollouts

    def _upsert(self, table: Table, rows: Iterable[Mapping[str, Any]]) -> None:
        latest = {}
        for row in rows:
            values = table.encode(row)
            latest[values[:len(table.keys)]] = values
        if latest:
            with self._write() as conn:
                self._backend.upsert(conn, table, [latest[key] for key in sorted(latest)])

    def upsert_devices(self, rows: list[dict[str, Any]]) -> None:
        """Insert or replace whole device rows by ``device_id``; missing fields take their empty defaults."""
        self._upsert(_DEVICES, rows)

    def devices(self, reported_as_text: bool = False) -> list[dict[str, Any]]:
        """Every device row, by ``device_id`` (``reported`` left as its JSON text when asked: a fleet's
        reports parsed at once are several times their size)."""
        return self._select(_DEVICES, "ORDER BY device_id", as_text=("reported",) if reported_as_text else ())

    def _put_document(self, table: Table, key: str, document: dict[str, Any]) -> None:
        key_column, doc_column = table.names[:2]
        now = time.time()
        with self._write() as conn:
            self._run(conn, f"INSERT INTO {table.name} ({key_column}, {doc_column}, created, updated) "
                            f"VALUES (?, ?, ?, ?) ON CONFLICT ({key_column}) DO UPDATE SET "
                            f"{doc_column} = excluded.{doc_column}, updated = excluded.updated",
                      (to_text(key), dump_json(document), now, now))

    def put_deployment(self, name: str, spec: dict[str, Any]) -> None:
        """Create or replace the deployment ``name``; ``created`` stays from its first put."""
        self._put_document(_DEPLOYMENTS, name, spec)

    def deployments(self) -> list[dict[str, Any]]:
        """Every deployment: ``{"name", "spec", "created", "updated"}``, by name."""
        return self._select(_DEPLOYMENTS, "ORDER BY name")

    def delete_deployment(self, name: str) -> bool:
        """Remove the deployment ``name``; False when there was none."""
        with self._write() as conn:
            return bool(self._run(conn, "DELETE FROM deployments WHERE name = ?", (name,)).rowcount)

    def put_rollout(self, rollout_id: str, doc: dict[str, Any]) -> None:
        """Create or replace a rollout's document; ``created`` stays from its first put."""
        self._put_document(_ROLLOUTS, rollout_id, doc)

    def rollouts(self) -> list[dict[str, Any]]:
        """Every rollout: ``{"rollout_id", "doc", "created", "updated"}``, oldest first."""
        return self._select(_ROLLOUTS, "ORDER BY created, rollout_id")

    def rollout(self, rollout_id: str) -> dict[str, Any] | None:
        """One rollout, or None."""
        rows = self._select(_ROLLOUTS, "WHERE rollout_id = ?", (rollout_id,))
        return rows[0] if rows else None

    def put_rollout_devices(self, rollout_id: str, rows: list[dict[str, Any]]) -> None:
        """Insert or replace a rollout's per-device rows by ``(rollout_id, device_id)``."""
        self._upsert(_ROLLOUT_DEVICES, ({**row, "rollout_id": rollout_id} for row in rows))

    def rollout_devices(self, rollout_id: str) -> list[dict[str, Any]]:
        """A rollout's device rows (with ``rollout_id``), by wave then device."""
        return self._select(_ROLLOUT_DEVICES, "WHERE rollout_id = ? ORDER BY wave, device_id", (rollout_id,))

    def rollout_counts(self, rollout_id: str) -> dict[tuple[int, str], int]:
        """How many of a rollout's devices are in each (wave, state), without reading the rows."""
        with self._connection() as conn:
            rows = self._run(conn, "SELECT wave, state, COUNT(*) FROM rollout_devices WHERE rollout_id = ? "
                                   "GROUP BY wave, state", (rollout_id,)).fetchall()
        return {(int(wave), str(state)): int(n) for wave, state, n in rows}

    def delete_rollouts(self, rollout_ids: Sequence[str]) -> int:
        """Remove rollouts and their device rows; how many rollouts went."""
        removed = 0
        with self._write() as conn:
            for rollout_id in rollout_ids:
                self._run(conn, "DELETE FROM rollout_devices WHERE rollout_id = ?", (rollout_id,))
                removed += int(self._run(conn, "DELETE FROM rollouts WHERE rollout_id = ?", (rollout_id,)).rowcount)
        return removed

    def next_sequences(self, floors: dict[str, int]) -> dict[str, int]:
        """For each device, ``max(stored, floor) + 1``, stored before it is returned; atomic across controllers."""
        if not floors:
            return {}
        clean = {str(device): int(floor) for device, floor in floors.items()}
        with self._write() as conn:
            return self._backend.next_sequences(conn, clean)

    # -- events and telemetry

    def _append(self, table: Table, rows: Iterable[Mapping[str, Any]]) -> None:
        values = [table.encode(row) for row in rows]
        if values:
            with self._write() as conn:
                self._backend.append(conn, table, values)

    def add_events(self, rows: list[dict[str, Any]]) -> None:
        """Append events (``ts`` and ``kind`` required; ``data`` defaults to ``{}``)."""
        self._append(_EVENTS, rows)

    def events(self, limit: int = 200, device_id: str | None = None, rollout_id: str | None = None,
               deployment: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` events matching every filter given, newest first (each with its ``id``)."""
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (("device_id", device_id), ("rollout_id", rollout_id), ("deployment", deployment)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            clauses.append("ts >= ?")
            params.append(float(since))
        tail = f"{_where(clauses)} ORDER BY ts DESC, id DESC LIMIT ?"
        return self._select(_EVENTS, tail, (*params, max(0, int(limit))), names=_EVENT_NAMES)

    def add_telemetry(self, rows: list[dict[str, Any]]) -> None:
        """Append telemetry samples (``device_id`` and ``ts`` required; ``model`` None: the device's own)."""
        self._append(_TELEMETRY, rows)

    def telemetry(self, device_ids: list[str] | None, since: float, until: float | None = None,
                  model: str | None = None) -> list[dict[str, Any]]:
        """Samples with ``since <= ts <= until`` of these devices (None: all) and ``model`` (None: any).

        Oldest first.
        """
        if device_ids is not None and not device_ids:
            return []
        clauses: list[str] = ["ts >= ?"]
        params: list[Any] = [float(since)]
        if until is not None:
            clauses.append("ts <= ?")
            params.append(float(until))
        if model is not None:
            clauses.append("model = ?")
            params.append(model)
        if device_ids is not None:
            clause, param = self._backend.any_of("device_id", list(device_ids))
            clauses.append(clause)
            params.append(param)
        return self._select(_TELEMETRY, f"{_where(clauses)} ORDER BY ts, id", params)

    def prune(self, retention_s: float, now: float | None = None) -> int:
        """Delete telemetry and events older than ``retention_s`` before ``now``; how many rows went."""
        if retention_s < 0:
            raise UsageError(f"retention must not be negative (got {retention_s} s)")
        cutoff = (time.time() if now is None else now) - retention_s
        with self._write() as conn:
            return sum(int(self._run(conn, f"DELETE FROM {table} WHERE ts < ?", (cutoff,)).rowcount)
                       for table in ("telemetry", "events"))

    def size_bytes(self) -> int:
        """The space the store takes: SQLite's pages, or PostgreSQL's tables with their indexes."""
        with self._connection() as conn:
            return self._backend.size_bytes(conn)


def _where(clauses: list[str]) -> str:
    return f"WHERE {' AND '.join(clauses)}" if clauses else ""
