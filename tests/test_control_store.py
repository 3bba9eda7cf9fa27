"""The controller's store on SQLite and on a real PostgreSQL: migrations, every method, leadership, errors.

Every test that takes ``store_url`` runs twice, on a SQLite file and on a fresh PostgreSQL database
(tests/postgres.py). What the store wrote is checked through its own methods and, where the schema
itself is the point, through a plain connection of the database's own driver.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

import packager.control.store as store_module
from edge_agent.errors import EdgeDeployError, UsageError
from packager.control.migrations import migrations
from packager.control.store import Store, StoreUnavailableError
from tests.postgres import admin_connection

DEADLINE_S = 60.0  # generous: two loaded cores shared with other sessions


def raw_query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on the store's database with its driver, not through Store; rows when any."""
    if url.startswith("sqlite:///"):
        with closing(sqlite3.connect(url[len("sqlite:///"):], isolation_level=None)) as conn:
            return conn.execute(sql, params).fetchall()
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql.replace("?", "%s"), params)
        return cursor.fetchall() if cursor.description else []


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with Store.open(store_url) as opened:
        yield opened


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- migrations ------------------------------------------------------------------------------------------

def test_a_fresh_store_gets_every_migration_once(store_url: str) -> None:
    known = migrations()
    with Store.open(store_url) as store:
        assert store.schema_version() == known[-1].version
    recorded = raw_query(store_url, "SELECT version, name, applied_at FROM schema_migrations ORDER BY version")
    assert [(v, n) for v, n, _at in recorded] == [(m.version, m.name) for m in known]
    with Store.open(store_url) as store:  # re-open: nothing applied again
        assert store.schema_version() == known[-1].version
    assert raw_query(store_url, "SELECT version, name, applied_at FROM schema_migrations ORDER BY version") == recorded


def test_stores_opened_at_once_migrate_once(store_url: str) -> None:
    with ThreadPoolExecutor(3) as pool:
        opened = list(pool.map(lambda _i: Store.open(store_url), range(3)))  # any error is raised here
    for store in opened:
        store.close()
    assert raw_query(store_url, "SELECT COUNT(*) FROM schema_migrations") == [(len(migrations()),)]


def test_a_store_newer_than_the_code_is_refused(store_url: str) -> None:
    Store.open(store_url).close()
    raw_query(store_url, "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
              (999, "from_the_future", time.time()))
    with pytest.raises(EdgeDeployError, match="has schema version 999, newer than this edgedeploy's") as caught:
        Store.open(store_url)
    assert "upgrade edgedeploy" in str(caught.value)


def test_json_columns_are_jsonb_on_postgresql(pg_database: str) -> None:
    Store.open(pg_database).close()
    jsonb = raw_query(pg_database, "SELECT table_name, column_name FROM information_schema.columns "
                                   "WHERE data_type = 'jsonb' ORDER BY table_name, column_name")
    assert ("devices", "reported") in jsonb and ("rollouts", "doc") in jsonb and ("events", "data") in jsonb
    assert len(jsonb) == 10


# -- devices, deployments, rollouts ----------------------------------------------------------------------

DEVICE = {"device_id": "pi-01", "online": True, "profile": "cpu-arm64", "groups": ["kitchen", "canary"],
          "tags": {"site": "milan"}, "reported": {"state": "active", "models": {"digits": {"version": 3}}},
          "status": {"online": True, "ts": 10.5}, "last_seen": 1700000000.25, "first_seen": 1690000000.5}


def test_devices_round_trip_and_upsert_replaces_whole_rows(store: Store) -> None:
    other = {**DEVICE, "device_id": "pi-00", "online": False, "groups": [], "tags": {"site": "turin"}}
    store.upsert_devices([DEVICE, other])
    assert store.devices() == [other, DEVICE]  # by device_id
    store.upsert_devices([{"device_id": "pi-01", "online": False}])  # replaced, not merged
    assert store.devices()[1] == {"device_id": "pi-01", "online": False, "profile": None, "groups": [], "tags": {},
                                  "reported": {}, "status": {}, "last_seen": None, "first_seen": None}
    store.upsert_devices([{**DEVICE, "profile": "first"}, {**DEVICE, "profile": "last"}])  # the last row of a key wins
    assert store.devices()[1] == {**DEVICE, "profile": "last"}
    assert store.devices()[0] == other


