"""Operations on request: the controller asks one device for its logs, a model's parameters, a restart.

A request arrives on ``{prefix}/devices/{id}/requests`` (QoS 1, not retained) and is answered on
``.../responses`` with the same ``request_id`` (:class:`~edge_agent.fleet_messages.OperationRequest`
and ``OperationResponse``). It is signed by the controller's order key exactly as an order is (same
canonical JSON, same ``orders`` trust role, :func:`edge_agent.orders.check_signature`), and
:class:`RequestGuard` checks, in order::

    signed by a trusted controller key, addressed to this device     else ignored: no answer, a log
                                                                      line and one ``events`` message
    well formed, not expired, expiring within MAX_REQUEST_TTL_S,     else refused: answered
    request id not seen before                                        ``{"ok": false, "error": ...}``

Request ids are remembered until their expiry in ``data_dir/requests.json`` (written atomically
before the request is acted on, so a replay is refused after a restart too). Requests never touch
the order sequence (``orders.json``): a desired state and a request cannot stand in for each other.

Operations (:class:`Operations`):

- ``logs`` (``args.tail``, default 100): the agent's newest log lines (:mod:`edge_agent.logring`),
  as many as fit in one message.
- ``config`` (``args.params``: ``{key: value}``, ``null`` removes a key): merges them into the model's
  run-time parameters, hands the whole set to the serving instance first (an entry script's
  ``configure(params)``; its exception is the request's error and nothing changes), then persists
  them (:class:`ModelParams`). Every later load of the model gets them; the reported state shows them.
- ``get-config``: the model's current parameters.
- ``restart``: the model loads again from its active slot, passes the health check beside the
  serving instance, then takes its place (no request fails meanwhile).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from edge_agent.atomic import atomic_write_json, read_json
from edge_agent.errors import EdgeDeployError, NotFoundError, ValidationError, brief
from edge_agent.fleet_messages import (
    MAX_MESSAGE_BYTES,
    OperationRequest,
    OperationResponse,
    check_model_name,
    check_request_id,
)
from edge_agent.logring import LogRing
from edge_agent.orders import OrderRefused, check_signature
from edge_agent.trust import TrustStore

__all__ = ["DEFAULT_TAIL", "MAX_PARAMS_BYTES", "MAX_REQUEST_TTL_S", "ModelHost", "ModelParams", "Operations",
           "RequestGuard", "RequestIgnored", "RequestRefused"]

log = logging.getLogger(__name__)

MAX_REQUEST_TTL_S = 24 * 3600.0  # bounds how long ids are remembered; a request is answered in seconds
MAX_REMEMBERED = 10_000  # request ids held at once (a controller sends a few per minute)
MAX_PARAMS_BYTES = 16 * 1024  # one model's parameters, as JSON: several fit in one reported message
DEFAULT_TAIL = 100
_LOG_BUDGET = MAX_MESSAGE_BYTES - 4096  # room for the response's other fields


class RequestIgnored(ValidationError):
    """A request that is not this device's controller's (unsigned, forged, misaddressed): never answered."""


class RequestRefused(ValidationError):
    """A request of this device's controller that must not run (expired, replayed, malformed): answered."""

    def __init__(self, request_id: str, message: str) -> None:
        super().__init__(message)
        self.request_id = request_id


