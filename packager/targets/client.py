"""HTTP to a deployed service: one request, readiness probes, and scoring with the service's key.

Every target and :mod:`packager.services` talk to services through these functions; error answers
become the ``edge_agent.errors`` type of their status, with the server's message.
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from typing import Any

from edge_agent.errors import (
    AuthError,
    DeploymentError,
    EdgeDeployError,
    InferenceError,
    InvalidInputError,
    ModelNotReadyError,
    NotFoundError,
    PayloadTooLargeError,
)

__all__ = ["error_text", "http_request", "probe", "score"]

_STATUS_ERRORS: dict[int, type[EdgeDeployError]] = {
    400: InvalidInputError,
    401: AuthError,
    403: AuthError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    500: InferenceError,
    503: ModelNotReadyError,
}


def http_request(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, bytes]:
    """One HTTP request; returns (status, body). Raises DeploymentError when nothing answers."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with contextlib.closing(exc):
            return exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DeploymentError(f"no answer from {url}: {reason}") from None


def probe(url: str, timeout: float = 1.0) -> bool:
    """Whether ``url`` answers 200 (a readiness probe); no answer is False, not an error."""
    try:
        return http_request("GET", url, timeout=timeout)[0] == 200
    except DeploymentError:
        return False


def error_text(body: bytes) -> str:
    """The ``error`` message of a JSON error body, else the body's text."""
    try:
        document = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip()[:500] or "(no message)"
    if isinstance(document, dict) and "error" in document:
        return str(document["error"])
    return json.dumps(document)[:500]


def score(name: str, scoring_uri: str, data: Any, key: str | None = None, timeout: float = 30.0) -> Any:
    """``POST data`` to service ``name``'s ``scoring_uri`` (with ``key`` as bearer) and decode the answer.

    ``data`` is a JSON-able object, a JSON string, or raw ``bytes`` (sent as
    ``application/octet-stream``, e.g. an image for an entry script).
    """
    body, content_type = _encode(data)
    headers = {"Content-Type": content_type}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    status, answer = http_request("POST", scoring_uri, body, headers, timeout=timeout)
    if status != 200:
        error = _STATUS_ERRORS.get(status, DeploymentError)
        raise error(f"service {name!r} answered HTTP {status}: {error_text(answer)}")
    try:
        return json.loads(answer)
    except ValueError:
        return answer


def _encode(data: Any) -> tuple[bytes, str]:
    if isinstance(data, bytes | bytearray):
        return bytes(data), "application/octet-stream"
    if isinstance(data, str):
        return data.encode(), "application/json"
    return json.dumps(data).encode(), "application/json"