def test_a_device_row_without_an_id_is_refused(store: Store) -> None:
    with pytest.raises(UsageError, match="a devices row needs 'device_id'"):
        store.upsert_devices([DEVICE, {"online": True}])
    assert store.devices() == []


@pytest.mark.soak  # make soak: seconds per database
def test_100000_devices_in_one_call(store_url: str, store: Store) -> None:
    rows = [{"device_id": f"dev-{i:06d}", "online": i % 2 == 0, "tags": {"n": i}, "last_seen": float(i)}
            for i in range(100_000)]
    store.upsert_devices(rows)
    assert raw_query(store_url, "SELECT COUNT(*), COUNT(DISTINCT device_id) FROM devices") == [(100_000, 100_000)]
    online, tags, last_seen = raw_query(store_url, "SELECT online, tags, last_seen FROM devices "
                                                   "WHERE device_id = 'dev-054321'")[0]
    assert (bool(online), json.loads(tags) if isinstance(tags, str) else tags, last_seen) == (False, {"n": 54321},
                                                                                             54321.0)


def test_hostile_text_in_a_batch_is_stored_not_refused(store: Store) -> None:
    hostile = {"device_id": "evil", "profile": "nul\x00here", "tags": {"k\x00": "lone \ud800 surrogate"},
               "reported": {"state": "active", "emoji": "\U0001f600", "ratio": float("nan")}}
    store.upsert_devices([DEVICE, hostile, {**DEVICE, "device_id": "pi-02"}])
    devices = {row["device_id"]: row for row in store.devices()}
    assert set(devices) == {"evil", "pi-01", "pi-02"}
    assert devices["evil"]["profile"] == "nul\ufffdhere"
    assert devices["evil"]["tags"] == {"k\ufffd": "lone ? surrogate"}
    assert devices["evil"]["reported"] == {"state": "active", "emoji": "\U0001f600", "ratio": None}
    store.add_events([{"ts": 1.0, "kind": "refused", "device_id": "evil", "message": "bad\x00order"}])
    store.add_telemetry([{"device_id": "evil", "ts": 1.0, "p95_ms": float("inf"), "requests": 4.0}])
    assert store.events()[0]["message"] == "bad\ufffdorder"
    assert (store.telemetry(["evil"], 0)[0]["p95_ms"], store.telemetry(["evil"], 0)[0]["requests"]) == (None, 4)


def test_deployments_round_trip(store: Store) -> None:
    store.put_deployment("milan", {"bundle_sha256": "ab" * 32, "target": "tags.site = 'milan'", "priority": 10})
    store.put_deployment("all", {"target": "*", "priority": 0})
    first = {row["name"]: row for row in store.deployments()}
    store.put_deployment("milan", {"target": "tags.site = 'milan'", "priority": 20})
    listed = store.deployments()
    assert [row["name"] for row in listed] == ["all", "milan"]
    assert listed[1]["spec"] == {"target": "tags.site = 'milan'", "priority": 20}
    assert listed[1]["created"] == first["milan"]["created"] and listed[1]["updated"] >= first["milan"]["updated"]
    assert store.delete_deployment("milan") is True
    assert store.delete_deployment("milan") is False
    assert [row["name"] for row in store.deployments()] == ["all"]


def test_rollouts_round_trip_oldest_first(store: Store) -> None:
    store.put_rollout("r-2", {"state": "running", "waves": [["a"], ["b", "c"]]})
    store.put_rollout("r-1", {"state": "running"})
    store.put_rollout("r-2", {"state": "succeeded"})  # replaced; still the oldest
    assert [(row["rollout_id"], row["doc"]) for row in store.rollouts()] == [
        ("r-2", {"state": "succeeded"}), ("r-1", {"state": "running"})]
    one = store.rollout("r-1")
    assert one is not None and one["doc"] == {"state": "running"} and one["created"] <= one["updated"]
    assert store.rollout("r-404") is None


