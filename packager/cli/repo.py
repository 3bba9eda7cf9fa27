"""``edgedeploy repo``: the TUF repository metadata beside the bundles ``edgedeploy serve`` holds."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_agent.bundle import verify_bundle
from edge_agent.errors import UsageError
from edge_agent.trust import TrustStore
from edge_agent.tuf_fetch import target_name
from packager.bundle_server import publish_bundle
from packager.cli.output import print_json, print_table
from packager.tuf_repo import TufRepository, parse_expiry

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``repo init|add|publish|status|export-root`` to the CLI."""
    parser = subparsers.add_parser("repo", help="TUF metadata for the bundles devices download")
    sub = parser.add_subparsers(dest="repo_command", metavar="ACTION", required=True)

    init = sub.add_parser("init", help="create the keys and the first metadata (the store's bundles become targets)")
    init.add_argument("--targets-threshold", type=int, default=2, help="signatures a targets file needs (default 2)")
    init.add_argument("--targets-keys", type=int, default=3, help="targets keys to create (default 3)")
    init.add_argument("--root-threshold", type=int, default=1)
    init.add_argument("--root-keys", type=int, default=1)
    init.add_argument("--expires", action="append", default=[], metavar="ROLE=DURATION",
                      help="how long a role's metadata stays valid, e.g. timestamp=1d,targets=90d "
                           "(defaults: timestamp 1d, snapshot 7d, targets 90d, root 365d)")
    init.add_argument("--json", action="store_true")
    init.set_defaults(func=_init)

    add = sub.add_parser("add", help="verify a bundle, store it and list it as a target")
    add.add_argument("bundle", type=Path)
    add.add_argument("--json", action="store_true")
    add.set_defaults(func=_add)

    publish = sub.add_parser("publish", help="re-sign snapshot and timestamp (run from cron or a systemd timer)")
    publish.add_argument("--expires", action="append", default=[], metavar="ROLE=DURATION",
                         help="this once: snapshot/timestamp valid this long instead of the settings")
    publish.add_argument("--json", action="store_true")
    publish.set_defaults(func=_publish)

    status = sub.add_parser("status", help="each role's version, expiry and keys, and the targets")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)

    export = sub.add_parser("export-root", help="write the newest root metadata: a device's tuf_root")
    export.add_argument("-o", "--output", required=True, type=Path)
    export.set_defaults(func=_export_root)


def _init(args: argparse.Namespace) -> int:
    repo = TufRepository.init(targets_threshold=args.targets_threshold, targets_keys=args.targets_keys,
                              root_threshold=args.root_threshold, root_keys=args.root_keys,
                              expiry=parse_expiry(args.expires))
    status = repo.status()
    if args.json:
        print_json(status)
    else:
        print(f"created the TUF repository in {repo.metadata} ({len(status['targets'])} targets); keys in "
              f"{repo.keys}. Give devices its root: edgedeploy repo export-root -o root.json")
    return 0


def _add(args: argparse.Namespace) -> int:
    repo = TufRepository.open()
    manifest = verify_bundle(args.bundle, TrustStore.local(repo.home))
    sha, _url = publish_bundle(args.bundle, repo.home)
    versions = repo.versions()
    if args.json:
        print_json({"bundle_sha256": sha, "target": target_name(sha), "versions": versions})
    else:
        print(f"bundle {sha} ({manifest.name}:{manifest.version}) is a target of targets version "
              f"{versions['targets']}")
    return 0


def _publish(args: argparse.Namespace) -> int:
    expiry = parse_expiry(args.expires)
    if set(expiry) - {"snapshot", "timestamp"}:
        raise UsageError("repo publish --expires takes snapshot= and timestamp= only (targets and root: repo init)")
    versions = TufRepository.open().publish(expiry or None)
    if args.json:
        print_json(versions)
    else:
        print("published " + ", ".join(f"{role} v{version}" for role, version in versions.items()))
    return 0


def _status(args: argparse.Namespace) -> int:
    status = TufRepository.open().status()
    if args.json:
        print_json(status)
        return 0
    rows = [{"role": name, **{k: v for k, v in role.items() if k != "keys"}, "keys": len(role["keys"])}
            for name, role in status["roles"].items()]
    print_table(rows, ["role", "version", "expires", "expired", "threshold", "keys", "keys_here"])
    print()
    print_table([{"target": t["path"], "length": t["length"], "model": t["model"]} for t in status["targets"]],
                ["target", "length", "model"], empty="(no targets)")
    return 0


def _export_root(args: argparse.Namespace) -> int:
    version = TufRepository.open().export_root(args.output)
    print(f"wrote root version {version} to {args.output}; set tuf_root: to it in each device's agent.yaml")
    return 0
