"""``edgedeploy profile``: the device profiles the packager and the agent read."""

from __future__ import annotations

import argparse

import yaml

from edge_agent.profiles import list_profiles, load_profile
from packager.cli.output import print_json, print_table

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("profile", help="device profiles")
    sub = parser.add_subparsers(dest="profile_command", metavar="ACTION", required=True)
    lst = sub.add_parser("list", help="every known device profile")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_list)
    show = sub.add_parser("show", help="one device profile")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_show)


def _list(args: argparse.Namespace) -> int:
    rows = [{**p.to_dict(), "source": p.source} for p in list_profiles()]
    if args.json:
        print_json(rows)
    else:
        print_table(rows, ["name", "architecture", "backend", "execution_providers", "precisions",
                           "default_quantization"])
    return 0


def _show(args: argparse.Namespace) -> int:
    profile = load_profile(args.name)
    if args.json:
        print_json({**profile.to_dict(), "source": profile.source})
    else:
        print(f"# {profile.source}")
        print(yaml.safe_dump(profile.to_dict(), sort_keys=False).rstrip())
    return 0
