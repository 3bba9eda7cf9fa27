"""The controller engine's compact structures, checked against the plain code they stand in for.

At 100,000 devices the engine keeps each report as its bytes plus the fields it acts on
(``_Report``), indexes rollout rows by state (``Rollout.tally`` and ``ids``), stores device JSON
as it arrived (``raw_json``) and reads its broker socket in chunks (``_ReadBuffer``). Each is
compared here with what it replaces: ``model_report`` on the parsed document, a recount of the
rows, ``json.loads``/``dump_json``, and the socket's own bytes.
"""

from __future__ import annotations

import collections
import json
import random
import socket
import threading
import time

import pytest

from edge_agent.fleet_messages import BundleRef, DeployState, DeviceReport, ModelReport, encode_message, parse_message
from packager.control.databases import RawJSON, dump_json, raw_json
from packager.control.engine import Rollout, _from_store, _Report, _row, _to_store
from packager.control.policy import RolloutPolicy
from packager.control.store import Store
from packager.fleet import _ReadBuffer, model_report

SHA = "ab" * 32


def _schema2_report(state: DeployState = DeployState.ACTIVE) -> bytes:
    active = BundleRef("digits", 3, SHA, f"http://bundles/{SHA}.edb", "d-digits-1")
    previous = BundleRef("digits", 2, "cd" * 32, "http://bundles/old.edb", "r-1")
    model = ModelReport("digits", state, "d-digits-1", "d-digits-1", active, previous,
                        "boom" if state == DeployState.FAILED else None, time.time())
    info = {"profile": "cpu-arm64", "groups": ["kitchen"], "tags": {"site": "milan"}, "last_seq": 41,
            "utc_offset_min": 60, "agent_version": "test"}
    return encode_message("reported", DeviceReport("pi-01", {"digits": model}, time.time(), info).to_body())


SCHEMA1_REPORT = json.dumps({
    "schema": 1, "device_id": "old-01", "state": "active", "ts": 1.0, "deployment_id": "r-7",
    "active": {"bundle_sha256": SHA, "bundle_url": "http://bundles/x.edb", "model": {"name": "digits", "version": 1}},
}).encode()


@pytest.mark.parametrize("payload", [_schema2_report(), _schema2_report(DeployState.FAILED), SCHEMA1_REPORT],
                         ids=["schema-2 active", "schema-2 failed", "schema-1"])
def test_a_compact_report_answers_as_model_report_on_the_parsed_document(payload: bytes) -> None:
    body = parse_message("reported", payload)
    report = _Report(payload, body)
    for name in ("digits", "absent"):
        expected, got = model_report(body, name), report.model(name)
        if expected is None:
            assert got is None
            continue
        assert got is not None
        assert (got.name, got.state, got.deployment_id, got.error, got.active) == \
            (expected.name, expected.state, expected.deployment_id, expected.error, expected.active)
    assert report.body() == body
    assert report.last_seq == (body.get("last_seq") if isinstance(body.get("last_seq"), int) else -1)
    assert report.utc_offset_min == body.get("utc_offset_min", 0)
    assert (report.profile, report.groups, report.tags) == (body.get("profile"), body.get("groups") or [],
                                                            body.get("tags") or {})


def test_a_report_with_odd_fields_is_kept_without_its_digest() -> None:
    body = {"schema": 2, "device_id": "x", "ts": 1.0, "state": "idle", "models": {"m": "not an object"},
            "last_seq": True, "utc_offset_min": 99999, "groups": "kitchen", "tags": ["a"]}
    report = _Report(json.dumps(body).encode(), body)
    assert report.model("m") is None and report.last_seq == -1 and report.utc_offset_min == 0
    assert report.groups == [] and report.tags == {} and report.body() == body


