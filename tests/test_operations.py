"""The device side of requests (edge_agent/operations.py, edge_agent/logring.py): what a device runs,
answers or ignores, remembers across restarts, and how parameters and log lines are kept.

The same behaviour across a real broker and real agents is in tests/e2e/test_fleet_ops.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import NotFoundError, UnavailableError, ValidationError
from edge_agent.fleet_messages import (
    MAX_MESSAGE_BYTES,
    OperationRequest,
    OperationResponse,
    encode_message,
    parse_message,
)
from edge_agent.logring import LogRing
from edge_agent.operations import (
    MAX_PARAMS_BYTES,
    MAX_REQUEST_TTL_S,
    ModelParams,
    Operations,
    RequestGuard,
    RequestIgnored,
    RequestRefused,
)
from edge_agent.orders import sign_order
from edge_agent.trust import ORDERS, TrustStore
from packager.keys import SigningKey, export_public_key, load_order_key

NOW = 1_800_000_000.0


def request(request_id: str = "q-1", device_id: str = "pi-1", expires: float | None = NOW + 60,
            **fields: Any) -> dict[str, Any]:
    body = OperationRequest(request_id, "config", device_id, expires, "scorer", {"params": {"t": 1}}).to_body()
    return {"schema": 2, **body, **fields}


@pytest.fixture
def guard(signing_key: SigningKey, tmp_path: Path) -> RequestGuard:
    export_public_key(tmp_path / "device.pub")
    trust = TrustStore.from_files([tmp_path / "device.pub"], role=ORDERS)
    return RequestGuard("pi-1", trust, tmp_path / "data" / "requests.json", clock=lambda: NOW)


def test_a_signed_current_request_runs_once_even_after_a_restart(guard: RequestGuard) -> None:
    signed = sign_order(request(), load_order_key())
    accepted = guard.check(signed)
    assert (accepted.op, accepted.model, accepted.args) == ("config", "scorer", {"params": {"t": 1}})
    with pytest.raises(RequestRefused, match=r"refused request q-1: replayed") as refused:
        guard.check(signed)
    assert refused.value.request_id == "q-1"
    restarted = RequestGuard("pi-1", guard.trust, guard.state_file, clock=lambda: NOW)
    with pytest.raises(RequestRefused, match="replayed"):
        restarted.check(signed)
    later = RequestGuard("pi-1", guard.trust, guard.state_file, clock=lambda: NOW + 3600)
    assert later.check(sign_order(request("q-2", expires=NOW + 3660), load_order_key())).request_id == "q-2"
    assert json.loads(guard.state_file.read_text())["seen"] == {"q-2": NOW + 3660}  # q-1 expired: forgotten


@pytest.mark.parametrize("case, reason", [
    ("unsigned", r"ignored request q-1: unsigned \(requests must carry the controller.s signature\)"),
    ("publisher", "not a controller key"),
    ("altered", "signature does not match"),
    ("other-device", "ignored request q-1: addressed to 'pi-2', not to this device"),
    ("bad-id", "ignored request: invalid request id"),
])
def test_requests_not_from_this_devices_controller_are_ignored(guard: RequestGuard, signing_key: SigningKey,
                                                                case: str, reason: str) -> None:
    key = load_order_key()
    message = {
        "unsigned": request(),
        "publisher": sign_order(request(), signing_key),
        "altered": {**sign_order(request(), key), "args": {"params": {"t": 2}}},
        "other-device": sign_order(request(device_id="pi-2"), key),
        "bad-id": sign_order(request(request_id="a b/c"), key),
    }[case]
    with pytest.raises(RequestIgnored, match=reason):
        guard.check(message)
    assert not guard.state_file.exists()


@pytest.mark.parametrize("change, reason", [
    ({"expires": NOW - 1}, "refused request q-1: expired"),
    ({"expires": None}, r"expired \(expiry never set\)"),
    ({"expires": NOW + MAX_REQUEST_TTL_S + 60}, "expires more than 24 h from now"),
    ({"op": "format"}, "unknown operation 'format': use logs, config, get-config, restart"),
    ({"model": None}, "operation 'config' needs a 'model'"),
    ({"model": "../etc"}, "invalid model name"),
    ({"args": [1]}, "'args' must be an object"),
])
def test_requests_of_this_devices_controller_that_must_not_run_are_answered(guard: RequestGuard,
                                                                             change: dict[str, Any],
                                                                             reason: str) -> None:
    with pytest.raises(RequestRefused, match=reason) as refused:
        guard.check(sign_order(request(**change), load_order_key()))
    assert refused.value.request_id == "q-1"
    assert not guard.state_file.exists()  # nothing remembered: it never ran


def test_the_wire_forms_of_requests_and_responses() -> None:
    with pytest.raises(ValidationError, match="requests message lacks field"):
        parse_message("requests", json.dumps({"schema": 2, "op": "logs"}).encode())
    with pytest.raises(ValidationError, match="requests message has schema 1, expected 2"):
        parse_message("requests", json.dumps({"schema": 1, "request_id": "q", "op": "logs",
                                              "device_id": "d"}).encode())
    failed = OperationResponse.failure("q-1", "pi-1", NotFoundError("no model named 'x'"))
    decoded = OperationResponse.from_message(parse_message("responses", encode_message("responses",
                                                                                       failed.to_body())))
    assert decoded.error_type == "not-found" and "result" not in failed.to_body()
    with pytest.raises(NotFoundError, match="^pi-1: no model named 'x'$"):
        decoded.raise_for_error()
    busy = OperationResponse.failure("q-2", "pi-1", UnavailableError("busy"))
    with pytest.raises(UnavailableError):
        OperationResponse.from_message(busy.to_body()).raise_for_error()
    assert OperationResponse("q-3", "pi-1", True, {"lines": []}).raise_for_error() == {"lines": []}


def test_model_params_merge_remove_refuse_and_persist(tmp_path: Path) -> None:
    params = ModelParams(tmp_path / "params")
    assert params.get("scorer") == {}
    merged = params.merged("scorer", {"threshold": 0.7, "mode": "fast"})
    params.put("scorer", merged)
    assert ModelParams(tmp_path / "params").get("scorer") == {"threshold": 0.7, "mode": "fast"}
    assert params.merged("scorer", {"mode": None, "top_k": 3}) == {"threshold": 0.7, "top_k": 3}
    assert params.get("scorer") == {"threshold": 0.7, "mode": "fast"}  # merged() alone changes nothing
    for bad, reason in (({}, "at least one key"), ("x", "at least one key"), ({"": 1}, "1 to 128 characters"),
                        ({"big": "x" * MAX_PARAMS_BYTES}, "over the limit")):
        with pytest.raises(ValidationError, match=reason):
            params.merged("scorer", bad)
    with pytest.raises(ValidationError, match="invalid model name"):
        params.get("../escape")


def test_the_log_ring_keeps_the_newest_lines_one_line_per_record() -> None:
    ring = LogRing(capacity=3)
    logger = logging.getLogger("tests.ring")
    logger.addHandler(ring)
    logger.setLevel(logging.INFO)
    try:
        for i in range(5):
            logger.info("line %d", i)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(ring)
    lines = ring.tail(10)
    assert len(lines) == 3 and lines[0].endswith("line 3") and lines[1].endswith("line 4")
    assert " ERROR tests.ring: failed | Traceback" in lines[2] and "\n" not in lines[2]
    assert ring.tail(1) == lines[-1:] and ring.tail(0) == []


def test_a_logs_answer_keeps_the_newest_lines_that_fit_in_one_message(guard: RequestGuard, tmp_path: Path) -> None:
    ring = LogRing()
    for i in range(ring.capacity):  # 2,000 lines of 900 characters: 1.8 MB, seven messages' worth
        ring.emit(logging.LogRecord("t", logging.INFO, __file__, 1, "%04d %s", (i, "x" * 900), None))
    sent: list[tuple[str, dict[str, Any]]] = []
    operations = Operations("pi-1", guard, ModelParams(tmp_path / "params"), ring, host=None,  # type: ignore[arg-type]
                            send=lambda kind, body, qos=1: sent.append((kind, body)) is None)
    message = {**request(), "op": "logs", "model": None, "args": {"tail": 2000}}
    asyncio.run(operations.handle(sign_order(message, load_order_key())))
    [(kind, body)] = sent
    lines = body["result"]["lines"]
    assert kind == "responses" and body["ok"] is True and body["result"]["truncated"] is True
    assert 100 < len(lines) < 2000 and lines[-1].endswith("1999 " + "x" * 900)
    assert len(encode_message("responses", body)) <= MAX_MESSAGE_BYTES
