"""The controller's HTTP adapter (aiohttp): the JSON API under ``/api/v1/``, ``/openapi.json`` and the console.

Handlers parse, call the :class:`Plane` (the engine's ``ControlPlane`` facade, or anything with its
methods) and format. The facade blocks (store queries, MQTT round trips to a device), so every call
runs in a worker thread and the event loop keeps answering. Errors are ``edge_agent.errors``
classes turned into a status by ``edge_agent.error_status`` in one middleware: ``{"error": "..."}``
under ``/api``, an HTML page elsewhere; an unexpected exception is logged and answers 500 without
internals. Request bodies are bounded (1 MiB), parsed with ``loads_bounded`` and checked against the
OpenAPI document's own schemas (:mod:`packager.control.openapi`).

Auth (:class:`~packager.control.tokens.TokenGuard`): with tokens, every ``/api`` request needs
``Authorization: Bearer T``; a console session cookie also reads (GET) the API, so the console's
script works after a login, but only a bearer token changes anything. Console pages without a
session redirect to ``/login``. ``/openapi.json``, ``/login`` and the static files are open.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol

from aiohttp import web

from edge_agent.error_status import http_status
from edge_agent.errors import AuthError, EdgeDeployError, NotFoundError, UsageError
from edge_agent.jsonlimits import loads_bounded
from packager.control.conditions import parse_condition
from packager.control.openapi import API_PREFIX, check_body, controller_openapi
from packager.control.tokens import SESSION_COOKIE, TokenGuard
from packager.fleet import DeviceSelector

__all__ = ["MAX_BODY_BYTES", "PLANE", "Plane", "build_app", "call", "filter_devices", "find_deployment",
           "page_of_devices", "query_float", "query_int", "select"]

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY_BYTES = 1 << 20
DEVICE_COLUMNS = ("device_id", "online", "profile", "model", "model_version", "state", "last_seen")
_CONFIG_FANOUT = 32  # devices asked at once by one POST config with a selector
_OPEN_PATHS = ("/openapi.json", "/login", "/static/")


class Plane(Protocol):
    """What the API calls: the engine's ``ControlPlane`` facade (``ControllerClient`` has it too)."""

    def devices(self, ids: Iterable[str] | None = None) -> list[dict[str, Any]]: ...
    def device_ids(self) -> list[str]: ...
    def device(self, device_id: str) -> dict[str, Any]: ...
    def deployments(self) -> list[dict[str, Any]]: ...
    def deploy(self, spec: dict[str, Any]) -> dict[str, Any]: ...
    def undeploy(self, name: str) -> dict[str, Any]: ...
    def start_rollout(self, spec: dict[str, Any]) -> str: ...
    def rollouts(self) -> list[dict[str, Any]]: ...
    def rollout_status(self, rollout_id: str, detail: bool = False) -> dict[str, Any]: ...
    def abort(self, rollout_id: str) -> dict[str, Any]: ...
    def events(self, limit: int = 200, device_id: str | None = None, rollout_id: str | None = None,
               deployment: str | None = None, since: float | None = None) -> list[dict[str, Any]]: ...
    def telemetry(self, device_id: str | None = None, deployment: str | None = None, since: float | None = None,
                  until: float | None = None) -> dict[str, Any]: ...
    def request(self, device_id: str, op: str, args: dict[str, Any] | None = None, model: str | None = None,
                timeout: float = 10.0) -> dict[str, Any]: ...
    def select(self, selector: str) -> list[str]: ...
    def health(self) -> dict[str, Any]: ...


PLANE = web.AppKey("plane", Plane)
GUARD = web.AppKey("guard", TokenGuard)


# --- plumbing ------------------------------------------------------------------------------------------


def _is_api(request: web.Request) -> bool:
    return request.path.startswith("/api/")


