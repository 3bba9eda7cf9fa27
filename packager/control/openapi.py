"""The OpenAPI 3.1 document of the controller's HTTP API, and the request-body schemas it enforces.

The schemas here are the single source: ``GET /openapi.json`` serves them, and the API validates
every request body against the same ones (:func:`check_body`), so the document cannot drift from
what the server accepts. Response schemas name the fields scripts rely on and allow more.
"""

from __future__ import annotations

from typing import Any

import jsonschema

from edge_agent.errors import UsageError, brief

__all__ = ["API_PREFIX", "NAME_PATTERN", "REQUEST_SCHEMAS", "check_body", "controller_openapi"]

API_PREFIX = "/api/v1"
NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"  # a deployment name: it appears in URLs and in topics

_STR = {"type": "string"}
_NULLABLE_STR = {"type": ["string", "null"]}
_NUMBER = {"type": ["number", "null"]}
_COUNT = {"type": "integer", "minimum": 0}
_SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_URL = {"type": "string", "pattern": "^https?://[^\\s]+$", "maxLength": 2048}
_MODEL = {"type": "object", "required": ["name"], "additionalProperties": False,
          "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 200},
                         "version": {"type": ["string", "integer", "null"]}}}
_POLICY = {"type": "object", "additionalProperties": {"type": ["string", "integer", "number"]},
           "description": "rollout options as the CLI writes them: canary, wave, rate, ramp, bake, start, window, "
                          "max_failures, min_sample, gate, wave_timeout"}

REQUEST_SCHEMAS: dict[str, dict[str, Any]] = {
    "DeploymentSpec": {
        "type": "object", "additionalProperties": False,
        "required": ["name", "bundle_sha256", "bundle_url", "model", "target"],
        "properties": {"name": {"type": "string", "pattern": NAME_PATTERN}, "bundle_sha256": _SHA256,
                       "bundle_url": _URL, "model": _MODEL,
                       "target": {"type": "string", "minLength": 1, "maxLength": 4000},
                       "priority": {"type": "integer", "minimum": -1000000, "maximum": 1000000},
                       "policy": _POLICY},
    },
    "RolloutSpec": {
        "type": "object", "additionalProperties": False,
        "required": ["bundle_sha256", "bundle_url", "model", "selector"],
        "properties": {"bundle_sha256": _SHA256, "bundle_url": _URL, "model": _MODEL,
                       "selector": {"type": "string", "minLength": 1, "maxLength": 4000}, "policy": _POLICY},
    },
    "ConfigRequest": {
        "type": "object", "additionalProperties": False, "required": ["model", "params"],
        "oneOf": [{"required": ["device"]}, {"required": ["selector"]}],
        "properties": {"device": {"type": "string", "minLength": 1, "maxLength": 200},
                       "selector": {"type": "string", "minLength": 1, "maxLength": 4000},
                       "model": {"type": "string", "minLength": 1, "maxLength": 200},
                       "params": {"type": "object", "minProperties": 1}},
    },
    "RestartRequest": {
        "type": "object", "additionalProperties": False, "required": ["model"],
        "properties": {"model": {"type": "string", "minLength": 1, "maxLength": 200}},
    },
}

_VALIDATORS = {name: jsonschema.Draft202012Validator(schema) for name, schema in REQUEST_SCHEMAS.items()}

