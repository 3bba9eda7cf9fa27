"""The controller side of requests (packager/fleet_ops.py and its CLI): signing, matching answers,
concurrency, timeouts, KEY=VALUE settings.

The transport here is an in-memory stand-in that answers as a device would; the same flow across a
real Mosquitto and real agents is tests/e2e/test_fleet_ops.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from edge_agent.errors import NotFoundError, UnavailableError, UsageError
from edge_agent.fleet_messages import OperationRequest, OperationResponse
from edge_agent.orders import OrderRefused, verify_order
from edge_agent.trust import TrustStore
from packager import fleet_ops
from packager.cli.fleet_ops import parse_settings
from packager.fleet_ops import FleetOps
from packager.keys import load_order_key


class LoopLink:
    """Keeps the requests it is given; ``answer`` plays the device."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.arrived = threading.Condition()

    def publish_request(self, device_id: str, message: dict[str, Any]) -> None:
        with self.arrived:
            self.sent.append((device_id, message))
            self.arrived.notify_all()

    def on_response(self, listener: Callable[[dict[str, Any]], None]) -> None:
        self.listeners.append(listener)

    def answer(self, message: dict[str, Any], result: Any = None, error: Exception | None = None,
               device_id: str | None = None) -> None:
        device = device_id or message["device_id"]
        response = (OperationResponse.failure(message["request_id"], device, error) if error else
                    OperationResponse(message["request_id"], device, True, result, ts=time.time()))
        for listener in self.listeners:
            listener(response.to_body())


def test_a_request_is_signed_for_its_device_and_gets_its_answer() -> None:
    link = LoopLink()
    ops = FleetOps(link)  # type: ignore[arg-type]
    future = ops.submit("pi-1", "config", {"params": {"t": 0.5}}, model="scorer", timeout=5)
    [(device_id, message)] = link.sent
    assert device_id == "pi-1" and message["device_id"] == "pi-1" and message["op"] == "config"
    assert abs(message["expires"] - (time.time() + 5 + fleet_ops.REQUEST_GRACE_S)) < 5  # the wait, then the grace
    controller = TrustStore([load_order_key().public_key])
    with pytest.raises(OrderRefused, match="'models' must be an object"):  # signed alike, but never an order
        verify_order(message, controller)
    assert OperationRequest.from_message(message).args == {"params": {"t": 0.5}}
    link.answer(message, device_id="pi-2", result="forged")  # another device's answer: not this request's
    link.answer(message, result={"params": {"t": 0.5}})
    assert ops.result(future, 5) == {"params": {"t": 0.5}}


def test_many_threads_wait_at_once_and_each_gets_its_own_answer() -> None:
    link = LoopLink()
    ops = FleetOps(link)  # type: ignore[arg-type]
    devices = [f"pi-{i}" for i in range(20)]
    with ThreadPoolExecutor(len(devices)) as pool:
        waits = {d: pool.submit(ops.get_config, d, "scorer", 60) for d in devices}
        with link.arrived:
            assert link.arrived.wait_for(lambda: len(link.sent) == len(devices), 60)
        for device_id, message in reversed(link.sent):  # answered out of order
            link.answer(message, result={"model": "scorer", "params": {"device": device_id}})
        assert {d: w.result(60) for d, w in waits.items()} == {d: {"device": d} for d in devices}
    assert ops._pending == {}


def test_errors_come_back_as_the_device_raised_them_and_silence_is_a_timeout() -> None:
    link = LoopLink()
    ops = FleetOps(link)  # type: ignore[arg-type]
    future = ops.submit("pi-1", "restart", model="nosuch")
    link.answer(link.sent[-1][1], error=NotFoundError("no model named 'nosuch' on this device (models: a)"))
    with pytest.raises(NotFoundError, match=r"^pi-1: no model named 'nosuch'"):
        ops.result(future, 5)
    with pytest.raises(UnavailableError, match=r"^device pi-1 did not answer within 0.2 s; is it online\?$"):
        ops.logs("pi-1", timeout=0.2)
    results = ops.fan_out(["pi-1", "pi-2"], "get-config", model="scorer", timeout=0.2)
    assert all(isinstance(r, UnavailableError) for r in results.values()) and ops._pending == {}
    with pytest.raises(UsageError, match="unknown operation 'reboot'"):
        ops.submit("pi-1", "reboot")


def test_a_request_nobody_collects_resolves_with_the_timeout_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet_ops, "REQUEST_GRACE_S", 0.0)
    link = LoopLink()
    ops = FleetOps(link)  # type: ignore[arg-type]
    ops.prune_every_s = 0.0
    abandoned = ops.submit("pi-1", "logs", timeout=0.0)
    ops.submit("pi-2", "logs", timeout=60)  # a later send notices it
    with pytest.raises(UnavailableError, match="device pi-1 did not answer"):
        abandoned.result(5)
    assert list(ops._pending) == [link.sent[1][1]["request_id"]]


def test_cli_settings_are_json_when_they_parse_else_strings() -> None:
    assert parse_settings(["t=0.7", "on=true", "k=[1, 2]", "name=fast", "gone=null", "nan=NaN", "empty="]) == {
        "t": 0.7, "on": True, "k": [1, 2], "name": "fast", "gone": None, "nan": "NaN", "empty": ""}
    with pytest.raises(UsageError, match="bad setting 'oops': write KEY=VALUE"):
        parse_settings(["oops"])
