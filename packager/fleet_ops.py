"""Operations on devices, over the fleet transport: recent logs, a model's run-time parameters, a restart.

:class:`FleetOps` turns a call into a request (:class:`~edge_agent.fleet_messages.OperationRequest`):
a fresh request id, the device id, an expiry (the wait plus :data:`REQUEST_GRACE_S`, so a device
whose clock is a little off still takes it, and one that comes back online later refuses it), signed
by the controller's order key as orders are (:func:`edge_agent.orders.sign_order`). It publishes it
on the device's requests topic (``ControllerTransport.publish_request``) and waits for the
response with that id, which the transport hands to every ``on_response`` listener. The device's
refusal is raised here as the same kind of error (``error_type``), its one line prefixed with the
device id; no answer in time is an :class:`~edge_agent.errors.UnavailableError`.

It is safe to use from many threads at once, on one long-lived link (the controller daemon):
:meth:`FleetOps.submit` returns a ``concurrent.futures.Future`` (``asyncio.wrap_future`` makes it
awaitable), :meth:`FleetOps.result` waits for one, and :meth:`FleetOps.fan_out` asks many devices at
once and waits for all of them together.

What the agent does with each request is in :mod:`edge_agent.operations`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edge_agent.errors import EdgeDeployError, UnavailableError, UsageError, ValidationError
from edge_agent.fleet_messages import (
    OPERATIONS,
    SCHEMA_VERSION,
    OperationRequest,
    OperationResponse,
    check_device_id,
    check_model_name,
)
from edge_agent.orders import Signer, sign_order
from edge_agent.transport import ControllerTransport

__all__ = ["DEFAULT_TIMEOUT_S", "REQUEST_GRACE_S", "FleetOps", "PendingRequest"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
REQUEST_GRACE_S = 60.0  # a device clock this far behind still takes the request; a device back later does not


class PendingRequest(concurrent.futures.Future[Any]):
    """The future answer to one request: the device's result, or its error raised."""

    def __init__(self, request_id: str, device_id: str, timeout: float) -> None:
        super().__init__()
        self.request_id = request_id
        self.device_id = device_id
        self.timeout = timeout  # how long its sender meant to wait (the error says so)
        self.deadline = time.monotonic() + timeout

    def give_up(self) -> None:
        """Resolve with the no-answer error (unless the answer came first)."""
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            self.set_exception(UnavailableError(f"device {self.device_id} did not answer within {self.timeout:g} s; "
                                                "is it online?"))