def test_the_rollout_index_matches_a_recount_after_random_steps() -> None:
    rng = random.Random(7)
    policy = RolloutPolicy.from_options().to_dict()
    rows = {f"d{i:03d}": _row(f"d{i:03d}", i % 4) for i in range(200)}
    rollout = Rollout({"rollout_id": "r-1", "policy": policy, "state": "running", "waves": 4, "current_wave": 0,
                       "created": 0.0,
                       "target": {"bundle_sha256": SHA, "bundle_url": "http://b", "model": {"name": "m"}}}, rows)
    states = ["pending", "updating", "succeeded", "failed", "moved", "rolled-back"]
    for step in range(3000):
        device = f"d{rng.randrange(250):03d}"  # now and then one that has no row yet
        if device not in rollout.rows or step % 50 == 0:
            rollout.put(device, _row(device, rng.randrange(-1, 4), rng.choice(states)))
        elif step % 7 == 0:
            rollout.set(device, wave=rng.randrange(4))
        else:
            rollout.set(device, state=rng.choice(states), ordered_at=time.time())
    recount = collections.Counter((row["wave"], row["state"]) for row in rollout.rows.values())
    assert +rollout.tally == recount
    for state in states:
        assert sorted(rollout.ids(state)) == sorted(d for d, row in rollout.rows.items() if row["state"] == state)
        assert rollout.count(state) == sum(1 for row in rollout.rows.values() if row["state"] == state)
        assert rollout.count(state, upto=1) == sum(1 for row in rollout.rows.values()
                                                   if row["state"] == state and 0 <= row["wave"] <= 1)
    status = rollout.status()
    assert status["targeted"] == sum(1 for row in rollout.rows.values() if row["state"] != "moved")
    assert [w["size"] for w in status["waves"]] == [sum(1 for row in rollout.rows.values() if row["wave"] == i)
                                                    for i in range(4)]


@pytest.mark.parametrize(("payload", "stored"), [
    (b'{"a":"caf\xc3\xa9","n":[1,2.5]}', True),
    (b'{"a":"\\u00e9 and \\ud83d\\ude00"}', False),  # a surrogate pair: rechecked the slow way
    (b'{"a":"nul \\u0000 here"}', False),
    (b'{"a":"lone \\uDC00"}', False),
    (b'{"a":"\xff"}', False),  # not UTF-8
])
def test_raw_json_passes_only_what_both_databases_store_unchanged(payload: bytes, stored: bool) -> None:
    text = raw_json(payload)
    assert (text is not None) is stored
    if text is not None:
        assert isinstance(text, RawJSON) and dump_json(text) == payload.decode() and json.loads(text) == \
            json.loads(payload)


def test_a_device_row_goes_to_the_store_as_the_device_sent_it_and_comes_back(store_url: str) -> None:
    payload = _schema2_report()
    body = parse_message("reported", payload)
    hostile = json.dumps({**body, "error": "nul \u0000 and lone \ud800"}).encode()
    rows = [{"device_id": "pi-01", "online": True, "profile": "cpu-arm64", "groups": ["kitchen"],
             "tags": {"site": "milan"}, "status": {"online": True}, "last_seen": 2.0, "first_seen": 1.0,
             "report": _Report(payload, body)},
            {"device_id": "pi-02", "online": False, "groups": [], "tags": {}, "status": {},
             "report": _Report(hostile, json.loads(hostile))}]
    with Store.open(store_url) as store:
        store.upsert_devices([_to_store(row) for row in rows])
        back = {row["device_id"]: _from_store(row) for row in store.devices(reported_as_text=True)}
        decoded = {row["device_id"]: row for row in store.devices()}
    assert back["pi-01"]["report"].body() == body == decoded["pi-01"]["reported"]
    assert back["pi-01"]["report"].model("digits") is not None
    cleaned = back["pi-02"]["report"].body()["error"]
    assert "\x00" not in cleaned and "\ud800" not in cleaned and cleaned.startswith("nul ")


def test_the_read_buffer_hands_out_the_sockets_bytes_in_any_pieces() -> None:
    left, right = socket.socketpair()
    try:
        right.setblocking(False)
        buffered = _ReadBuffer(right)
        with pytest.raises(BlockingIOError):
            buffered.recv(1)
        data = bytes(range(256)) * 1000  # more than the socket buffers: sent while it is read
        sender = threading.Thread(target=left.sendall, args=(data,))
        sender.start()
        got = bytearray()
        sizes = [1, 1, 2, 300, 70000, 5]
        while len(got) < len(data):
            try:
                chunk = buffered.recv(sizes[len(got) % len(sizes)])
            except BlockingIOError:
                time.sleep(0.01)
                continue
            assert chunk
            got += chunk
            assert buffered.pending() == buffered.buffered()  # a plain socket has nothing pending of its own
        sender.join()
        assert bytes(got) == data and buffered.buffered() == 0
        assert buffered.fileno() == right.fileno()  # everything else is the socket's
        left.close()
        assert buffered.recv(10) == b""  # closed: paho sees the connection lost
    finally:
        right.close()