class RequestGuard:
    """Decides whether a request message is this device's controller's, current and new."""

    def __init__(self, device_id: str, trust: TrustStore, state_file: Path,
                 clock: Callable[[], float] = time.time) -> None:
        self.device_id = device_id
        self.trust = trust
        self.state_file = Path(state_file)
        self.clock = clock
        self.seen: dict[str, float] = self._load()  # request id -> its expiry

    def _load(self) -> dict[str, float]:
        try:
            document = read_json(self.state_file) if self.state_file.is_file() else {}
        except (OSError, ValueError):
            log.error("%s is unreadable; replays of earlier requests are refused only by their expiry",
                      self.state_file)
            return {}
        seen = document.get("seen") if isinstance(document, dict) else None
        return {k: float(v) for k, v in (seen or {}).items() if isinstance(v, int | float)}

    def check(self, message: dict[str, Any]) -> OperationRequest:
        """The typed request to run; RequestIgnored or RequestRefused say why not (one line each)."""
        raw_id = message.get("request_id")
        shown = brief(str(raw_id), 80) if raw_id is not None else "without id"
        try:
            check_signature(message, self.trust, f"ignored request {shown}", what="requests")
        except OrderRefused as exc:
            raise RequestIgnored(str(exc)) from None
        if message.get("device_id") != self.device_id:
            raise RequestIgnored(f"ignored request {shown}: addressed to {brief(str(message.get('device_id')), 80)!r},"
                                 " not to this device")
        try:
            request_id = check_request_id(raw_id)
        except ValidationError as exc:
            raise RequestIgnored(f"ignored request: {exc}") from None  # nothing to answer it by
        label = f"refused request {request_id}"
        try:
            request = OperationRequest.from_message(message)
        except ValidationError as exc:
            raise RequestRefused(request_id, f"{label}: {exc}") from None
        self._check_fresh(request, label)
        self._remember(request, label)
        return request

    def _check_fresh(self, request: OperationRequest, label: str) -> None:
        now = self.clock()
        if request.expires is None or request.expires < now:
            when = "never set" if request.expires is None else time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(request.expires))
            raise RequestRefused(request.request_id, f"{label}: expired (expiry {when})")
        if request.expires > now + MAX_REQUEST_TTL_S:
            raise RequestRefused(request.request_id, f"{label}: it expires more than {MAX_REQUEST_TTL_S / 3600:.0f} "
                                                     "h from now (check the controller's clock)")
        if request.request_id in self.seen:
            raise RequestRefused(request.request_id, f"{label}: replayed (this request id was answered before)")

    def _remember(self, request: OperationRequest, label: str) -> None:
        now = self.clock()
        self.seen = {k: v for k, v in self.seen.items() if v >= now}
        if len(self.seen) >= MAX_REMEMBERED:
            raise RequestRefused(request.request_id, f"{label}: {len(self.seen)} requests are still unexpired; "
                                                     "retry later")
        assert request.expires is not None
        self.seen[request.request_id] = request.expires
        try:
            atomic_write_json(self.state_file, {"seen": self.seen})
        except OSError as exc:  # acting without the record would let the request be replayed
            del self.seen[request.request_id]
            raise RequestRefused(request.request_id, f"{label}: its id could not be recorded ({exc})") from None


class ModelParams:
    """Each model's run-time parameters, one JSON file per model under ``folder`` (atomic writes)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._cache: dict[str, dict[str, Any]] = {}

    def _path(self, name: str) -> Path:
        return self.folder / f"{check_model_name(name)}.json"

    def get(self, name: str) -> dict[str, Any]:
        """A copy of model ``name``'s parameters ({} when none were set)."""
        if name not in self._cache:
            path = self._path(name)
            try:
                document = read_json(path) if path.is_file() else {}
            except (OSError, ValueError):
                log.error("%s is unreadable; model %s starts without run-time parameters", path, name)
                document = {}
            self._cache[name] = document if isinstance(document, dict) else {}
        return dict(self._cache[name])

    def merged(self, name: str, changes: Any) -> dict[str, Any]:
        """The parameters ``changes`` (``{key: value}``; a null value removes the key) would leave."""
        if not isinstance(changes, dict) or not changes:
            raise ValidationError("config needs 'params': an object of at least one key and its value")
        params = self.get(name)
        for key, value in changes.items():
            if not isinstance(key, str) or not key or len(key) > 128:
                raise ValidationError(f"parameter name {brief(str(key), 80)!r} must be 1 to 128 characters")
            if value is None:
                params.pop(key, None)
            else:
                params[key] = value
        size = len(json.dumps(params, separators=(",", ":")))
        if size > MAX_PARAMS_BYTES:
            raise ValidationError(f"model {name!r}: the parameters would take {size} bytes as JSON, "
                                  f"over the limit of {MAX_PARAMS_BYTES}")
        return params

    def put(self, name: str, params: dict[str, Any]) -> None:
        """Persist model ``name``'s whole parameter set."""
        atomic_write_json(self._path(name), params)
        self._cache[name] = dict(params)


class ModelHost(Protocol):
    """What operations need from the daemon (:class:`edge_agent.daemon.EdgeAgent` is the one)."""

    def model_names(self) -> list[str]:
        """The models this device has an active bundle for."""

    async def configure_model(self, name: str, params: dict[str, Any]) -> bool:
        """Give the serving instance ``params`` (its refusal raises), then persist them; True when one
        was serving (else they apply at the model's next load)."""

    async def reload_model(self, name: str) -> dict[str, Any]:
        """Load ``name`` again from its active slot, health-check it, swap it in; what now serves."""


