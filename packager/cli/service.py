"""``edgedeploy service``: list, show, logs, keys, update and delete deployed services."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from packager import services
from packager.cli.output import print_json, print_table, progress

__all__ = ["register"]

_COLUMNS = ["name", "state", "model", "version", "scoring_uri", "grpc_target", "auth_enabled"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``service`` and its actions to the ``edgedeploy`` parser."""
    parser = subparsers.add_parser("service", help="list, show, log, key, update and delete services")
    sub = parser.add_subparsers(dest="service_command", metavar="ACTION", required=True)

    lst = sub.add_parser("list", help="every service with its live state")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_list)

    show = sub.add_parser("show", help="state, scoring_uri, swagger_uri, grpc_target, auth")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_show)

    logs = sub.add_parser("logs", help="the service's log")
    logs.add_argument("name")
    logs.add_argument("--tail", type=int, default=None, help="only the last N lines")
    logs.set_defaults(func=_logs)

    keys = sub.add_parser("keys", help="show or regenerate the service's keys")
    keys.add_argument("name")
    keys.add_argument("--regenerate", choices=("primary", "secondary"))
    keys.add_argument("--json", action="store_true")
    keys.set_defaults(func=_keys)

    update = sub.add_parser("update", help="hot-swap a new bundle, with no failed requests")
    update.add_argument("name")
    update.add_argument("--bundle", required=True, type=Path)
    update.set_defaults(func=_update)

    delete = sub.add_parser("delete", help="stop the service and remove it")
    delete.add_argument("name")
    delete.set_defaults(func=_delete)


def _list(args: argparse.Namespace) -> int:
    rows = [s.to_dict() for s in services.list_services()]
    if args.json:
        print_json(rows)
    else:
        print_table(rows, _COLUMNS, empty="(no services; start one with 'edgedeploy deploy')")
    return 0


def _show(args: argparse.Namespace) -> int:
    document = services.get_service(args.name).to_dict()
    if args.json:
        print_json(document)
    else:
        width = max(len(key) for key in document)
        for key, value in document.items():
            print(f"{key.ljust(width)}  {_text(value)}")
    return 0


def _text(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_text(v)}" for k, v in sorted(value.items())) or "-"
    return str(value)


def _logs(args: argparse.Namespace) -> int:
    sys.stdout.write(services.logs(args.name, args.tail))
    return 0


def _keys(args: argparse.Namespace) -> int:
    which = args.regenerate
    keys = services.regenerate_key(args.name, which) if which else services.get_keys(args.name)
    if args.json:
        print_json(keys)
    else:
        print(f"primary_key    {keys['primary_key']}")
        print(f"secondary_key  {keys['secondary_key']}")
    return 0


def _update(args: argparse.Namespace) -> int:
    with progress(f"updating {args.name}"):
        service = services.update(args.name, args.bundle)
    print(f"service {service.name} now serves {service.model} version {service.version} ({service.state})")
    return 0


def _delete(args: argparse.Namespace) -> int:
    services.delete(args.name)
    print(f"deleted service {args.name}")
    return 0