_RESPONSE_SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": _STR}},
    "ModelRow": {"type": "object", "properties": {"name": _STR, "version": {"type": ["string", "integer", "null"]},
                                                  "bundle_sha256": _NULLABLE_STR, "state": _NULLABLE_STR}},
    "Device": {
        "type": "object", "required": ["device_id", "online", "state"],
        "properties": {"device_id": _STR, "online": {"type": "boolean"}, "profile": _NULLABLE_STR,
                       "groups": {"type": "array", "items": _STR}, "tags": {"type": "object"},
                       "model": _NULLABLE_STR, "model_version": {"type": ["string", "integer", "null"]},
                       "bundle_sha256": _NULLABLE_STR, "state": _NULLABLE_STR, "last_seen": _NUMBER,
                       "models": {"type": "array", "items": {"$ref": "#/components/schemas/ModelRow"}}},
    },
    "DeviceList": {
        "type": "object", "required": ["devices", "total"],
        "properties": {"devices": {"type": "array", "items": {"$ref": "#/components/schemas/Device"}},
                       "total": _COUNT, "offset": _COUNT, "limit": {"type": ["integer", "null"]}},
    },
    "Deployment": {
        "type": "object", "required": ["name", "bundle_sha256", "target", "priority", "targeted", "applied", "failed"],
        "properties": {"name": _STR, "bundle_sha256": _STR, "target": _STR, "priority": {"type": "integer"},
                       "targeted": _COUNT, "applied": _COUNT, "failed": _COUNT, "model": {"type": "object"},
                       "policy": {"type": "object"}, "rollout_id": _NULLABLE_STR, "created": _NUMBER},
    },
    "DeploymentList": {"type": "object", "required": ["deployments"],
                       "properties": {"deployments": {"type": "array",
                                                      "items": {"$ref": "#/components/schemas/Deployment"}}}},
    "Wave": {"type": "object", "required": ["index", "succeeded", "failed", "pending"],
             "properties": {"index": _COUNT, "succeeded": _COUNT, "failed": _COUNT, "pending": _COUNT}},
    "RolloutStatus": {
        "type": "object", "required": ["rollout_id", "state", "succeeded", "failed", "pending", "waves"],
        "properties": {"rollout_id": _STR, "state": _STR, "succeeded": _COUNT, "failed": _COUNT, "pending": _COUNT,
                       "reason": _NULLABLE_STR,
                       "waves": {"type": "array", "items": {"$ref": "#/components/schemas/Wave"}}},
    },
    "RolloutSummary": {"type": "object", "required": ["rollout_id", "state"],
                       "properties": {"rollout_id": _STR, "state": _STR, "succeeded": _COUNT, "failed": _COUNT,
                                      "pending": _COUNT}},
    "RolloutList": {"type": "object", "required": ["rollouts"],
                    "properties": {"rollouts": {"type": "array",
                                                "items": {"$ref": "#/components/schemas/RolloutSummary"}}}},
    "Event": {"type": "object", "required": ["ts", "kind"],
              "properties": {"ts": {"type": "number"}, "kind": _STR, "device_id": _NULLABLE_STR,
                             "rollout_id": _NULLABLE_STR, "deployment": _NULLABLE_STR, "message": _NULLABLE_STR,
                             "data": {"type": ["object", "null"]}}},
    "EventList": {"type": "object", "required": ["events"],
                  "properties": {"events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}}}},
    "Telemetry": {"type": "object", "description": "series for plots, oldest first"},
    "Health": {"type": "object", "required": ["leader"],
               "properties": {"leader": {"type": "boolean"}, "store": _STR, "broker": _STR,
                              "connected": {"type": "boolean"}}},
    "OperationResult": {"type": "object", "description": "the device's answer to a logs, config or restart request"},
    "ConfigResults": {"type": "object", "required": ["results"],
                      "properties": {"results": {"type": "object", "additionalProperties": {"type": "object"}}}},
}


def check_body(document: Any, schema_name: str) -> dict[str, Any]:
    """``document`` when it fits ``REQUEST_SCHEMAS[schema_name]``; else UsageError naming the field."""
    error = jsonschema.exceptions.best_match(_VALIDATORS[schema_name].iter_errors(document))
    if error is None:
        return document  # type: ignore[no-any-return]
    where = ".".join(str(part) for part in error.absolute_path)
    if error.validator == "oneOf" and not where:
        raise UsageError("the request body needs exactly one of 'device' and 'selector'")
    if error.validator == "pattern":
        raise UsageError(f"{where}: {brief(error.instance, 80)!r} does not match {error.validator_value}")
    raise UsageError(f"{where or 'the request body'}: {brief(error.message, 300)}")


def _json(schema: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _answer(description: str, schema: str | None = None, html: bool = False) -> dict[str, Any]:
    if html:
        return {"description": description, "content": {"text/html": {"schema": {"type": "string"}}}}
    return {"description": description, **(_json(schema) if schema else {})}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "bad input: the message names the field", 401: "missing or invalid bearer token",
            404: "no such thing", 409: "conflicts with what exists", 413: "the request body is over 1 MiB",
            503: "the controller cannot do it now (not the leader, broker unreachable, device not answering)"}
    return {str(code): _answer(text[code], "Error") for code in codes}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}


def _op(op_id: str, summary: str, ok: dict[str, Any], *codes: int, params: list[dict[str, Any]] | None = None,
        body: str | None = None, ok_code: int = 200) -> dict[str, Any]:
    operation: dict[str, Any] = {"operationId": op_id, "summary": summary, "parameters": params or [],
                                 "responses": {str(ok_code): ok, **_errors(*codes)}}
    if body:
        operation["requestBody"] = {"required": True, **_json(body)}
    return operation


