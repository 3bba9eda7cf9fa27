"""The controller's HTTP API and the CLI through it, against a real controller, Mosquitto and edge agents.

One controller (SQLite store, bearer tokens) and one broker for the whole module; two real agents,
one in Milan and one in Rome. The tests run in file order and build on what the fleet did before
(a deployment converges, then a rollout, then its events), as a user's session would.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from schemathesis.specs.openapi.definitions import OPENAPI_31

from packager.control.api import API_PREFIX
from tests.controller_env import TOKEN, ControllerFleet, controller_fleet, wait_for

pytestmark = pytest.mark.e2e

MILAN, ROME = "cam-milan-1", "cam-rome-1"
DEVICES = [{"device_id": MILAN, "groups": ["kitchen"], "tags": {"site": "milan"}},
           {"device_id": ROME, "groups": ["hall"], "tags": {"site": "rome"}}]
SECOND_TOKEN = "another-token-for-ci-0123456789"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerFleet]:
    with controller_fleet(tmp_path_factory.mktemp("control-api"), DEVICES, [TOKEN, SECOND_TOKEN]) as running:
        yield running


def _model_on(fleet: ControllerFleet, device_id: str, name: str) -> dict[str, Any] | None:
    row = fleet.get(f"{API_PREFIX}/devices/{device_id}")
    return next((m for m in row.get("models") or [] if m["name"] == name), None)


# --- the document and auth -------------------------------------------------------------------------------


def test_the_openapi_document_is_valid_3_1_and_names_every_route(fleet: ControllerFleet) -> None:
    status, doc = fleet.api("GET", "/openapi.json", token=None)  # open: it describes, it shows no data
    assert status == 200
    assert doc["openapi"] == "3.1.0"
    assert list(jsonschema.Draft202012Validator(OPENAPI_31).iter_errors(doc)) == []
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    api = {p.removeprefix(API_PREFIX) for p in doc["paths"] if p.startswith(API_PREFIX)}
    assert api == {"/devices", "/devices/{device_id}", "/devices/{device_id}/logs", "/devices/{device_id}/restart",
                   "/devices/{device_id}/config",
                   "/config", "/deployments", "/deployments/{name}", "/rollouts", "/rollouts/{rollout_id}",
                   "/rollouts/{rollout_id}/abort", "/events", "/telemetry", "/health"}
    assert doc["security"] == [{"bearer": []}]


def _operations(fleet: ControllerFleet) -> list[tuple[str, str]]:
    doc = fleet.get("/openapi.json", token=None)
    filled = {"device_id": MILAN, "name": "nothing", "rollout_id": "r-nothing"}
    return [(method.upper(), re.sub(r"\{(\w+)\}", lambda m: filled[m.group(1)], path))
            for path, item in doc["paths"].items() if path.startswith(API_PREFIX) for method in item]


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789abcdef", "Basic " + TOKEN])
def test_every_api_route_refuses_a_request_without_a_valid_token(fleet: ControllerFleet, token: str | None) -> None:
    headers = {"Authorization": token} if token and token.startswith("Basic") else None
    for method, path in _operations(fleet):
        status, doc = fleet.api(method, path, body={} if method == "POST" else None,
                                token=None if headers else token, headers=headers)
        assert status == 401, (method, path, status, doc)
        assert "token" in doc["error"] and "\n" not in doc["error"]


def test_each_token_of_the_file_opens_the_api(fleet: ControllerFleet) -> None:
    for token in (TOKEN, SECOND_TOKEN):
        health = fleet.get(f"{API_PREFIX}/health", token=token)
        assert health["leader"] is True and health["connected"] is True
        assert health["broker"] == fleet.broker.url


# --- devices ---------------------------------------------------------------------------------------------


def test_devices_are_listed_filtered_by_a_condition_sorted_and_paged(fleet: ControllerFleet) -> None:
    every = fleet.get(f"{API_PREFIX}/devices")
    assert every["total"] == 2 and [d["device_id"] for d in every["devices"]] == [MILAN, ROME]
    row = every["devices"][0]
    assert row["online"] is True and row["tags"] == {"site": "milan"} and row["groups"] == ["kitchen"]
    assert row["profile"] == "cpu-x86_64"
    milan = fleet.get(f"{API_PREFIX}/devices?q=tags.site+%3D+%27milan%27")
    assert [d["device_id"] for d in milan["devices"]] == [MILAN] and milan["total"] == 1
    hall = fleet.get(f"{API_PREFIX}/devices?q=%27hall%27+IN+groups")
    assert [d["device_id"] for d in hall["devices"]] == [ROME]
    backwards = fleet.get(f"{API_PREFIX}/devices?sort=-device_id")
    assert [d["device_id"] for d in backwards["devices"]] == [ROME, MILAN]
    second = fleet.get(f"{API_PREFIX}/devices?sort=device_id&limit=1&offset=1")
    assert [d["device_id"] for d in second["devices"]] == [ROME] and second["total"] == 2


@pytest.mark.parametrize(("query", "field"), [
    ("q=tags.site+%3D", "q"), ("q=tags.site+%3D%3D+%27x%27", "q"), ("sort=password", "sort"),
    ("limit=0", "limit"), ("limit=many", "limit"), ("offset=-1", "offset"),
])
def test_a_bad_device_query_is_a_400_naming_the_parameter(fleet: ControllerFleet, query: str, field: str) -> None:
    status, doc = fleet.api("GET", f"{API_PREFIX}/devices?{query}")
    assert status == 400, doc
    assert doc["error"].startswith(f"{field}: ") and "\n" not in doc["error"]


def test_one_device_and_an_unknown_one(fleet: ControllerFleet) -> None:
    row = fleet.get(f"{API_PREFIX}/devices/{ROME}")
    assert row["device_id"] == ROME and isinstance(row["reported"], dict)
    assert row["reported"]["device_id"] == ROME
    status, doc = fleet.api("GET", f"{API_PREFIX}/devices/nobody-here")
    assert status == 404 and "nobody-here" in doc["error"]


# --- bodies ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "status", "words"), [
    (b"{not json", 400, "not valid JSON"),
    (b"[" * 5000 + b"]" * 5000, 400, "deeper than"),
    (b'{"n": 1e400}', 400, "out of range"),
    (b"[1, 2]", 400, "is not of type 'object'"),
    (b'{"name": "x", "bundle_sha256": "00", "bundle_url": "http://h/b", "model": {"name": "m"}, "target": "*"}',
     400, "bundle_sha256"),
    (b'{"name": "a b", "bundle_sha256": "' + b"0" * 64 + b'", "bundle_url": "http://h/b", "model": {"name": "m"},'
     b' "target": "*"}', 400, "name"),
    (b'{"name": "x", "bundle_sha256": "' + b"0" * 64 + b'", "bundle_url": "http://h/b", "model": {"name": 5},'
     b' "target": "*"}', 400, "model.name"),
    (b'{"name": "x", "bundle_sha256": "' + b"0" * 64 + b'", "bundle_url": "http://h/b", "model": {"name": "m"},'
     b' "target": "*", "priorty": 3}', 400, "'priorty' was unexpected"),
    (b'{"name": "x", "bundle_sha256": "' + b"0" * 64 + b'", "bundle_url": "http://h/b", "model": {"name": "m"},'
     b' "target": "tags.site = "}', 400, "target"),
    (b'{"name": "x", "bundle_sha256": "' + b"0" * 64 + b'", "bundle_url": "http://h/b", "model": {"name": "m"},'
     b' "target": "*", "policy": {"rate": "fast"}}', 400, "--rate"),
    (b'{"pad": "' + b"x" * (1 << 20) + b'"}', 413, "over the limit"),
])
def test_a_bad_deployment_body_is_one_line_naming_the_field(fleet: ControllerFleet, raw: bytes, status: int,
                                                             words: str) -> None:
    got, doc = fleet.api("POST", f"{API_PREFIX}/deployments", raw=raw)
    assert got == status, doc
    assert words in doc["error"] and "\n" not in doc["error"] and "Traceback" not in doc["error"]
    assert fleet.get(f"{API_PREFIX}/deployments")["deployments"] == []  # nothing was half made


def test_unknown_paths_and_methods_answer_json(fleet: ControllerFleet) -> None:
    assert fleet.api("GET", f"{API_PREFIX}/nothing") == (404, {"error": f"no such path: {API_PREFIX}/nothing"})
    status, doc = fleet.api("PUT", f"{API_PREFIX}/deployments", body={})
    assert status == 405 and "GET" in doc["error"] and "POST" in doc["error"]


# --- deployments, rollouts, events, telemetry ------------------------------------------------------------


def test_a_deployment_converges_its_target_and_leaves_the_rest(fleet: ControllerFleet) -> None:
    spec = {"name": "scorer-milan", **fleet.spec("scorer", 1), "target": "tags.site = 'milan'", "priority": 5,
            "policy": {"canary": "1", "wave": "50%"}}
    status, made = fleet.api("POST", f"{API_PREFIX}/deployments", body=spec)
    assert status == 201, made
    assert made["name"] == "scorer-milan" and made["target"] == "tags.site = 'milan'" and made["priority"] == 5

    def applied() -> dict[str, Any] | None:
        doc = fleet.get(f"{API_PREFIX}/deployments/scorer-milan")
        return doc if doc["applied"] == 1 else None

    doc = wait_for(applied, "the Milan device to run the deployment's bundle")
    assert doc["targeted"] == 1 and doc["failed"] == 0 and doc["bundle_sha256"] == spec["bundle_sha256"]
    assert (_model_on(fleet, MILAN, "scorer") or {}).get("version") == 1
    assert _model_on(fleet, ROME, "scorer") is None
    assert fleet.get(f"{API_PREFIX}/devices/{MILAN}")["deployments"] == {"scorer": "scorer-milan"}
    assert [d["name"] for d in fleet.get(f"{API_PREFIX}/deployments")["deployments"]] == ["scorer-milan"]


def test_logs_config_and_restart_are_answered_by_the_device(fleet: ControllerFleet) -> None:
    status, logs = fleet.api("GET", f"{API_PREFIX}/devices/{MILAN}/logs?tail=5")
    assert status == 200, logs
    assert 1 <= len(logs["lines"]) <= 5 and all(isinstance(line, str) for line in logs["lines"])
    status, doc = fleet.api("POST", f"{API_PREFIX}/config",
                            body={"device": MILAN, "model": "scorer", "params": {"threshold": 0.7}})
    assert status == 200, doc
    assert doc["results"][MILAN]["params"]["threshold"] == 0.7
    status, doc = fleet.api("POST", f"{API_PREFIX}/config",
                            body={"selector": "tags.site = 'milan'", "model": "scorer", "params": {"mode": "fast"}})
    assert status == 200 and set(doc["results"]) == {MILAN}, doc
    assert doc["results"][MILAN]["params"] == {"threshold": 0.7, "mode": "fast"}
    status, doc = fleet.api("POST", f"{API_PREFIX}/devices/{MILAN}/restart", body={"model": "scorer"})
    assert status == 200 and doc["model"] == "scorer" and doc["version"] == 1, doc
    for body, code, words in (({"selector": "tags.site = ", "model": "scorer", "params": {"a": 1}}, 400, "selector: "),
                              ({"selector": "tags.site = 'oslo'", "model": "scorer", "params": {"a": 1}}, 404,
                               "selector: no device matches"),
                              ({"device": MILAN, "selector": "all", "model": "scorer", "params": {"a": 1}}, 400,
                               "exactly one of 'device' and 'selector'"),
                              ({"device": MILAN, "model": "scorer", "params": {}}, 400, "params")):
        status, doc = fleet.api("POST", f"{API_PREFIX}/config", body=body)
        assert status == code and words in doc["error"], (body, doc)
    status, doc = fleet.api("GET", f"{API_PREFIX}/devices/{MILAN}/config?model=scorer")
    assert status == 200 and doc["params"] == {"threshold": 0.7, "mode": "fast"}, doc
    assert fleet.api("GET", f"{API_PREFIX}/devices/{MILAN}/config")[0] == 400
    status, doc = fleet.api("GET", f"{API_PREFIX}/devices/{MILAN}/logs?tail=0")
    assert status == 400 and doc["error"].startswith("tail: ")
    assert fleet.api("GET", f"{API_PREFIX}/devices/nobody/logs")[0] == 404


def test_a_rollout_through_the_api_runs_waves_and_its_events_name_it(fleet: ControllerFleet) -> None:
    spec = {**fleet.spec("detector", 3), "selector": "all", "policy": {"canary": "1", "wave": "1"}}
    status, started = fleet.api("POST", f"{API_PREFIX}/rollouts", body=spec)
    assert status == 201, started
    rollout_id = started["rollout_id"]
    assert started["state"] == "running" and len(started["waves"]) == 2

    def finished() -> dict[str, Any] | None:
        doc = fleet.get(f"{API_PREFIX}/rollouts/{rollout_id}")
        return doc if doc["state"] not in ("running", "rolling-back") else None

    doc = wait_for(finished, "the rollout to finish", 120)
    assert (doc["state"], doc["succeeded"], doc["failed"], doc["pending"]) == ("succeeded", 2, 0, 0), doc
    assert [(w["succeeded"], w["pending"]) for w in doc["waves"]] == [(1, 0), (1, 0)]
    detail = fleet.get(f"{API_PREFIX}/rollouts/{rollout_id}?devices=true")
    assert set(detail["devices"]) == {MILAN, ROME} and "devices" not in doc
    assert rollout_id in [r["rollout_id"] for r in fleet.get(f"{API_PREFIX}/rollouts")["rollouts"]]
    events = fleet.get(f"{API_PREFIX}/events?rollout={rollout_id}")["events"]
    assert events and all(e["rollout_id"] == rollout_id for e in events)
    status, doc = fleet.api("POST", f"{API_PREFIX}/rollouts/{rollout_id}/abort")
    assert status == 409 and "already ended" in doc["error"]
    assert fleet.api("GET", f"{API_PREFIX}/rollouts/r-none")[0] == 404


def test_events_filter_and_telemetry_of_a_device_and_a_deployment(fleet: ControllerFleet) -> None:
    events = fleet.get(f"{API_PREFIX}/events?deployment=scorer-milan&limit=5")["events"]
    assert 1 <= len(events) <= 5 and all(e["deployment"] == "scorer-milan" for e in events)
    assert [e["ts"] for e in events] == sorted((e["ts"] for e in events), reverse=True)

    def samples() -> list[dict[str, Any]] | None:
        rows = fleet.get(f"{API_PREFIX}/telemetry?device={ROME}")["rows"]
        return rows if len([r for r in rows if r.get("cpu_percent") is not None]) >= 2 else None

    rows = wait_for(samples, "two telemetry samples of the Rome device")
    assert {r["device_id"] for r in rows} == {ROME}
    assert all(r["memory_rss_mb"] > 0 for r in rows if r.get("model") is None)
    newest = max(r["ts"] for r in rows)
    later = fleet.get(f"{API_PREFIX}/telemetry?device={ROME}&since={newest + 3600}")["rows"]
    assert later == []
    assert isinstance(fleet.get(f"{API_PREFIX}/telemetry?deployment=scorer-milan")["rows"], list)
    for query, field in (("device=x&deployment=y", "device, deployment"), ("", "device, deployment"),
                         (f"device={ROME}&since=soon", "since"), (f"device={ROME}&since=10&until=5", "until")):
        status, doc = fleet.api("GET", f"{API_PREFIX}/telemetry?{query}")
        assert status == 400 and doc["error"].startswith(field), doc
    assert fleet.api("GET", f"{API_PREFIX}/telemetry?device=nobody")[0] == 404


# --- the console's login ---------------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _raw(url: str, data: bytes | None = None, cookie: str | None = None) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url, data=data, headers={"Cookie": cookie} if cookie else {})
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def test_the_console_needs_a_login_and_its_cookie_is_not_the_token(fleet: ControllerFleet) -> None:
    status, headers, _ = _raw(fleet.url + "/")
    assert status == 303 and headers["Location"] in ("/login?next=/", "/login?next=%2F")
    status, _, page = _raw(fleet.url + "/login", b"token=wrong-token-0123456789&next=%2F")
    assert status == 401 and "wrong token" in page
    status, headers, _ = _raw(fleet.url + "/login", f"token={TOKEN}&next=%2Fdeployments".encode())
    assert status == 303 and headers["Location"] == "/deployments"
    cookie = SimpleCookie(headers["Set-Cookie"])
    morsel = next(iter(cookie.values()))
    assert morsel["httponly"] and morsel["samesite"] == "Strict"
    assert TOKEN not in morsel.value and len(morsel.value) == 64
    session = f"{morsel.key}={morsel.value}"
    status, _, page = _raw(fleet.url + "/", cookie=session)
    assert status == 200 and MILAN in page and ROME in page
    status, _, body = _raw(fleet.url + f"{API_PREFIX}/devices", cookie=session)  # the console's script reads
    assert status == 200 and json.loads(body)["total"] == 2
    status, _, body = _raw(fleet.url + f"{API_PREFIX}/rollouts/r-x/abort", b"{}", cookie=session)
    assert status == 401  # ...but a cookie changes nothing: that takes a bearer token
    status, _, _ = _raw(fleet.url + "/", cookie=f"{morsel.key}={morsel.value[:-1]}0")
    assert status == 303
    status, headers, _ = _raw(fleet.url + "/login", f"token={TOKEN}&next=https://evil.example/".encode())
    assert headers["Location"] == "/"  # a login never bounces the browser elsewhere


# --- the CLI through the controller ----------------------------------------------------------------------


def test_fleet_devices_prints_the_same_shape_through_the_controller_as_on_the_broker(fleet: ControllerFleet) -> None:
    through = fleet.cli("fleet", "devices", "--json")
    direct = fleet.cli("fleet", "devices", "--json", controller=False)
    assert through.returncode == 0 and direct.returncode == 0, through.stderr + direct.stderr
    remote, local = json.loads(through.stdout), json.loads(direct.stdout)
    assert [r["device_id"] for r in remote] == [r["device_id"] for r in local] == [MILAN, ROME]
    assert [set(r) for r in remote] == [set(r) for r in local]
    assert [(r["online"], r["tags"], r["groups"]) for r in remote] == [(r["online"], r["tags"], r["groups"])
                                                                        for r in local]
    table = fleet.cli("fleet", "devices").stdout.splitlines()
    assert table[0].split()[:3] == ["DEVICE_ID", "ONLINE", "STATE"] and len(table) == 3


def test_fleet_logs_config_and_restart_through_the_controller(fleet: ControllerFleet) -> None:
    logs = fleet.cli("fleet", "logs", MILAN, "--tail", "3")
    assert logs.returncode == 0 and 1 <= len(logs.stdout.splitlines()) <= 3, logs.stderr
    assert fleet.cli("fleet", "config", MILAN, "scorer", "level=3").stdout.startswith(f"{MILAN}: scorer {{")
    shown = fleet.cli("fleet", "config", MILAN, "scorer")
    assert shown.returncode == 0 and json.loads(shown.stdout)["level"] == 3, shown.stderr
    fanned = fleet.cli("fleet", "config", "tag:site=milan", "scorer", "level=4")
    assert fanned.returncode == 0 and fanned.stdout.splitlines() == [
        f"{MILAN}: scorer " + json.dumps(json.loads(shown.stdout) | {"level": 4}, sort_keys=True)], fanned.stdout
    restarted = fleet.cli("fleet", "restart", MILAN, "scorer")
    assert restarted.returncode == 0 and restarted.stdout.startswith(f"{MILAN}: scorer restarted"), restarted.stderr
    gone = fleet.cli("fleet", "logs", "nobody")
    assert gone.returncode != 0 and gone.stderr.count("\n") == 1 and "nobody" in gone.stderr, gone.stderr


def test_fleet_deploy_deployments_and_undeploy(fleet: ControllerFleet) -> None:
    bundle = fleet.bundle("scorer", 2)
    made = fleet.cli("fleet", "deploy", "scorer-rome", str(bundle), "--target", "tags.site = 'rome'",
                     "--priority", "3", "--canary", "0", "--wave", "100%", "--max-failures", "50%", "--json")
    assert made.returncode == 0, made.stderr
    doc = json.loads(made.stdout)
    assert doc["name"] == "scorer-rome" and doc["priority"] == 3 and doc["model"] == {"name": "scorer", "version": 2}
    published = fleet.home / "bundles" / f"{doc['bundle_sha256']}.edb"
    assert published.read_bytes() == bundle.read_bytes()  # the bundle server folder holds it
    wait_for(lambda: (_model_on(fleet, ROME, "scorer") or {}).get("version") == 2, "Rome to run scorer v2")

    listed = json.loads(fleet.cli("fleet", "deployments", "--json").stdout)
    rows = {d["name"]: d for d in listed}
    assert "scorer-rome" in rows
    assert {k: rows["scorer-rome"][k] for k in ("target", "priority", "targeted", "applied", "failed")} == \
        {"target": "tags.site = 'rome'", "priority": 3, "targeted": 1, "applied": 1, "failed": 0}
    table = fleet.cli("fleet", "deployments").stdout.splitlines()
    assert table[0].split() == ["NAME", "TARGET", "PRIORITY", "MODEL", "TARGETED", "APPLIED", "FAILED", "ROLLOUT_ID"]
    assert any(line.startswith("scorer-rome") and "scorer:2" in line for line in table)

    gone = fleet.cli("fleet", "undeploy", "scorer-rome")
    assert gone.returncode == 0 and gone.stdout.startswith("deployment scorer-rome: removed"), gone.stderr
    assert fleet.api("GET", f"{API_PREFIX}/deployments/scorer-rome")[0] == 404
    wait_for(lambda: (_model_on(fleet, ROME, "scorer") or {"state": "idle"})["state"] == "idle",
             "Rome to remove the undeployed model")
    again = fleet.cli("fleet", "undeploy", "scorer-rome")
    assert again.returncode == 1 and again.stderr.startswith("error: no deployment 'scorer-rome'")


def test_fleet_rollout_wait_and_status_through_the_controller(fleet: ControllerFleet) -> None:
    bundle = fleet.bundle("detector", 4)
    plain = fleet.cli("fleet", "rollout", str(bundle), "--to", "all", "--canary", "1", "--wave", "1", "--wait")
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.splitlines()
    rollout_id = lines[-4].split()[1].rstrip(":")
    assert lines[-4] == f"rollout {rollout_id}: succeeded  succeeded 2  failed 0  pending 0"
    assert lines[-3].split() == ["INDEX", "SUCCEEDED", "FAILED", "PENDING", "ROLLED_BACK"]
    progress = lines[:-4]  # stdout is a pipe: one plain line per change, no escape codes
    assert progress and all(line.startswith(f"rollout {rollout_id}: ") for line in progress)
    assert "\x1b" not in plain.stdout
    status = fleet.cli("fleet", "status", rollout_id, "--json")
    doc = json.loads(status.stdout)
    assert {"rollout_id", "state", "succeeded", "failed", "pending", "waves", "devices"} <= set(doc)
    assert (doc["rollout_id"], doc["state"], doc["succeeded"]) == (rollout_id, "succeeded", 2)
    listed = fleet.cli("fleet", "status").stdout
    assert rollout_id in listed and listed.splitlines()[0].split()[:2] == ["ROLLOUT_ID", "STATE"]
    watched = fleet.cli("fleet", "status", rollout_id, "--watch", "--json")
    assert json.loads(watched.stdout)["rollout_id"] == rollout_id  # --json: the final document only
    aborted = fleet.cli("fleet", "abort", rollout_id)
    assert aborted.returncode == 1 and aborted.stderr.startswith(f"error: rollout {rollout_id} already ended")


def _read_terminal(fd: int, proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """Everything a child writes to its terminal until it exits (killed after ``timeout`` seconds)."""
    output, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        try:
            chunk = os.read(fd, 65536) if ready else b""
        except OSError:  # the child closed the terminal
            break
        output += chunk
        if not ready and proc.poll() is not None:
            break
    else:
        proc.kill()
    return output


def test_fleet_status_watch_on_a_terminal_redraws_bars_in_place(fleet: ControllerFleet) -> None:
    done = [r for r in fleet.get(f"{API_PREFIX}/rollouts")["rollouts"] if r["state"] == "succeeded"
            and r["rollout_id"].startswith("r-")]
    assert done, "the rollouts of the tests before"
    rollout_id = done[-1]["rollout_id"]
    leader, follower = pty.openpty()
    env = fleet.env(EDGEDEPLOY_CONTROLLER=fleet.url, EDGEDEPLOY_CONTROLLER_TOKEN=TOKEN)
    proc = subprocess.Popen([sys.executable, "-m", "packager.cli.main", "fleet", "status", rollout_id, "--watch"],
                            stdout=follower, stderr=subprocess.DEVNULL, env=env)
    os.close(follower)
    try:
        text = _read_terminal(leader, proc, 120).decode()
    finally:
        os.close(leader)
    assert proc.wait(30) == 0, text
    assert "wave 0 canary" in text and "[" + "#" * 30 + "]" in text  # the live block with full bars...
    assert "\x1b[2K" in text and "\x1b[0J" in text  # ...drawn in place, then erased for the final table
    assert f"rollout {rollout_id}: succeeded" in text


@pytest.mark.parametrize(("args", "code", "words"), [
    (["fleet", "deploy", "x", "{bundle}", "--target", "tags.site = "], 2, "--target: "),
    (["fleet", "deploy", "x", "{bundle}", "--target", "*", "--rate", "fast"], 2, "--rate: "),
    (["fleet", "deploy", "x", "{bundle}", "--target", "*", "--window", "25:00-26:00"], 2, "--window: "),
    (["fleet", "deploy", "x", "{bundle}", "--target", "*", "--gate", "p95<=lots"], 2, "--gate: "),
    (["fleet", "deploy", "x", "/no/such.edb", "--target", "*"], 1, "bundle not found"),
    (["fleet", "status", "--watch"], 2, "--watch needs a ROLLOUT_ID"),
])
def test_bad_cli_input_through_the_controller_is_one_error_line(fleet: ControllerFleet, args: list[str], code: int,
                                                                 words: str) -> None:
    bundle = str(fleet.bundle("scorer", 1))
    result = fleet.cli(*(bundle if a == "{bundle}" else a for a in args))
    assert result.returncode == code, result.stderr
    assert result.stderr.startswith("error: ") and words in result.stderr and result.stderr.count("\n") == 1
    assert "x" not in [d["name"] for d in fleet.get(f"{API_PREFIX}/deployments")["deployments"]]


def test_without_a_controller_the_declarative_commands_say_so(fleet: ControllerFleet) -> None:
    for args in (["deploy", "x", "b.edb", "--target", "*"], ["deployments"], ["undeploy", "x"]):
        result = fleet.cli("fleet", *args, controller=False)
        assert result.returncode == 2
        assert result.stderr == f"error: fleet {args[0]} needs a controller: set --controller URL or " \
                                "$EDGEDEPLOY_CONTROLLER (edgedeploy controller runs one)\n"


def test_a_wrong_token_or_a_dead_controller_is_one_line(fleet: ControllerFleet, tmp_path: Path) -> None:
    wrong = fleet.cli("fleet", "devices", EDGEDEPLOY_CONTROLLER_TOKEN="wrong-token-0123456789abc")
    assert wrong.returncode == 1 and wrong.stderr.startswith("error: missing or invalid token")
    assert "--token-file" in wrong.stderr and wrong.stderr.count("\n") == 1
    token_file = tmp_path / "token"
    token_file.write_text(SECOND_TOKEN + "\n")
    through_file = fleet.cli("fleet", "--token-file", str(token_file), "devices", EDGEDEPLOY_CONTROLLER_TOKEN="")
    assert through_file.returncode == 0 and MILAN in through_file.stdout, through_file.stderr
    from tests.e2e.conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    result = fleet.cli("fleet", "devices", "--controller", dead)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot reach the controller at {dead} (") and \
        result.stderr.endswith("is it running? (edgedeploy controller)\n")