def test_rollout_devices_round_trip(store: Store) -> None:
    target = {"bundle_sha256": "cd" * 32, "model": {"name": "digits", "version": 4}}
    rows = [{"device_id": "b", "wave": 1, "state": "pending", "target": target, "previous": None, "error": None,
             "ordered_at": None, "finished_at": None},
            {"device_id": "a", "wave": 1, "state": "ordered", "target": target, "previous": {"version": 3},
             "error": None, "ordered_at": 5.5, "finished_at": None},
            {"device_id": "z", "wave": 0, "state": "succeeded", "target": target, "previous": None, "error": None,
             "ordered_at": 1.0, "finished_at": 2.0}]
    store.put_rollout_devices("r-1", rows)
    store.put_rollout_devices("r-2", [{"device_id": "a", "wave": 0, "state": "pending"}])
    assert store.rollout_devices("r-1") == [{"rollout_id": "r-1", **row} for row in (rows[2], rows[1], rows[0])]
    store.put_rollout_devices("r-1", [{**rows[1], "state": "failed", "error": "health check failed"}])
    assert store.rollout_devices("r-1")[1]["state"] == "failed"
    assert store.rollout_devices("r-1")[1]["error"] == "health check failed"
    assert [row["state"] for row in store.rollout_devices("r-2")] == ["pending"]
    with pytest.raises(UsageError, match="needs 'wave'"):
        store.put_rollout_devices("r-1", [{"device_id": "q", "state": "pending"}])


# -- sequences -------------------------------------------------------------------------------------------

def test_next_sequences_outnumber_the_stored_and_the_floor(store_url: str, store: Store) -> None:
    assert store.next_sequences({"a": 0, "b": 10}) == {"a": 1, "b": 11}
    assert store.next_sequences({"a": 0}) == {"a": 2}
    assert store.next_sequences({"a": 40, "b": 0}) == {"a": 41, "b": 12}
    assert store.next_sequences({}) == {}
    with Store.open(store_url) as reopened:  # persisted
        assert reopened.next_sequences({"a": 0, "b": 0, "c": 0}) == {"a": 42, "b": 13, "c": 1}


def test_next_sequences_are_atomic_across_threads_and_stores(store_url: str) -> None:
    with Store.open(store_url) as first, Store.open(store_url) as second, ThreadPoolExecutor(4) as pool:
        calls = [pool.submit((first, second)[i % 2].next_sequences, {"d1": 0, "d2": 0}) for i in range(80)]
        got = [call.result() for call in calls]
    assert sorted(answer["d1"] for answer in got) == list(range(1, 81))  # no number handed out twice
    assert sorted(answer["d2"] for answer in got) == list(range(1, 81))


# -- events and telemetry --------------------------------------------------------------------------------

def test_events_newest_first_with_filters(store: Store) -> None:
    store.add_events([
        {"ts": 100.0, "kind": "rollout-started", "rollout_id": "r-1", "deployment": "milan", "data": {"waves": 2}},
        {"ts": 101.0, "kind": "ordered", "device_id": "a", "rollout_id": "r-1", "message": "seq 3"},
        {"ts": 101.0, "kind": "reported", "device_id": "b", "rollout_id": "r-1"},
        {"ts": 102.0, "kind": "gate", "rollout_id": "r-2", "data": {"p95": [1.5, 1.6]}},
    ])
    kinds = [row["kind"] for row in store.events()]
    assert kinds == ["gate", "reported", "ordered", "rollout-started"]  # equal ts: the later one first
    assert [row["kind"] for row in store.events(rollout_id="r-1")] == ["reported", "ordered", "rollout-started"]
    assert [row["kind"] for row in store.events(device_id="a")] == ["ordered"]
    assert [row["kind"] for row in store.events(deployment="milan")] == ["rollout-started"]
    assert [row["kind"] for row in store.events(since=101.0)] == ["gate", "reported", "ordered"]
    assert [row["kind"] for row in store.events(limit=2)] == ["gate", "reported"]
    assert store.events(rollout_id="r-1", device_id="b", since=100.5)[0]["kind"] == "reported"
    started = store.events(deployment="milan")[0]
    assert started["data"] == {"waves": 2} and started["device_id"] is None and isinstance(started["id"], int)
    assert store.events()[0]["data"] == {"p95": [1.5, 1.6]} and store.events(device_id="a")[0]["data"] == {}