class FleetOps:
    """Signed requests to devices and their answers, over one controller transport."""

    prune_every_s = 1.0  # how often submit() looks for requests nobody collected

    def __init__(self, link: ControllerTransport, home: Path | None = None, signer: Signer | None = None) -> None:
        if signer is None:
            from packager.keys import load_order_key

            signer = load_order_key(home)
        self.link = link
        self.signer = signer
        self._pending: dict[str, PendingRequest] = {}
        self._pruned = time.monotonic()
        self._lock = threading.Lock()
        link.on_response(self._on_response)

    # -- one request ---------------------------------------------------------------------------
    def submit(self, device_id: str, op: str, args: dict[str, Any] | None = None, *, model: str | None = None,
               timeout: float = DEFAULT_TIMEOUT_S) -> PendingRequest:
        """Send one request; collect its answer with :meth:`result` (which also forgets it).

        ``timeout`` is how long the caller means to wait: the request expires soon after, and a
        future nobody collected resolves with the no-answer error at the next :meth:`submit` after that.
        """
        if op not in OPERATIONS:
            raise UsageError(f"unknown operation {op!r}: use {', '.join(OPERATIONS)}")
        self._give_up_overdue()
        request = OperationRequest(f"q-{secrets.token_hex(8)}", op, check_device_id(device_id),
                                   round(time.time() + timeout + REQUEST_GRACE_S, 3),
                                   None if model is None else check_model_name(model), dict(args or {}))
        message = sign_order({"schema": SCHEMA_VERSION, **request.to_body()}, self.signer)
        future = PendingRequest(request.request_id, device_id, timeout)
        with self._lock:
            self._pending[request.request_id] = future
        try:
            self.link.publish_request(device_id, message)
        except BaseException:
            self._forget(future)
            raise
        return future

    def result(self, future: PendingRequest, timeout: float) -> Any:
        """The device's result for ``future`` (from :meth:`submit`) within ``timeout`` seconds, or its error."""
        try:
            return future.result(max(0.0, timeout))
        except concurrent.futures.TimeoutError:
            future.give_up()
            return future.result(0)
        finally:
            self._forget(future)

    def request(self, device_id: str, op: str, args: dict[str, Any] | None = None, *, model: str | None = None,
                timeout: float = DEFAULT_TIMEOUT_S) -> Any:
        """Send one request and wait for its result (the device's error is raised as the device raised it)."""
        return self.result(self.submit(device_id, op, args, model=model, timeout=timeout), timeout)

    def fan_out(self, device_ids: Iterable[str], op: str, args: dict[str, Any] | None = None, *,
                model: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
        """Ask every device at once; each device's result, or the EdgeDeployError it ended with."""
        futures: dict[str, PendingRequest | EdgeDeployError] = {}
        for device_id in device_ids:
            try:
                futures[device_id] = self.submit(device_id, op, args, model=model, timeout=timeout)
            except EdgeDeployError as exc:
                futures[device_id] = exc
        deadline = time.monotonic() + timeout
        results: dict[str, Any] = {}
        for device_id, future in futures.items():
            if isinstance(future, EdgeDeployError):
                results[device_id] = future
                continue
            try:
                results[device_id] = self.result(future, deadline - time.monotonic())
            except EdgeDeployError as exc:
                results[device_id] = exc
        return results

    # -- the operations, as the CLI calls them -----------------------------------------------------
    def logs(self, device_id: str, tail: int = 100, timeout: float = DEFAULT_TIMEOUT_S) -> list[str]:
        """The device agent's newest ``tail`` log lines, oldest first."""
        return list(self.request(device_id, "logs", {"tail": tail}, timeout=timeout)["lines"])

    def configure(self, device_id: str, model: str, params: dict[str, Any],
                  timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
        """Set run-time parameters of ``model`` (None removes a key); ``{"model", "params", "applied"}``."""
        result: dict[str, Any] = self.request(device_id, "config", {"params": params}, model=model, timeout=timeout)
        return result

    def get_config(self, device_id: str, model: str, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
        """The run-time parameters of ``model`` on the device."""
        return dict(self.request(device_id, "get-config", model=model, timeout=timeout)["params"])

    def restart(self, device_id: str, model: str, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
        """Reload ``model`` from its active slot on the device; ``{"model", "version", "bundle_sha256"}``."""
        result: dict[str, Any] = self.request(device_id, "restart", model=model, timeout=timeout)
        return result

    # -- responses (the transport's thread) ------------------------------------------------------
    def _on_response(self, message: dict[str, Any]) -> None:
        try:
            response = OperationResponse.from_message(message)
        except (KeyError, TypeError, ValueError, ValidationError) as exc:
            log.info("ignoring a malformed response: %s", exc)
            return
        with self._lock:
            future = self._pending.get(response.request_id)
            if future is None or future.device_id != response.device_id:
                return  # another controller's request, or an answer from a device it was not sent to
            del self._pending[response.request_id]
        try:
            future.set_result(response.raise_for_error())
        except EdgeDeployError as exc:
            future.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass  # the caller stopped waiting (cancelled) just before the answer came

    def _forget(self, future: PendingRequest) -> None:
        with self._lock:
            self._pending.pop(future.request_id, None)

    def _give_up_overdue(self) -> None:
        """Resolve the requests nobody collected long after their deadline (every ``prune_every_s``
        at most: a fan-out to 100,000 devices must not scan them all on every send)."""
        now = time.monotonic()
        with self._lock:
            if now - self._pruned < self.prune_every_s:
                return
            self._pruned = now
            overdue = [f for f in self._pending.values() if f.deadline + REQUEST_GRACE_S < now]
            for future in overdue:
                del self._pending[future.request_id]
        for future in overdue:
            future.give_up()
