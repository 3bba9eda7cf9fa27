"""The REST adapter (aiohttp): Open Inference Protocol v2 paths, Azure ML-style ``/score``,
``/swagger.json`` and Prometheus ``/metrics``.

Handlers parse, call the data plane and format. Errors become HTTP statuses in one middleware.
The v2 binary tensor extension (``Inference-Header-Content-Length``) is supported both ways, as
``tritonclient.http`` uses it by default.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from aiohttp import web

from edge_agent.auth import AuthKeys
from edge_agent.dataplane import DataPlane, InflightBytes
from edge_agent.error_status import http_status
from edge_agent.errors import EdgeDeployError, InvalidInputError, ValidationError
from edge_agent.grpc.converters import decode_bytes, element_count, encode_bytes
from edge_agent.inference import InferRequest, InferResponse
from edge_agent.jsonlimits import loads_bounded
from edge_agent.metrics import LATENCY_BUCKETS_MS
from edge_agent.openapi import score_openapi
from edge_agent.tensors import numpy_to_v2, v2_to_numpy

__all__ = ["build_app"]

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# /swagger.json needs the key too when auth is on: it shows model names, tensors and the bundle's samples
_OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")
_HEADER_LENGTH = "Inference-Header-Content-Length"
DATAPLANE = web.AppKey("dataplane", DataPlane)
KEYS = web.AppKey("keys", AuthKeys)
INFLIGHT = web.AppKey("inflight", InflightBytes)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except EdgeDeployError as exc:
        status = http_status(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return web.json_response({"error": str(exc)}, status=status, headers=headers)
    except web.HTTPRequestEntityTooLarge as exc:
        return web.json_response({"error": f"request body too large: {exc.text}"}, status=413)
    except web.HTTPException:
        raise
    except Exception:  # a bug: answer 500 without internals, keep serving
        log.exception("unexpected error answering %s %s", request.method, request.path)
        return web.json_response({"error": "internal server error"}, status=500)


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path not in _OPEN_PATHS:
        request.app[KEYS].check(request.headers.get("Authorization"))
    return await handler(request)


@web.middleware
async def _admission(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Hold a body's bytes against the server's in-flight limit while it is answered (503 beyond it)."""
    if request.method != "POST":
        return await handler(request)
    size = request.content_length
    if size is None:  # chunked: the body is read (within client_max_size) to learn its size
        size = len(await request.read())
    with request.app[INFLIGHT].hold(size):
        return await handler(request)


def _dp(request: web.Request) -> DataPlane:
    return request.app[DATAPLANE]


def _parse_json(body: bytes) -> Any:
    """A JSON request body, refused (400) when it is invalid, too deep or holds NaN/Infinity/1e400."""
    return loads_bounded(body, what="the request body")


async def _json_body(request: web.Request) -> Any:
    return _parse_json(await request.read())


# --- health and metadata ---------------------------------------------------------------------------


async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": _dp(request).live()})


async def ready(request: web.Request) -> web.Response:
    is_ready = _dp(request).ready()
    return web.json_response({"ready": is_ready}, status=200 if is_ready else 503)


async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response(_dp(request).server_metadata())


def _version(request: web.Request) -> str | None:
    return request.match_info.get("version")


async def model_metadata(request: web.Request) -> web.Response:
    return web.json_response(_dp(request).model_metadata(request.match_info["name"], _version(request)))


