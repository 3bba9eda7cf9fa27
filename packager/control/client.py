"""The controller's HTTP client: what ``edgedeploy fleet ... --controller URL`` calls.

:class:`ControllerClient` has the method names of the engine's ``ControlPlane`` facade and returns
the same documents, so a command reads the same whether it runs next to the store or across the
network. It uses the standard library only (urllib). An unreachable controller is one
``EdgeDeployError`` line saying so; an error answer becomes the error class its status stands for
(400 -> UsageError, so the CLI exits 2 for a bad option the controller refused), with the
controller's own one-line message.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, urlencode, urlparse

from edge_agent.errors import (
    AlreadyExistsError,
    AuthError,
    EdgeDeployError,
    NotFoundError,
    PayloadTooLargeError,
    UnavailableError,
    UsageError,
    brief,
)
from edge_agent.jsonlimits import loads_bounded
from packager.control.openapi import API_PREFIX

__all__ = ["ControllerClient"]

_ERROR_OF_STATUS: dict[int, type[EdgeDeployError]] = {
    400: UsageError, 401: AuthError, 404: NotFoundError, 409: AlreadyExistsError, 413: PayloadTooLargeError,
    503: UnavailableError,
}
_MAX_ANSWER_BYTES = 256 << 20  # a device list of 100,000 rows is about 60 MB
_TIMEOUT_S = 120.0  # starting a rollout over a large fleet writes every device's step first


class ControllerClient:
    """Talks to ``edgedeploy controller`` at ``url`` with bearer ``token`` (None: an open controller)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = _TIMEOUT_S) -> None:
        parsed = urlparse(url or "")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise UsageError(f"--controller: bad URL {url!r}: write http://HOST:PORT")
        self.url = url.rstrip("/")
        self._token = token
        self._timeout = timeout

    def _call(self, method: str, path: str, query: dict[str, Any] | None = None, body: Any = None,
              timeout: float | None = None) -> Any:
        params = {k: v for k, v in (query or {}).items() if v is not None}
        target = self.url + API_PREFIX + path + ("?" + urlencode(params) if params else "")
        headers = {"Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(target, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self._timeout) as response:
                return loads_bounded(response.read(), _MAX_ANSWER_BYTES, what="the controller's answer")
        except urllib.error.HTTPError as exc:
            raise self._error(exc) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise EdgeDeployError(f"cannot reach the controller at {self.url} ({brief(reason, 200)}); "
                                  "is it running? (edgedeploy controller)") from None

    def _error(self, exc: urllib.error.HTTPError) -> EdgeDeployError:
        try:
            message = str(loads_bounded(exc.read(), 1 << 20, what="an error answer").get("error"))
        except (EdgeDeployError, AttributeError, OSError):
            message = f"HTTP {exc.code} {exc.reason}"
        if exc.code == 401:
            message += " (give --token-file, or set $EDGEDEPLOY_CONTROLLER_TOKEN)"
        return _ERROR_OF_STATUS.get(exc.code, EdgeDeployError)(message)

    # -- the ControlPlane facade ------------------------------------------------------------------------
    def devices(self, condition: str | None = None, sort: str | None = None) -> list[dict[str, Any]]:
        """Every device (or those matching a target condition), as ``fleet devices --json`` lists them."""
        return list(self._call("GET", "/devices", {"q": condition, "sort": sort})["devices"])

    def device(self, device_id: str) -> dict[str, Any]:
        """One device; NotFoundError when the controller never heard of it."""
        return dict(self._call("GET", f"/devices/{quote(device_id, safe='')}"))

    def deployments(self) -> list[dict[str, Any]]:
        """Every deployment with its counts (targeted, applied, failed)."""
        return list(self._call("GET", "/deployments")["deployments"])

    def deploy(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Create or replace a deployment; returns it."""
        return dict(self._call("POST", "/deployments", body=spec))

    def undeploy(self, name: str) -> dict[str, Any]:
        """Remove a deployment (its devices move to the next match)."""
        return dict(self._call("DELETE", f"/deployments/{quote(name, safe='')}"))

    def start_rollout(self, spec: dict[str, Any]) -> str:
        """Start a rollout; returns its id."""
        return str(self._call("POST", "/rollouts", body=spec)["rollout_id"])

    def rollouts(self) -> list[dict[str, Any]]:
        """Every rollout's short status, oldest first."""
        return list(self._call("GET", "/rollouts")["rollouts"])

    def rollout_status(self, rollout_id: str, detail: bool = False) -> dict[str, Any]:
        """The ``fleet status --json`` document (``detail`` adds every device's state)."""
        return dict(self._call("GET", f"/rollouts/{quote(rollout_id, safe='')}",
                               {"devices": "true"} if detail else None))

    def abort(self, rollout_id: str) -> dict[str, Any]:
        """Stop a rollout and roll its updated devices back; returns its status."""
        return dict(self._call("POST", f"/rollouts/{quote(rollout_id, safe='')}/abort"))

    def events(self, limit: int = 200, device_id: str | None = None, rollout_id: str | None = None,
               deployment: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
        """The event log, newest first."""
        query = {"limit": limit, "device": device_id, "rollout": rollout_id, "deployment": deployment, "since": since}
        return list(self._call("GET", "/events", query)["events"])

    def telemetry(self, device_id: str | None = None, deployment: str | None = None, since: float | None = None,
                  until: float | None = None) -> dict[str, Any]:
        """Telemetry series of one device or one deployment."""
        query = {"device": device_id, "deployment": deployment, "since": since, "until": until}
        return dict(self._call("GET", "/telemetry", query))

    def request(self, device_id: str, op: str, args: dict[str, Any] | None = None, model: str | None = None,
                timeout: float = 10.0) -> dict[str, Any]:
        """An operation on one device (``logs``, ``config`` or ``restart``), answered by the device."""
        args = args or {}
        if op == "logs":
            return self.logs(device_id, int(args.get("tail", 100)), timeout)
        if op == "restart" and model:
            return self.restart(device_id, model, timeout)
        if op == "config" and model:
            return dict(self.config(model, args.get("params") or {}, device_id=device_id, timeout=timeout)[device_id])
        raise UsageError(f"device operation {op!r}: use logs, config MODEL or restart MODEL")

    def health(self) -> dict[str, Any]:
        """Leadership, store and broker of the controller."""
        return dict(self._call("GET", "/health"))

    # -- device operations by name ----------------------------------------------------------------------
    def logs(self, device_id: str, tail: int = 100, timeout: float = 10.0) -> dict[str, Any]:
        """The device agent's last ``tail`` log lines."""
        return dict(self._call("GET", f"/devices/{quote(device_id, safe='')}/logs", {"tail": tail},
                               timeout=timeout + 10))

    def get_config(self, device_id: str, model: str, timeout: float = 10.0) -> dict[str, Any]:
        """The run-time parameters of ``model`` on a device: ``{"model", "params"}``."""
        return dict(self._call("GET", f"/devices/{quote(device_id, safe='')}/config", {"model": model},
                               timeout=timeout + 10))

    def restart(self, device_id: str, model: str, timeout: float = 10.0) -> dict[str, Any]:
        """Restart one model on a device."""
        return dict(self._call("POST", f"/devices/{quote(device_id, safe='')}/restart", body={"model": model},
                               timeout=timeout + 10))

    def config(self, model: str, params: dict[str, Any], device_id: str | None = None,
               selector: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
        """Set run-time parameters of ``model`` on one device or a selection; each device's answer by id."""
        body: dict[str, Any] = {"model": model, "params": params}
        body.update({"device": device_id} if device_id is not None else {"selector": selector})
        return dict(self._call("POST", "/config", body=body, timeout=timeout + 20)["results"])