def _error_response(request: web.Request, status: int, message: str) -> web.StreamResponse:
    if _is_api(request) or request.path == "/openapi.json":
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return web.json_response({"error": message}, status=status, headers=headers)
    from packager.control.pages import error_page  # the console renders its own errors

    return error_page(status, message)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except EdgeDeployError as exc:
        return _error_response(request, http_status(exc), str(exc))
    except web.HTTPRequestEntityTooLarge:
        return _error_response(request, 413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes")
    except web.HTTPNotFound:
        return _error_response(request, 404, f"no such path: {request.path[:200]}")
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return _error_response(request, 405, f"{request.method} is not allowed here; use {allowed}")
    except web.HTTPException:
        raise  # redirects and the like
    except Exception:  # a bug: answer 500 without internals, keep serving
        log.exception("unexpected error answering %s %s", request.method, request.path)
        return _error_response(request, 500, "internal server error (see the controller's log)")


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    guard = request.app[GUARD]
    if not guard.enabled or request.path.startswith(_OPEN_PATHS):
        return await handler(request)
    bearer = guard.bearer_ok(request.headers.get("Authorization"))
    session = guard.session_ok(request.cookies.get(SESSION_COOKIE))
    if _is_api(request):
        if bearer or (session and request.method in ("GET", "HEAD")):
            return await handler(request)
        raise AuthError("missing or invalid token: send 'Authorization: Bearer <a line of the --token-file>'")
    if bearer or session:
        return await handler(request)
    raise web.HTTPSeeOther(location="/login?" + _login_query(request))


def _login_query(request: web.Request) -> str:
    from urllib.parse import urlencode

    return urlencode({"next": request.path_qs})


async def call(request: web.Request, method: str, *args: Any, **kwargs: Any) -> Any:
    """``plane.method(*args, **kwargs)`` in a worker thread (the facade blocks on the store and MQTT)."""
    return await asyncio.to_thread(getattr(request.app[PLANE], method), *args, **kwargs)


async def _body(request: web.Request, schema: str) -> dict[str, Any]:
    raw = await request.read()  # aiohttp refuses more than client_max_size (HTTPRequestEntityTooLarge)
    return check_body(loads_bounded(raw, max_bytes=MAX_BODY_BYTES, what="the request body"), schema)


def query_int(request: web.Request, name: str, default: int | None, low: int, high: int) -> int | None:
    """An integer query parameter within [low, high]; UsageError naming it otherwise."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise UsageError(f"{name}: must be an integer from {low} to {high}")
    return value


def query_float(request: web.Request, name: str) -> float | None:
    """A finite number query parameter (epoch seconds); UsageError naming it otherwise."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")):
        raise UsageError(f"{name}: must be a number (epoch seconds)")
    return value


def _query_bool(request: web.Request, name: str, default: bool) -> bool:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes"):
        return True
    if raw.lower() in ("0", "false", "no"):
        return False
    raise UsageError(f"{name}: must be true or false")


def _query_str(request: web.Request, name: str) -> str | None:
    return request.query.get(name) or None


# --- devices ---------------------------------------------------------------------------------------------