async def model_ready(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    is_ready = _dp(request).model_ready(name, _version(request))
    return web.json_response({"name": name, "ready": is_ready}, status=200 if is_ready else 503)


# --- inference -------------------------------------------------------------------------------------


def _split_binary(request: web.Request, body: bytes) -> tuple[dict[str, Any], bytes]:
    header = request.headers.get(_HEADER_LENGTH)
    if header is None:
        return _parse_json(body), b""
    try:
        length = int(header)
    except ValueError:
        raise InvalidInputError(f"{_HEADER_LENGTH} is not a number") from None
    if not 0 <= length <= len(body):
        raise InvalidInputError(f"{_HEADER_LENGTH} {length} is outside the body")
    return _parse_json(body[:length]), body[length:]


def _decode_tensor(spec: dict[str, Any], binary: memoryview, offset: int) -> tuple[np.ndarray, int]:
    name, datatype = spec.get("name"), spec.get("datatype")
    shape = spec.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list):
        raise InvalidInputError("each input needs 'name', 'datatype' and 'shape'")
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InvalidInputError(f"input {name!r}: shape must be non-negative integers")
    try:
        dtype = v2_to_numpy(datatype)
    except ValidationError:
        raise InvalidInputError(f"input {name!r}: unknown datatype {datatype!r}") from None
    count = element_count(name, shape)
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None and "data" in spec:
        raise InvalidInputError(f"input {name!r} has both 'data' and binary_data_size; send one")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise InvalidInputError(f"input {name!r}: binary_data_size is outside the body")
        chunk = bytes(binary[offset:offset + size])
        if datatype == "BYTES":
            return decode_bytes(chunk, count).reshape(shape), offset + size
        if size != count * dtype.itemsize:
            raise InvalidInputError(f"input {name!r}: {size} bytes do not make shape {shape} of {datatype}")
        return np.frombuffer(chunk, dtype=dtype).reshape(shape), offset + size
    if "data" not in spec:
        raise InvalidInputError(f"input {name!r} has no 'data'")
    try:
        array = np.asarray(spec["data"], dtype=dtype if datatype != "BYTES" else np.object_)
    except (ValueError, TypeError):
        raise InvalidInputError(f"input {name!r}: data does not fit datatype {datatype}") from None
    if array.size != count:
        raise InvalidInputError(f"input {name!r} has {array.size} values, shape {shape} needs {count}")
    return array.reshape(shape), offset


def _parse_infer(name: str, version: str | None, document: Any, binary: bytes) -> tuple[InferRequest, set[str], bool]:
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise InvalidInputError("a v2 infer request is a JSON object with an 'inputs' list")
    inputs, offset, view = {}, 0, memoryview(binary)
    for spec in document["inputs"]:
        if not isinstance(spec, dict):
            raise InvalidInputError("each input must be a JSON object")
        array, offset = _decode_tensor(spec, view, offset)
        if spec["name"] in inputs:
            raise InvalidInputError(f"input {spec['name']!r} appears twice")
        inputs[spec["name"]] = array
    outputs = document.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                for o in outputs):
        raise InvalidInputError("'outputs' must be a list of objects with a 'name'")
    binary_out = {o["name"] for o in outputs if (o.get("parameters") or {}).get("binary_data")}
    all_binary = bool((document.get("parameters") or {}).get("binary_data_output"))
    request = InferRequest(name, inputs, version, document.get("id"), [o["name"] for o in outputs] or None,
                           document.get("parameters") or {})
    return request, binary_out, all_binary