Send = Callable[..., bool]  # the device transport's publish(kind, body, qos=1)


class Operations:
    """Checks each request, runs its operation and answers it (from the agent's event loop)."""

    def __init__(self, device_id: str, guard: RequestGuard, params: ModelParams, logs: LogRing, host: ModelHost,
                 send: Send) -> None:
        self.device_id = device_id
        self.guard = guard
        self.params = params
        self.logs = logs
        self.host = host
        self.send = send
        self._ops: dict[str, Callable[[OperationRequest], Awaitable[Any]]] = {
            "logs": self._logs, "config": self._config, "get-config": self._get_config, "restart": self._restart}
        self._tasks: set[asyncio.Task[None]] = set()
        self._configuring = asyncio.Lock()  # two config requests at once must not merge from the same set

    def start(self, message: dict[str, Any]) -> None:
        """Begin answering ``message`` (call on the agent's event loop; requests run side by side)."""
        task = asyncio.get_running_loop().create_task(self.handle(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancel the requests still running (the agent is stopping)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def handle(self, message: dict[str, Any]) -> None:
        """Answer one request message (or log and report why it is ignored); never raises."""
        try:
            request = self.guard.check(message)
        except RequestIgnored as exc:
            self._ignored(str(exc), message.get("request_id"))
            return
        except RequestRefused as exc:
            log.warning("%s", exc)
            self._answer(OperationResponse.failure(exc.request_id, self.device_id, exc))
            return
        self._answer(await self._run(request))

    async def _run(self, request: OperationRequest) -> OperationResponse:
        what = f"request {request.request_id} ({request.op}{' ' + request.model if request.model else ''})"
        try:
            result = await self._ops[request.op](request)
        except EdgeDeployError as exc:
            log.warning("%s failed: %s", what, exc)
            return OperationResponse.failure(request.request_id, self.device_id, exc)
        except Exception as exc:  # a bug in one operation is that request's error, not the agent's end
            log.exception("%s failed unexpectedly", what)
            return OperationResponse.failure(request.request_id, self.device_id,
                                             EdgeDeployError(f"internal error: {brief(exc)}"))
        log.info("%s answered", what)
        return OperationResponse(request.request_id, self.device_id, True, result, ts=time.time())

    def _answer(self, response: OperationResponse) -> None:
        self.send("responses", response.to_body(), qos=1)

    def _ignored(self, line: str, request_id: Any) -> None:
        log.warning("%s", line)
        self.send("events", {"device_id": self.device_id, "model": None, "deployment_id": None,
                             "request_id": request_id if isinstance(request_id, str) else None, "from": None,
                             "to": "refused", "reason": brief(line), "ts": time.time()}, qos=1)

    def _model(self, request: OperationRequest) -> str:
        names = self.host.model_names()
        if request.model not in names:
            raise NotFoundError(f"no model named {request.model!r} on this device "
                                f"(models: {', '.join(names) or 'none'})")
        return request.model

    async def _logs(self, request: OperationRequest) -> dict[str, Any]:
        tail = request.args.get("tail", DEFAULT_TAIL)
        if isinstance(tail, bool) or not isinstance(tail, int) or not 1 <= tail <= self.logs.capacity:
            raise ValidationError(f"logs: 'tail' must be a whole number from 1 to {self.logs.capacity}")
        lines = self.logs.tail(tail)
        kept, size = [], 0
        for line in reversed(lines):  # the newest lines matter most: drop the oldest beyond one message
            size += len(json.dumps(line)) + 1
            if size > _LOG_BUDGET:
                break
            kept.append(line)
        return {"lines": kept[::-1], "truncated": len(kept) < len(lines)}

    async def _config(self, request: OperationRequest) -> dict[str, Any]:
        name = self._model(request)
        async with self._configuring:
            params = self.params.merged(name, request.args.get("params"))
            applied = await self.host.configure_model(name, params)
        return {"model": name, "params": params, "applied": applied}

    async def _get_config(self, request: OperationRequest) -> dict[str, Any]:
        name = self._model(request)
        return {"model": name, "params": self.params.get(name)}

    async def _restart(self, request: OperationRequest) -> dict[str, Any]:
        return await self.host.reload_model(self._model(request))

