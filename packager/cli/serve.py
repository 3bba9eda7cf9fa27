"""``edgedeploy serve``: the HTTP bundle server devices download bundles and TUF metadata from."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_agent.auth import create_token_file
from packager.bundle_server import BundleServer, bundles_dir
from packager.tuf_repo import repository_exists

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the CLI."""
    parser = subparsers.add_parser("serve", help="serve bundles to devices over HTTP (range requests)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (0 = a free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--token-file", type=Path, default=None,
                        help="require 'Authorization: Bearer' with a token of this file (one a line); "
                             "a missing file is created with a new token, mode 0600")
    parser.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    if args.token_file is not None and create_token_file(args.token_file):
        print(f"wrote a new token to {args.token_file}: give devices a copy (bundle_token_file)", file=sys.stderr)
    server = BundleServer(args.host, args.port, token_file=args.token_file)
    # One line on stdout so scripts (and the e2e fixture) learn the port that was bound.
    metadata = f" and its TUF metadata at {server.url}/metadata/" if repository_exists() else ""
    print(f"serving {bundles_dir()} at {server.url}/bundles/{metadata}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    return 0
