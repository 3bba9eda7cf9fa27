"""``edgedeploy fleet logs|config|restart``: operations on devices, answered over the broker.

With ``--controller URL`` (or ``$EDGEDEPLOY_CONTROLLER``) the controller asks the devices (its API's
``devices/{id}/logs``, ``devices/{id}/restart`` and ``config``); otherwise this command does, over
the broker. The output is the same either way.

``fleet config TARGET MODEL KEY=VALUE...`` takes a device id or a selector (``all``,
``device:ID[,ID...]``, ``group:NAME``, ``tag:KEY=VALUE``); a selector asks every online device it
matches at once and prints one line per device. A value is JSON when it parses as JSON
(``0.7``, ``true``, ``[1,2]``, ``null`` removes the key), else a string.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

from edge_agent.errors import EdgeDeployError, NotFoundError, UsageError, ValidationError
from edge_agent.jsonlimits import loads_bounded
from packager.cli.fleet_control import remote
from packager.cli.output import print_json
from packager.control.client import ControllerClient
from packager.fleet import FleetController
from packager.fleet_ops import DEFAULT_TIMEOUT_S

__all__ = ["parse_settings", "register"]

_SELECTOR_KINDS = ("device", "group", "tag")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
             controller: Callable[[argparse.Namespace], FleetController]) -> None:
    """Add ``fleet logs|config|restart`` (``controller(args)`` opens the broker link)."""
    timeout = argparse.ArgumentParser(add_help=False)
    timeout.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                         help=f"seconds to wait for each device's answer (default {DEFAULT_TIMEOUT_S:g})")

    logs = sub.add_parser("logs", parents=[common, timeout], help="a device agent's recent log lines")
    logs.add_argument("device")
    logs.add_argument("--tail", type=int, default=100, help="how many of the newest lines (default 100)")
    logs.set_defaults(func=lambda args: _logs(args, controller))

    config = sub.add_parser("config", parents=[common, timeout],
                            help="set (KEY=VALUE...) or show a model's run-time parameters")
    config.add_argument("target", metavar="DEVICE|SELECTOR")
    config.add_argument("model")
    config.add_argument("settings", nargs="*", metavar="KEY=VALUE")
    config.set_defaults(func=lambda args: _config(args, controller))

    restart = sub.add_parser("restart", parents=[common, timeout],
                             help="reload a model from its active slot (it keeps serving meanwhile)")
    restart.add_argument("device")
    restart.add_argument("model")
    restart.set_defaults(func=lambda args: _restart(args, controller))


def parse_settings(words: list[str]) -> dict[str, Any]:
    """``["threshold=0.7", "mode=fast"]`` -> ``{"threshold": 0.7, "mode": "fast"}`` (JSON when it parses)."""
    settings: dict[str, Any] = {}
    for word in words:
        key, sep, text = word.partition("=")
        if not sep or not key:
            raise UsageError(f"bad setting {word!r}: write KEY=VALUE")
        try:
            settings[key] = loads_bounded(text, max_bytes=16 * 1024, what=f"value of {key}")
        except ValidationError:
            settings[key] = text
    return settings


def _is_selector(target: str) -> bool:
    return target == "all" or target.partition(":")[0] in _SELECTOR_KINDS


class _RemoteOps:
    """The operations of :class:`packager.fleet_ops.FleetOps`, asked of a controller."""

    def __init__(self, client: ControllerClient) -> None:
        self.client = client

    def logs(self, device_id: str, tail: int, timeout: float) -> list[str]:
        return list(self.client.logs(device_id, tail, timeout)["lines"])

    def configure(self, device_id: str, model: str, settings: dict[str, Any], timeout: float) -> dict[str, Any]:
        answer = self.client.config(model, settings, device_id=device_id, timeout=timeout)[device_id]
        if "error" in answer:
            raise EdgeDeployError(answer["error"])
        return dict(answer)

    def get_config(self, device_id: str, model: str, timeout: float) -> dict[str, Any]:
        return dict(self.client.get_config(device_id, model, timeout)["params"])

    def restart(self, device_id: str, model: str, timeout: float) -> dict[str, Any]:
        return self.client.restart(device_id, model, timeout)


@contextlib.contextmanager
def _operations(args: argparse.Namespace,
                controller: Callable[[argparse.Namespace], FleetController]) -> Iterator[Any]:
    """The controller's operations when one is configured, else ours over the broker."""
    client = remote(args)
    if client is not None:
        yield _RemoteOps(client)
        return
    with controller(args) as ctl:
        yield ctl.operations()


def _logs(args: argparse.Namespace, controller: Callable[[argparse.Namespace], FleetController]) -> int:
    if args.tail < 1:
        raise UsageError("--tail must be at least 1")
    with _operations(args, controller) as ops:
        lines = ops.logs(args.device, args.tail, timeout=args.timeout)
    for line in lines:
        print(line)
    return 0


def _config(args: argparse.Namespace, controller: Callable[[argparse.Namespace], FleetController]) -> int:
    settings = parse_settings(args.settings)
    if not _is_selector(args.target):
        with _operations(args, controller) as ops:
            if not settings:
                print_json(ops.get_config(args.target, args.model, timeout=args.timeout))
            else:
                print(_config_line(args.target, ops.configure(args.target, args.model, settings,
                                                              timeout=args.timeout)))
        return 0
    client = remote(args)
    if client is not None:
        answers = client.config(args.model, settings, selector=args.target, timeout=args.timeout)
        results: dict[str, Any] = {d: EdgeDeployError(a["error"]) if "error" in a else a for d, a in answers.items()}
    else:
        with controller(args) as ctl:
            devices = _selected(ctl, args.target)
            op, body = ("config", {"params": settings}) if settings else ("get-config", {})
            results = ctl.operations().fan_out(devices, op, body, model=args.model, timeout=args.timeout)
    failed = 0
    for device_id, result in sorted(results.items()):
        if isinstance(result, EdgeDeployError):
            failed += 1
            print(f"{device_id}: error: {str(result).removeprefix(device_id + ': ')}")
        else:
            print(_config_line(device_id, result))
    return 1 if failed else 0


def _config_line(device_id: str, result: dict[str, Any]) -> str:
    line = f"{device_id}: {result['model']} {json.dumps(result['params'], sort_keys=True)}"
    return line if result.get("applied", True) else line + " (not serving now: applies at its next load)"


def _selected(ctl: FleetController, target: str) -> list[str]:
    """The devices a selector picks (see FleetController.select); NotFoundError when none."""
    rows = ctl.select(target)
    if not rows:
        raise NotFoundError(f"no online device matches {target!r}; see `edgedeploy fleet devices`")
    return [d["device_id"] for d in rows]


def _restart(args: argparse.Namespace, controller: Callable[[argparse.Namespace], FleetController]) -> int:
    with _operations(args, controller) as ops:
        result = ops.restart(args.device, args.model, timeout=args.timeout)
    print(f"{args.device}: {result['model']} restarted (version {result.get('version')})")
    return 0
