"""``edgedeploy fleet logs|config|restart``: operations on devices, answered over the broker.

``fleet config TARGET MODEL KEY=VALUE...`` takes a device id or a selector (``all``,
``device:ID[,ID...]``, ``group:NAME``, ``tag:KEY=VALUE``); a selector asks every online device it
matches at once and prints one line per device. A value is JSON when it parses as JSON
(``0.7``, ``true``, ``[1,2]``, ``null`` removes the key), else a string.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from edge_agent.errors import EdgeDeployError, NotFoundError, UsageError, ValidationError
from edge_agent.jsonlimits import loads_bounded
from packager.cli.output import print_json
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


def _logs(args: argparse.Namespace, controller: Callable[[argparse.Namespace], FleetController]) -> int:
    if args.tail < 1:
        raise UsageError("--tail must be at least 1")
    with controller(args) as ctl:
        lines = ctl.operations().logs(args.device, args.tail, timeout=args.timeout)
    for line in lines:
        print(line)
    return 0


def _config(args: argparse.Namespace, controller: Callable[[argparse.Namespace], FleetController]) -> int:
    settings = parse_settings(args.settings)
    with controller(args) as ctl:
        ops = ctl.operations()
        if not _is_selector(args.target):
            if not settings:
                print_json(ops.get_config(args.target, args.model, timeout=args.timeout))
            else:
                print(_config_line(args.target, ops.configure(args.target, args.model, settings,
                                                              timeout=args.timeout)))
            return 0
        devices = _selected(ctl, args.target)
        op, body = ("config", {"params": settings}) if settings else ("get-config", {})
        results = ops.fan_out(devices, op, body, model=args.model, timeout=args.timeout)
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
    with controller(args) as ctl:
        result = ctl.operations().restart(args.device, args.model, timeout=args.timeout)
    print(f"{args.device}: {result['model']} restarted (version {result.get('version')})")
    return 0
