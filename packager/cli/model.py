"""``edgedeploy model``: register, list, show, locate, download and delete registered models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_agent.errors import UsageError
from packager.cli.output import print_json, print_table, progress
from packager.registry import Registry, parse_key_values, parse_model_ref

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``model`` command group."""
    parser = subparsers.add_parser("model", help="the model registry")
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    reg = sub.add_parser("register", help="store a model file or folder as the next version of NAME")
    reg.add_argument("name")
    reg.add_argument("path", type=Path)
    reg.add_argument("--tag", action="append", default=[], metavar="K=V")
    reg.add_argument("--property", action="append", default=[], metavar="K=V")
    reg.add_argument("--description", default="")
    reg.add_argument("--framework", default=None)
    reg.add_argument("--json", action="store_true", help="print the new version's record as JSON")
    reg.set_defaults(func=_register)

    lst = sub.add_parser("list", help="registered versions")
    lst.add_argument("--name", default=None)
    lst.add_argument("--tag", action="append", default=[], metavar="K=V")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_list)

    show = sub.add_parser("show", help="one version's metadata (latest by default)")
    show.add_argument("ref", metavar="NAME[:VERSION]")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_show)

    path = sub.add_parser("path", help="print the local path of a model (file, or folder)")
    path.add_argument("ref", metavar="NAME[:VERSION]")
    path.set_defaults(func=_path)

    down = sub.add_parser("download", help="copy a model's files into a folder")
    down.add_argument("ref", metavar="NAME[:VERSION]")
    down.add_argument("-o", "--output", required=True, type=Path, metavar="DIR")
    down.set_defaults(func=_download)

    delete = sub.add_parser("delete", help="delete one version, or all with --all-versions")
    delete.add_argument("ref", metavar="NAME[:VERSION]")
    delete.add_argument("--all-versions", action="store_true")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    delete.set_defaults(func=_delete)


def _register(args: argparse.Namespace) -> int:
    tags = parse_key_values(args.tag, "tag")
    properties = parse_key_values(args.property, "property")
    with progress(f"registering {args.path}"):
        record = Registry().register(args.name, args.path, tags, properties, args.description, args.framework)
    if args.json:
        print_json(record.to_dict())
    else:
        print(record.ref)
    return 0


def _list(args: argparse.Namespace) -> int:
    records = Registry().list(args.name, parse_key_values(args.tag, "tag"))
    if args.json:
        print_json([r.to_dict() for r in records])
    else:
        rows = [r.to_dict() for r in records]
        print_table(rows, ["name", "version", "kind", "size", "framework", "tags", "created"])
    return 0


def _show(args: argparse.Namespace) -> int:
    document = Registry().get(*parse_model_ref(args.ref)).to_dict()
    if args.json:
        print_json(document)
        return 0
    files = document.pop("files")
    for key, value in document.items():
        shown = ", ".join(f"{k}={v}" for k, v in sorted(value.items())) if isinstance(value, dict) else value
        print(f"{key + ':':<13} {'-' if shown in (None, '') else shown}")
    print("files:")
    for entry in files:
        print(f"  {entry['path']}  {entry['size']} bytes  sha256 {entry['sha256']}")
    return 0


def _path(args: argparse.Namespace) -> int:
    print(Registry().get_model_path(*parse_model_ref(args.ref)))
    return 0


def _download(args: argparse.Namespace) -> int:
    name, version = parse_model_ref(args.ref)
    with progress(f"downloading {args.ref}"):
        target = Registry().download(name, version, args.output)
    print(target)
    return 0


def _delete(args: argparse.Namespace) -> int:
    name, version = parse_model_ref(args.ref)
    if version is None and not args.all_versions:
        raise UsageError(f"say which version to delete ({name}:VERSION) or pass --all-versions")
    if version is not None and args.all_versions:
        raise UsageError("pass either NAME:VERSION or --all-versions, not both")
    registry = Registry()
    what = f"every version of {name}" if args.all_versions else f"{name}:{version}"
    registry.get(name, version)  # fail on an unknown model before asking
    if not args.yes and not _confirm(f"delete {what}? [y/N] "):
        print("not deleted", file=sys.stderr)
        return 1
    deleted = registry.delete(name, version, all_versions=args.all_versions)
    print(f"deleted {', '.join(f'{name}:{v}' for v in deleted)}")
    return 0


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise UsageError("refusing to delete without confirmation: stdin is not a terminal; pass --yes")
    return input(question).strip().lower() in ("y", "yes")
