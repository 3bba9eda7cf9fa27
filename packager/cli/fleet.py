"""``edgedeploy fleet``: devices, rollouts in waves, status and abort, over MQTT or through a controller.

Without ``--controller`` the commands talk to the broker directly (:class:`~packager.fleet.FleetController`);
with it they go through ``edgedeploy controller``'s HTTP API (:mod:`packager.cli.fleet_control`) and print
the same shapes.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.errors import UsageError
from packager.cli import fleet_ca, fleet_ops
from packager.cli.fleet_control import add_controller_options, bundle_server_default, register_deployments, remote
from packager.cli.output import print_json, print_table, progress
from packager.cli.rollout_view import RolloutView, follow, summary_line
from packager.fleet import (
    DEFAULT_BROKER,
    TERMINAL,
    DeviceSelector,
    FleetController,
    broker_tls,
    parse_wave,
    publish_target,
)

__all__ = ["register"]

_TLS_OPTIONS = {  # an mqtts:// broker's CA and the controller's identity (edgedeploy fleet enroll --controller)
    "--ca-file": "CA file of the broker's certificate (default $EDGEDEPLOY_BROKER_CA, else the system's CAs)",
    "--tls-cert": "the controller's client certificate (default $EDGEDEPLOY_BROKER_CERT)",
    "--tls-key": "its key (default $EDGEDEPLOY_BROKER_KEY)",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``fleet devices|rollout|status|abort`` and ``fleet logs|config|restart`` to the CLI."""
    parser = subparsers.add_parser("fleet", help="devices and rollouts over MQTT")
    broker_help = f"broker URL (default $EDGEDEPLOY_BROKER, else {DEFAULT_BROKER})"
    parser.add_argument("--broker", default=None, help=broker_help)
    # --broker is accepted after the action too (`fleet devices --broker URL`); SUPPRESS keeps a value
    # given before the action from being overwritten by the action's default
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--broker", default=argparse.SUPPRESS, help=broker_help)
    version_help = "MQTT protocol: auto (5, falling back to 3.1.1), 5 or 3.1.1 (default auto)"
    for where, default in ((parser, "auto"), (common, argparse.SUPPRESS)):
        where.add_argument("--mqtt-version", choices=("auto", "5", "3.1.1"), default=default, help=version_help)
    for where, missing in ((parser, None), (common, argparse.SUPPRESS)):
        for option, text in _TLS_OPTIONS.items():
            where.add_argument(option, type=Path, default=missing, help=text)
    add_controller_options(parser, common)
    sub = parser.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)
    fleet_ca.register(sub)

    devices = sub.add_parser("devices", parents=[common], help="devices and what they run")
    devices.add_argument("--json", action="store_true")
    devices.set_defaults(func=_devices)

    rollout = sub.add_parser("rollout", parents=[common], help="roll a bundle out to devices in waves")
    rollout.add_argument("bundle", type=Path)
    rollout.add_argument("--to", required=True, dest="selector",
                         help="all, device:ID[,ID...], group:NAME or tag:KEY=VALUE")
    rollout.add_argument("--server", default=bundle_server_default(),
                         help="bundle server URL devices download from (edgedeploy serve)")
    rollout.add_argument("--canary", type=int, default=1, help="devices in the first wave (default 1)")
    rollout.add_argument("--wave", default="25%", help="wave size: N devices or P%% (default 25%%)")
    rollout.add_argument("--max-failures", default="10%", help="failure rate that halts and rolls back")
    rollout.add_argument("--wave-timeout", type=float, default=300.0, help="seconds a device may take")
    rollout.add_argument("--wait", action="store_true",
                         help="block until the rollout ends (without it, `fleet status ID` sends later waves)")
    rollout.add_argument("--json", action="store_true")
    rollout.set_defaults(func=_rollout)

    status = sub.add_parser("status", parents=[common], help="a rollout's progress (no id: every rollout)")
    status.add_argument("rollout_id", nargs="?")
    status.add_argument("--watch", action="store_true", help="follow the rollout live until it ends")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)

    abort = sub.add_parser("abort", parents=[common], help="stop a rollout and roll the updated devices back")
    abort.add_argument("rollout_id")
    abort.set_defaults(func=_abort)

    register_deployments(sub, common)
    fleet_ops.register(sub, common, _controller)


def _controller(args: argparse.Namespace) -> FleetController:
    url = args.broker or os.environ.get("EDGEDEPLOY_BROKER") or DEFAULT_BROKER
    # the $EDGEDEPLOY_BROKER_* files count for mqtts:// only; options given for mqtt:// are refused
    tls = broker_tls(args.ca_file, args.tls_cert, args.tls_key, os.environ if url.startswith("mqtts://") else {})
    return FleetController(url, mqtt_version=args.mqtt_version, tls=tls)