def _api_paths() -> dict[str, Any]:
    since = _query("since", {"type": "number"}, "epoch seconds (default: an hour ago)")
    until = _query("until", {"type": "number"}, "epoch seconds (default: now)")
    limit = _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000000}, "at most this many")
    device, name, rid = _path("device_id"), _path("name"), _path("rollout_id")
    return {
        "/devices": {"get": _op("listDevices", "devices, filtered by a target condition", _answer(
            "the devices", "DeviceList"), 400, 401, params=[
            _query("q", {"type": "string"}, "a target condition, e.g. tags.site = 'milan'"),
            _query("sort", {"type": "string"}, "a column, '-' first for descending (e.g. -last_seen)"),
            limit, _query("offset", {"type": "integer", "minimum": 0}, "skip this many")])},
        "/devices/{device_id}": {"get": _op("getDevice", "one device", _answer("the device", "Device"),
                                            401, 404, params=[device])},
        "/devices/{device_id}/logs": {"get": _op("deviceLogs", "the device agent's recent log lines", _answer(
            "the device's answer", "OperationResult"), 400, 401, 404, 503, params=[
            device, _query("tail", {"type": "integer", "minimum": 1, "maximum": 10000}, "lines (default 100)")])},
        "/devices/{device_id}/config": {"get": _op("getConfig", "one model's run-time parameters on the device",
            _answer("the device's answer", "OperationResult"), 400, 401, 404, 503, params=[
                device, {**_query("model", {"type": "string", "minLength": 1}, "the model"), "required": True}])},
        "/devices/{device_id}/restart": {"post": _op("restartModel", "restart one model on the device", _answer(
            "the device's answer", "OperationResult"), 400, 401, 404, 413, 503, params=[device],
            body="RestartRequest")},
        "/config": {"post": _op("setConfig", "set model parameters on a device or a selection", _answer(
            "each device's answer", "ConfigResults"), 400, 401, 404, 413, 503, body="ConfigRequest")},
        "/deployments": {
            "get": _op("listDeployments", "deployments with their counts", _answer("deployments", "DeploymentList"),
                       401),
            "post": _op("deploy", "create or replace a deployment", _answer("the deployment", "Deployment"),
                        400, 401, 409, 413, 503, body="DeploymentSpec", ok_code=201)},
        "/deployments/{name}": {
            "get": _op("getDeployment", "one deployment", _answer("the deployment", "Deployment"), 401, 404,
                       params=[name]),
            "delete": _op("undeploy", "remove a deployment (its devices move to the next match)", _answer(
                "what was removed", "OperationResult"), 401, 404, 503, params=[name])},
        "/rollouts": {
            "get": _op("listRollouts", "every rollout, oldest first", _answer("rollouts", "RolloutList"), 401),
            "post": _op("startRollout", "start a rollout to a selection", _answer("its status", "RolloutStatus"),
                        400, 401, 404, 409, 413, 503, body="RolloutSpec", ok_code=201)},
        "/rollouts/{rollout_id}": {"get": _op("getRollout", "a rollout's progress by wave", _answer(
            "its status", "RolloutStatus"), 400, 401, 404, params=[
            rid, _query("devices", {"type": "boolean"}, "add every device's state (default false)")])},
        "/rollouts/{rollout_id}/abort": {"post": _op("abortRollout", "stop and roll the updated devices back",
                                                     _answer("its status", "RolloutStatus"), 400, 401, 404, 409, 503,
                                                     params=[rid])},
        "/events": {"get": _op("listEvents", "the event log, newest first", _answer("events", "EventList"),
                               400, 401, params=[_query("device", _STR, "one device"),
                                                 _query("rollout", _STR, "one rollout"),
                                                 _query("deployment", _STR, "one deployment"),
                                                 _query("limit", {"type": "integer", "minimum": 1, "maximum": 5000},
                                                        "at most this many (default 200)"), since])},
        "/telemetry": {"get": _op("telemetry", "telemetry series of a device or a deployment", _answer(
            "series", "Telemetry"), 400, 401, 404, params=[_query("device", _STR, "one device"),
                                                           _query("deployment", _STR, "one deployment"),
                                                           since, until])},
        "/health": {"get": _op("health", "leadership, store and broker", _answer("health", "Health"), 401)},
    }


def _console_paths() -> dict[str, Any]:
    page = _answer("an HTML page", html=True)
    missing = _answer("not found", html=True)

    def get(op_id: str, summary: str, params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {"get": {"operationId": op_id, "summary": summary, "tags": ["console"], "parameters": params or [],
                        "security": [], "responses": {"200": page, "303": {"description": "log in first"},
                                                      "400": _answer("bad filter", html=True), "404": missing}}}

    return {
        "/": get("consoleDevices", "the device table", [_query("q", _STR, "a target condition"),
                                                       _query("sort", _STR, "a column"),
                                                       _query("offset", {"type": "integer", "minimum": 0}, "")]),
        "/devices/{device_id}": get("consoleDevice", "one device", [_path("device_id")]),
        "/deployments": get("consoleDeployments", "deployments"),
        "/deployments/{name}": get("consoleDeployment", "one deployment", [_path("name")]),
        "/rollouts": get("consoleRollouts", "rollouts"),
        "/rollouts/{rollout_id}": get("consoleRollout", "one rollout, live", [_path("rollout_id")]),
        "/events": get("consoleEvents", "the event timeline", [_query("device", _STR, ""),
                                                               _query("rollout", _STR, ""),
                                                               _query("deployment", _STR, "")]),
    }


def controller_openapi(version: str, auth: bool) -> dict[str, Any]:
    """The whole document; ``auth`` adds the bearer scheme to every API operation."""
    paths = {API_PREFIX + path: item for path, item in _api_paths().items()}
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "edgedeploy controller", "version": version,
                 "description": "Devices, declarative deployments, paced rollouts, events and telemetry."},
        "paths": {**paths, **_console_paths()},
        "components": {"schemas": {**REQUEST_SCHEMAS, **_RESPONSE_SCHEMAS}},
    }
    if auth:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document