def _sort_key(value: Any) -> tuple[int, float, str]:
    """Numbers before text, so a column of mixed values still sorts."""
    if isinstance(value, bool | int | float):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def filter_devices(rows: Sequence[dict[str, Any]], chosen: set[str] | None = None, sort: str | None = None,
                   limit: int | None = None, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The rows whose id is in ``chosen`` (None: all), sorted by a column (``-col``: descending), one page.

    Returns (page, how many matched). A row without a value in the sort column goes last either way;
    UsageError names ``sort`` for a column that does not exist.
    """
    matched = [row for row in rows if chosen is None or row.get("device_id") in chosen]
    column = (sort or "device_id").strip()
    descending = column.startswith("-")
    column = column.lstrip("-")
    if column not in DEVICE_COLUMNS:
        raise UsageError(f"sort: {column!r} is not a column; use one of {', '.join(DEVICE_COLUMNS)}")
    known = [row for row in matched if row.get(column) is not None]
    known.sort(key=lambda row: (_sort_key(row[column]), str(row.get("device_id"))), reverse=descending)
    matched = known + sorted((row for row in matched if row.get(column) is None),
                             key=lambda row: str(row.get("device_id")))
    end = None if limit is None else offset + limit
    return matched[offset:end], len(matched)


async def page_of_devices(request: web.Request, chosen: set[str] | None, sort: str | None, limit: int | None,
                          offset: int) -> tuple[list[dict[str, Any]], int]:
    """:func:`filter_devices` over the plane's devices; in id order (the default) only the page's rows are
    built, so a page of a fleet of 100,000 costs what the page does."""
    column = (sort or "device_id").strip()
    if column.lstrip("-") != "device_id":
        return filter_devices(await call(request, "devices", chosen), None, sort, limit, offset)
    ids = sorted(chosen) if chosen is not None else await call(request, "device_ids")
    if column.startswith("-"):
        ids.reverse()
    page = ids[offset:None if limit is None else offset + limit]
    return await call(request, "devices", page), len(ids)


async def select(request: web.Request, text: str | None, field: str) -> set[str] | None:
    """The ids a target condition (or a ``--to`` selector) picks, by the engine's rules; None for no filter.

    A bad condition is a UsageError naming ``field``.
    """
    if not text or not text.strip():
        return None
    try:
        DeviceSelector.parse(text)
    except UsageError:
        parse_condition(text, option=field)  # the engine parses it again; this names the field on an error
    return set(await call(request, "select", text))


async def list_devices(request: web.Request) -> web.Response:
    limit = query_int(request, "limit", None, 1, 1_000_000)
    offset = query_int(request, "offset", 0, 0, 1_000_000_000) or 0
    chosen = await select(request, request.query.get("q"), "q")
    page, total = await page_of_devices(request, chosen, request.query.get("sort"), limit, offset)
    return web.json_response({"devices": page, "total": total, "offset": offset, "limit": limit})


async def get_device(request: web.Request) -> web.Response:
    return web.json_response(await call(request, "device", request.match_info["device_id"]))


async def device_logs(request: web.Request) -> web.Response:
    tail = query_int(request, "tail", 100, 1, 10_000)
    return web.json_response(await call(request, "request", request.match_info["device_id"], "logs", {"tail": tail}))


async def get_config(request: web.Request) -> web.Response:
    model = request.query.get("model")
    if not model:
        raise UsageError("model: give the model whose parameters to show (?model=NAME)")
    return web.json_response(await call(request, "request", request.match_info["device_id"], "get-config",
                                        model=model))


async def restart_model(request: web.Request) -> web.Response:
    body = await _body(request, "RestartRequest")
    return web.json_response(await call(request, "request", request.match_info["device_id"], "restart",
                                        model=body["model"]))


async def set_config(request: web.Request) -> web.Response:
    body = await _body(request, "ConfigRequest")
    args, model = {"params": body["params"]}, body["model"]
    if "device" in body:
        answer = await call(request, "request", body["device"], "config", args, model=model)
        return web.json_response({"results": {body["device"]: answer}})
    chosen = sorted(await select(request, body["selector"], "selector") or ())
    if not chosen:
        raise NotFoundError(f"selector: no device matches {body['selector']!r}")
    gate = asyncio.Semaphore(_CONFIG_FANOUT)

    async def ask(device_id: str) -> dict[str, Any]:
        async with gate:
            try:
                return dict(await call(request, "request", device_id, "config", args, model=model))
            except EdgeDeployError as exc:  # one device not answering does not hide the others' answers
                return {"error": str(exc)}

    answers = await asyncio.gather(*(ask(d) for d in chosen))
    return web.json_response({"results": dict(zip(chosen, answers, strict=True))})


# --- deployments and rollouts ----------------------------------------------------------------------------


async def list_deployments(request: web.Request) -> web.Response:
    return web.json_response({"deployments": await call(request, "deployments")})


async def find_deployment(request: web.Request, name: str) -> dict[str, Any]:
    """The deployment called ``name``; NotFoundError otherwise."""
    for row in await call(request, "deployments"):
        if row.get("name") == name:
            return dict(row)
    raise NotFoundError(f"no deployment {name!r}; see GET {API_PREFIX}/deployments")


async def get_deployment(request: web.Request) -> web.Response:
    return web.json_response(await find_deployment(request, request.match_info["name"]))


async def create_deployment(request: web.Request) -> web.Response:
    spec = await _body(request, "DeploymentSpec")
    return web.json_response(await call(request, "deploy", spec), status=201)


async def delete_deployment(request: web.Request) -> web.Response:
    return web.json_response(await call(request, "undeploy", request.match_info["name"]))


async def list_rollouts(request: web.Request) -> web.Response:
    return web.json_response({"rollouts": await call(request, "rollouts")})


async def get_rollout(request: web.Request) -> web.Response:
    detail = _query_bool(request, "devices", False)
    return web.json_response(await call(request, "rollout_status", request.match_info["rollout_id"], detail))


async def create_rollout(request: web.Request) -> web.Response:
    spec = await _body(request, "RolloutSpec")
    rollout_id = await call(request, "start_rollout", spec)
    return web.json_response(await call(request, "rollout_status", rollout_id), status=201)


async def abort_rollout(request: web.Request) -> web.Response:
    return web.json_response(await call(request, "abort", request.match_info["rollout_id"]))


# --- events, telemetry, health ---------------------------------------------------------------------------


async def list_events(request: web.Request) -> web.Response:
    rows = await call(request, "events", limit=query_int(request, "limit", 200, 1, 5000) or 200,
                      device_id=_query_str(request, "device"), rollout_id=_query_str(request, "rollout"),
                      deployment=_query_str(request, "deployment"), since=query_float(request, "since"))
    return web.json_response({"events": rows})


async def telemetry(request: web.Request) -> web.Response:
    device, deployment = _query_str(request, "device"), _query_str(request, "deployment")
    if (device is None) == (deployment is None):
        raise UsageError("device, deployment: give exactly one of them")
    since, until = query_float(request, "since"), query_float(request, "until")
    if since is not None and until is not None and until < since:
        raise UsageError("until: must not be before since")
    return web.json_response(await call(request, "telemetry", device_id=device, deployment=deployment,
                                        since=since, until=until))


async def health(request: web.Request) -> web.Response:
    return web.json_response(await call(request, "health"))


def _package_version() -> str:
    try:
        return version("edgedeploy")
    except PackageNotFoundError:
        return "0"


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(controller_openapi(_package_version(), request.app[GUARD].enabled))


def build_app(plane: Plane, tokens: list[str] | None) -> web.Application:
    """The controller's aiohttp application over ``plane``; ``tokens=None`` leaves API and console open."""
    from packager.control.pages import add_console_routes

    app = web.Application(middlewares=[_errors, _auth], client_max_size=MAX_BODY_BYTES)
    app[PLANE] = plane
    app[GUARD] = TokenGuard(tokens)
    api = API_PREFIX
    app.add_routes([
        web.get(f"{api}/devices", list_devices),
        web.get(f"{api}/devices/{{device_id}}", get_device),
        web.get(f"{api}/devices/{{device_id}}/logs", device_logs),
        web.get(f"{api}/devices/{{device_id}}/config", get_config),
        web.post(f"{api}/devices/{{device_id}}/restart", restart_model),
        web.post(f"{api}/config", set_config),
        web.get(f"{api}/deployments", list_deployments),
        web.post(f"{api}/deployments", create_deployment),
        web.get(f"{api}/deployments/{{name}}", get_deployment),
        web.delete(f"{api}/deployments/{{name}}", delete_deployment),
        web.get(f"{api}/rollouts", list_rollouts),
        web.post(f"{api}/rollouts", create_rollout),
        web.get(f"{api}/rollouts/{{rollout_id}}", get_rollout),
        web.post(f"{api}/rollouts/{{rollout_id}}/abort", abort_rollout),
        web.get(f"{api}/events", list_events),
        web.get(f"{api}/telemetry", telemetry),
        web.get(f"{api}/health", health),
        web.get("/openapi.json", openapi),
    ])
    add_console_routes(app)
    return app
