"""``edgedeploy serve``: the HTTP bundle server devices download bundles and TUF metadata from."""

from __future__ import annotations

import argparse
import sys

from packager.bundle_server import BundleServer, bundles_dir
from packager.tuf_repo import repository_exists

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the CLI."""
    parser = subparsers.add_parser("serve", help="serve bundles to devices over HTTP (range requests)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (0 = a free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    server = BundleServer(args.host, args.port)
    # One line on stdout so scripts (and the e2e fixture) learn the port that was bound.
    metadata = f" and its TUF metadata at {server.url}/metadata/" if repository_exists() else ""
    print(f"serving {bundles_dir()} at {server.url}/bundles/{metadata}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    return 0