def test_telemetry_oldest_first_with_filters(store: Store) -> None:
    sample = {"bundle_sha256": "ef" * 32, "requests": 120, "errors": 2, "p50_ms": 1.5, "p95_ms": 3.25,
              "p99_ms": 7.0, "cpu_percent": 12.5, "memory_rss_mb": 110.25}
    store.add_telemetry([
        {"device_id": "a", "ts": 30.0, "model": "digits", "version": 3, **sample},
        {"device_id": "a", "ts": 10.0, "model": None, "cpu_percent": 4.0},
        {"device_id": "b", "ts": 20.0, "model": "digits", "version": "2024.1", **sample},
        {"device_id": "c", "ts": 40.0, "model": "ocr", "version": 1},
    ])
    everything = store.telemetry(None, since=0)
    assert [(row["device_id"], row["ts"]) for row in everything] == [("a", 10.0), ("b", 20.0), ("a", 30.0),
                                                                      ("c", 40.0)]
    assert everything[2] == {"device_id": "a", "ts": 30.0, "model": "digits", "version": 3, **sample}
    assert everything[1]["version"] == "2024.1" and everything[0]["requests"] is None
    assert [row["ts"] for row in store.telemetry(["a"], since=0)] == [10.0, 30.0]
    assert [row["ts"] for row in store.telemetry(["a", "b"], since=15, until=30)] == [20.0, 30.0]
    assert [row["device_id"] for row in store.telemetry(None, since=0, model="digits")] == ["b", "a"]
    assert store.telemetry([], since=0) == []


def test_prune_deletes_old_telemetry_and_events(store: Store) -> None:
    store.add_telemetry([{"device_id": "a", "ts": float(ts)} for ts in (100, 200, 300)])
    store.add_events([{"ts": float(ts), "kind": "k"} for ts in (150, 250, 350)])
    assert store.prune(150, now=400.0) == 3  # older than 250: telemetry 100, 200; event 150
    assert [row["ts"] for row in store.telemetry(None, since=0)] == [300.0]
    assert [row["ts"] for row in store.events()] == [350.0, 250.0]
    assert store.prune(86400) == 3  # against the clock: the rest is from 1970
    assert store.telemetry(None, since=0) == [] and store.events() == []
    with pytest.raises(UsageError, match="retention must not be negative"):
        store.prune(-1)


def test_size_bytes_grows_with_telemetry(store: Store) -> None:
    before = store.size_bytes()
    assert before > 0
    store.add_telemetry([{"device_id": f"dev-{i}", "ts": float(i), "model": "m", "p95_ms": 1.0} for i in range(5000)])
    assert store.size_bytes() > before


# -- leadership ------------------------------------------------------------------------------------------

def test_exactly_one_of_two_stores_leads(store_url: str) -> None:
    with Store.open(store_url) as first, Store.open(store_url) as second:
        assert first.leader() is None and not first.still_leading()
        assert first.try_lead("controller-a") is True
        assert second.try_lead("controller-b") is False
        assert first.try_lead("controller-a") is True  # still does
        assert first.still_leading() and not second.still_leading()
        leader = second.leader()
        assert leader is not None and leader["holder"] == "controller-a" and leader["since"] <= leader["heartbeat"]
        first.release_lead()
        assert not first.still_leading() and first.leader() is None
        assert second.try_lead("controller-b") is True
        assert first.try_lead("controller-a") is False
        leader = first.leader()
        assert leader is not None and leader["holder"] == "controller-b"
    with Store.open(store_url) as third:  # closing the leader let the lead go
        assert third.try_lead("controller-c") is True


def test_the_leader_heartbeat_is_written(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "_HEARTBEAT_S", 0.0)
    assert store.try_lead("controller-a")
    first = store.leader()
    wait_for(lambda: store.still_leading() and store.leader() != first, "a newer heartbeat")
    now = store.leader()
    assert first is not None and now is not None
    assert now["heartbeat"] > first["heartbeat"] and now["since"] == first["since"]


_LEADER_SCRIPT = """
import sys, time
from packager.control.store import Store
store = Store.open(sys.argv[1])
while not store.try_lead("child"):
    time.sleep(0.05)
print("leading", flush=True)
sys.stdin.read()
"""