_DEVICE_FIELDS = ("device_id", "online", "model", "model_version", "bundle_sha256", "state", "last_seen", "groups",
                  "tags", "models", "refused")


def _devices(args: argparse.Namespace) -> int:
    client = remote(args)
    if client is not None:
        rows = client.devices()
    else:
        with _controller(args) as ctl:
            rows = ctl.devices()
    if args.json:
        print_json([{k: r.get(k) for k in _DEVICE_FIELDS} for r in rows])
    else:
        table = [dict(r, models=", ".join(f"{m['name']}:{m['version']} {m['state']}" for m in r.get("models") or []))
                 for r in rows]
        print_table(table, ["device_id", "online", "state", "model", "model_version", "bundle_sha256", "models"])
    return 0


def _print_status(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(doc)
        return
    print(summary_line(doc))
    print_table(doc["waves"], ["index", "succeeded", "failed", "pending", "rolled_back"])


def _ended(doc: dict[str, Any]) -> bool:
    """A rollout run from here (packager.fleet) is over."""
    return doc["state"] in TERMINAL


def _ended_in_controller(doc: dict[str, Any]) -> bool:
    """A rollout the controller runs is over (it also supersedes a deployment's older rollouts)."""
    from packager.control.engine import TERMINAL as CONTROLLER_TERMINAL

    return doc["state"] in CONTROLLER_TERMINAL


def _rollout(args: argparse.Namespace) -> int:
    client = remote(args)
    view = RolloutView(quiet=args.json)
    if client is not None:
        DeviceSelector.parse(args.selector)
        parse_wave(args.wave)
        policy = {"canary": str(args.canary), "wave": args.wave, "max_failures": args.max_failures,
                  "wave_timeout": str(args.wave_timeout)}
        rollout_id = client.start_rollout({**publish_target(args.bundle, args.server), "selector": args.selector,
                                           "policy": policy})
        if args.wait:
            follow(lambda: client.rollout_status(rollout_id), view, _ended_in_controller)
        doc = client.rollout_status(rollout_id, detail=True)
    else:
        with _controller(args) as ctl:
            with progress("starting the rollout"):
                rollout_id = ctl.rollout(args.bundle, args.selector, args.server, canary=args.canary, wave=args.wave,
                                         max_failures=args.max_failures, wave_timeout=args.wave_timeout)
            if args.wait:
                try:
                    view.update(ctl.status(rollout_id, advance=False))
                    ctl.resume(rollout_id, on_step=view.update)
                finally:
                    view.close()
            doc = ctl.status(rollout_id, advance=False)
    _print_status(doc, args.json)
    return 1 if args.wait and doc["state"] != "succeeded" else 0


def _watch_then_read(args: argparse.Namespace, brief: Callable[[], dict[str, Any]],
                     full: Callable[[], dict[str, Any]], ended: Callable[[dict[str, Any]], bool],
                     interval: float) -> dict[str, Any]:
    """With ``--watch``, follow ``brief`` statuses until the rollout ``ended``; then the ``full`` one."""
    if args.watch:
        follow(brief, RolloutView(quiet=args.json), ended, interval)
    return full()


def _status(args: argparse.Namespace) -> int:
    client = remote(args)
    if args.rollout_id is None:
        if args.watch:
            raise UsageError("fleet status --watch needs a ROLLOUT_ID (fleet status lists them)")
        if client is not None:
            rows = client.rollouts()
        else:
            with _controller(args) as ctl:
                rows = ctl.list_rollouts()
        if args.json:
            print_json(rows)
        else:
            print_table(rows, ["rollout_id", "state", "succeeded", "failed", "pending", "selector"])
        return 0
    if client is not None:
        doc = _watch_then_read(args, lambda: client.rollout_status(args.rollout_id),
                               lambda: client.rollout_status(args.rollout_id, detail=True), _ended_in_controller, 1.0)
    else:
        with _controller(args) as ctl:  # each read advances a rollout that runs without a controller
            def read() -> dict[str, Any]:
                return ctl.status(args.rollout_id)

            doc = _watch_then_read(args, read, read, _ended, 0.5)
    _print_status(doc, args.json)
    return 0


def _abort(args: argparse.Namespace) -> int:
    client = remote(args)
    if client is not None:
        doc = client.abort(args.rollout_id)
    else:
        with _controller(args) as ctl:
            doc = ctl.abort(args.rollout_id)
    print(f"rollout {doc['rollout_id']}: rolled back {doc.get('rolled_back', 0)} device(s)")
    return 0