def _format_infer(response: InferResponse, binary_out: set[str], all_binary: bool) -> web.Response:
    outputs, chunks = [], []
    for name, value in response.outputs.items():
        array = np.asarray(value)
        datatype = numpy_to_v2(array.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if all_binary or name in binary_out:
            data = encode_bytes(array) if datatype == "BYTES" else np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = [x.decode(errors="replace") if isinstance(x, bytes) else x
                             for x in array.reshape(-1).tolist()]
        outputs.append(entry)
    document = {"model_name": response.model_name, "model_version": response.model_version, "outputs": outputs}
    if response.id:
        document["id"] = response.id
    header = json.dumps(document).encode()
    if not chunks:
        return web.Response(body=header, content_type="application/json")
    return web.Response(body=header + b"".join(chunks), content_type="application/octet-stream",
                        headers={_HEADER_LENGTH: str(len(header))})


async def infer(request: web.Request) -> web.Response:
    document, binary = _split_binary(request, await request.read())
    parsed, binary_out, all_binary = _parse_infer(request.match_info["name"], _version(request), document, binary)
    return _format_infer(await _dp(request).infer(parsed), binary_out, all_binary)


async def score(request: web.Request) -> web.Response:
    dataplane = _dp(request)
    name = request.match_info.get("name") or dataplane.default_model()
    body = await request.read()
    content_type = request.content_type or "application/octet-stream"
    if content_type == "application/json":
        _parse_json(body)  # refuse what the model's own parser would choke on (depth, NaN) with a 400
    result = await dataplane.score(name, body, content_type)
    return web.json_response(result)


# --- repository, swagger, metrics ------------------------------------------------------------------


async def repository_index(request: web.Request) -> web.Response:
    return web.json_response(_dp(request).repository_index())


async def repository_load(request: web.Request) -> web.Response:
    document = await _json_body(request) if request.can_read_body else {}
    parameters = (document or {}).get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInputError("'parameters' must be an object")
    await _dp(request).load(request.match_info["name"], parameters.get("bundle"))
    return web.json_response({})


async def repository_unload(request: web.Request) -> web.Response:
    await _dp(request).unload(request.match_info["name"])
    return web.json_response({})


async def swagger(request: web.Request) -> web.Response:
    dataplane = _dp(request)
    name = request.query.get("model") or dataplane.default_model()
    input_sample, output_sample = dataplane.model_samples(name)
    version = dataplane.model_metadata(name)["versions"]
    document = score_openapi(name, version[0] if version else "1", input_sample, output_sample,
                             dataplane.model_schema(name), request.app[KEYS].enabled)
    return web.json_response(document)


def _escape(label: str) -> str:
    return label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format: requests, errors and a latency histogram per model."""
    lines = ["# HELP edgedeploy_requests_total Inference requests answered, per model.",
             "# TYPE edgedeploy_requests_total counter",
             "# HELP edgedeploy_errors_total Inference requests answered with an error, per model.",
             "# TYPE edgedeploy_errors_total counter",
             "# HELP edgedeploy_request_latency_ms Inference latency in milliseconds, per model.",
             "# TYPE edgedeploy_request_latency_ms histogram"]
    for name, (cumulative, total_ms, count, errors) in _dp(request).metrics.histograms().items():
        label = f'model="{_escape(name)}"'
        lines += [f"edgedeploy_requests_total{{{label}}} {count}", f"edgedeploy_errors_total{{{label}}} {errors}"]
        for edge, value in zip((*LATENCY_BUCKETS_MS, "+Inf"), cumulative, strict=True):
            lines.append(f'edgedeploy_request_latency_ms_bucket{{{label},le="{edge}"}} {value}')
        lines += [f"edgedeploy_request_latency_ms_sum{{{label}}} {total_ms:.6f}",
                  f"edgedeploy_request_latency_ms_count{{{label}}} {count}"]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")


def build_app(dataplane: DataPlane, keys: AuthKeys, max_request_bytes: int,
              inflight: InflightBytes | None = None) -> web.Application:
    """The aiohttp application serving ``dataplane``; ``inflight`` bounds the bytes of bodies in flight."""
    app = web.Application(middlewares=[_errors, _auth, _admission], client_max_size=max_request_bytes)
    app[DATAPLANE] = dataplane
    app[KEYS] = keys
    app[INFLIGHT] = inflight or InflightBytes(None)
    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    app.add_routes([
        web.get("/v2/health/live", live),
        web.get("/v2/health/ready", ready),
        web.get("/v2", server_metadata),
        web.get(model, model_metadata),
        web.get(versioned, model_metadata),
        web.get(model + "/ready", model_ready),
        web.get(versioned + "/ready", model_ready),
        web.post(model + "/infer", infer),
        web.post(versioned + "/infer", infer),
        web.post("/score", score),
        web.post(model + "/score", score),
        web.post("/v2/repository/index", repository_index),
        web.post("/v2/repository/models/{name}/load", repository_load),
        web.post("/v2/repository/models/{name}/unload", repository_unload),
        web.get("/swagger.json", swagger),
        web.get("/metrics", metrics),
    ])
    return app