def test_a_leader_killed_with_sigkill_loses_the_lead(store_url: str, tmp_path: Path) -> None:
    command = [sys.executable, "-c", _LEADER_SCRIPT, store_url]
    with Store.open(store_url) as standby, subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                            text=True, cwd=tmp_path) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == "leading\n"
            assert standby.try_lead("standby") is False
            leader = standby.leader()
            assert leader is not None and leader["holder"] == "child"
        finally:
            child.kill()  # SIGKILL: no release, no cleanup
        child.wait(timeout=DEADLINE_S)
        wait_for(lambda: standby.try_lead("standby"), "the standby to take the lead")
        leader = standby.leader()
        assert leader is not None and leader["holder"] == "standby" and standby.still_leading()


def test_still_leading_notices_a_lost_session(pg_database: str) -> None:
    with Store.open(pg_database) as first, Store.open(pg_database) as second:
        assert first.try_lead("controller-a")
        with admin_connection() as admin:
            ended = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_locks "
                                  "WHERE locktype = 'advisory' AND granted AND database = "
                                  "(SELECT oid FROM pg_database WHERE datname = %s)",
                                  (pg_database.rpartition("/")[2],)).fetchall()
        assert ended == [(True,)]
        wait_for(lambda: second.try_lead("controller-b"), "the lead to be free")
        assert first.still_leading() is False
        assert first.try_lead("controller-a") is False


def test_a_replaced_lead_file_is_not_a_lead(tmp_path: Path) -> None:
    with Store.open(str(tmp_path / "c.db")) as store:
        assert store.try_lead("controller-a")
        (tmp_path / "c.db.lead").unlink()  # someone else may now lock a new file of that name
        assert store.still_leading() is False
        assert store.try_lead("controller-a") is True


# -- URLs and errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["", "mysql://db.example/x", "sqlite://", "sqlite://host/x.db", "sqlite:x.db",
                                 "postgresql://u@h:notaport/db", "postgresql://h/db?nosuchoption=1"])
def test_a_bad_url_is_a_usage_error_naming_store(url: str) -> None:
    with pytest.raises(UsageError, match=r"^--store: ") as caught:
        Store.open(url)
    assert "\n" not in str(caught.value)


def test_an_unreachable_server_is_one_clear_error() -> None:
    with pytest.raises(StoreUnavailableError) as caught:
        Store.open("postgresql://postgres:hunter2@127.0.0.1:1/x")
    message = str(caught.value)
    assert message.startswith("cannot reach the store at postgresql://postgres@127.0.0.1:1/x (")
    assert "hunter2" not in message and "\n" not in message and "refused" in message


def test_unusable_sqlite_files_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StoreUnavailableError, match=r"^cannot reach the store at sqlite:////.*file/x\.db \("):
        Store.open(str(tmp_path / "file" / "x.db"))
    (tmp_path / "garbage.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(EdgeDeployError, match=r"^cannot use the store at sqlite:////.*garbage\.db \("):
        Store.open(str(tmp_path / "garbage.db"))


def test_sqlite_urls_relative_absolute_and_plain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for url, file in [("sqlite:///rel/one.db", tmp_path / "rel" / "one.db"),
                      (f"sqlite:///{tmp_path / 'two.db'}", tmp_path / "two.db"),
                      ("three.db", tmp_path / "three.db")]:
        with Store.open(url) as store:
            assert store.url == f"sqlite:///{file}"
        assert file.is_file()


def test_the_url_carries_no_password(pg_database: str) -> None:
    with Store.open(pg_database.replace("postgres@", "postgres:s3cret@") + "?password=other") as store:
        assert "s3cret" not in store.url and "other" not in store.url
        assert store.url == pg_database


def test_a_dropped_connection_is_replaced(pg_database: str) -> None:
    with Store.open(pg_database) as store:
        store.upsert_devices([DEVICE])
        with admin_connection() as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                          (pg_database.rpartition("/")[2],))
        failures: list[BaseException] = []
        for _ in range(6):
            try:
                devices = store.devices()
                break
            except StoreUnavailableError as exc:  # the pooled connection that died
                failures.append(exc)
        else:
            pytest.fail(f"the store never reconnected: {failures}")
        assert devices == [DEVICE]
        assert all(str(exc).startswith(f"cannot reach the store at {pg_database} (") for exc in failures)
