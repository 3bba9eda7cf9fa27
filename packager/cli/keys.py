"""``edgedeploy keys``: signing keys, the local trust store, and rotating the TUF repository's keys."""

from __future__ import annotations

import argparse
from pathlib import Path

from packager import keys
from packager.cli.output import print_json, print_table
from packager.tuf_repo import ROLES, TufRepository

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("keys", help="signing keys and trusted public keys")
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    gen = sub.add_parser("generate", help="create a signing key and trust its public key locally")
    gen.add_argument("--name", default=keys.DEFAULT_KEY_NAME)
    gen.set_defaults(func=_generate)

    lst = sub.add_parser("list", help="signing and trusted keys")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_list)

    exp = sub.add_parser("export", help="write a signing key's public key, for devices")
    exp.add_argument("--name", default=None)
    exp.add_argument("-o", "--output", required=True, type=Path)
    exp.add_argument("--tuf-root", type=Path, metavar="FILE",
                     help="also write the TUF repository's newest root here (a device's tuf_root)")
    exp.set_defaults(func=_export)

    rotate = sub.add_parser("rotate", help="replace a TUF role's keys (root, targets, snapshot, timestamp); "
                                           "the old ones are revoked by a new root signed by old and new root keys")
    rotate.add_argument("role", choices=ROLES)
    rotate.add_argument("--json", action="store_true")
    rotate.set_defaults(func=_rotate)

    trust = sub.add_parser("trust", help="trust another signer's public key")
    trust.add_argument("file", type=Path)
    trust.set_defaults(func=_trust)


def _generate(args: argparse.Namespace) -> int:
    key = keys.generate_key(args.name)
    print(f"generated signing key {key.name!r} (key id {key.key_id}); its public key is trusted locally")
    return 0


def _list(args: argparse.Namespace) -> int:
    rows = [k.to_dict() for k in keys.list_keys()]
    if args.json:
        print_json(rows)
    else:
        print_table(rows, ["kind", "name", "key_id", "path"])
    return 0


def _export(args: argparse.Namespace) -> int:
    key_id = keys.export_public_key(args.output, args.name)
    print(f"wrote public key {key_id} and the controller's order key to {args.output}")
    if args.tuf_root is not None:
        version = TufRepository.open().export_root(args.tuf_root)
        print(f"wrote TUF root version {version} to {args.tuf_root}")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    result = TufRepository.open().rotate(args.role)
    if args.json:
        print_json(result)
    else:
        print(f"rotated {args.role}: {len(result['revoked'])} key(s) revoked, new root version "
              f"{result['root_version']}; devices take it with their next update")
    return 0


def _trust(args: argparse.Namespace) -> int:
    print(f"trusted key {keys.trust_key(args.file)}")
    return 0
