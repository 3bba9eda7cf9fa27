"""``edgedeploy controller``: the long-running control plane (store, rollouts, HTTP API and console).

The options are checked here, before anything starts: a token file that is missing, empty or weak,
a retention that is not a duration or a port out of range is one ``error:`` line. The daemon refuses
a network address without tokens (an open API there would let anyone order the fleet).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from edge_agent.errors import UsageError
from edge_agent.home import edgedeploy_home
from packager.fleet import DEFAULT_BROKER

__all__ = ["DEFAULT_PORT", "default_store_url", "parse_duration", "register"]

DEFAULT_PORT = 8090
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d)?\s*$")
_UNIT_S = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, None: 86400}  # a bare number counts days


def default_store_url() -> str:
    """SQLite under ``EDGEDEPLOY_HOME/controller/`` (embedded: nothing to set up)."""
    return f"sqlite:///{edgedeploy_home() / 'controller' / 'controller.db'}"


def parse_duration(text: str, option: str = "--retention") -> float:
    """``7d``, ``12h``, ``90m``, ``3600s`` or a bare number of days, in seconds; UsageError naming the option."""
    match = _DURATION.match(text or "")
    if not match or float(match.group(1)) <= 0:
        raise UsageError(f"{option}: {text!r} is not a duration: write e.g. 7d, 12h, 90m or 3600s")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``controller`` to the CLI."""
    parser = subparsers.add_parser("controller", help="run the fleet control plane: store, rollouts, HTTP API, "
                                                      "web console")
    parser.add_argument("--store", default=None, metavar="URL",
                        help="sqlite:///PATH or postgresql://USER@HOST:PORT/DB "
                             "(default: sqlite under $EDGEDEPLOY_HOME/controller/)")
    parser.add_argument("--broker", default=None, metavar="URL",
                        help=f"broker URL (default $EDGEDEPLOY_BROKER, else {DEFAULT_BROKER})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; another one needs --token-file)")
    parser.add_argument("--token-file", type=Path, default=None, metavar="FILE",
                        help="bearer tokens, one per line; without it the API and console are open on loopback")
    parser.add_argument("--retention", default="7d", metavar="D",
                        help="how long telemetry and events are kept: 7d, 12h, 90m, 3600s (default 7d)")
    parser.set_defaults(func=_controller)


def _controller(args: argparse.Namespace) -> int:
    from packager.control.tokens import load_tokens

    tokens = load_tokens(args.token_file) if args.token_file is not None else None
    retention_s = parse_duration(args.retention)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port: {args.port} is not a TCP port (0-65535; 0 picks a free one)")
    from packager.control.daemon import run_controller  # the engine's dependencies load only for this command

    broker = args.broker or os.environ.get("EDGEDEPLOY_BROKER") or DEFAULT_BROKER
    run_controller(args.store or default_store_url(), broker, args.host, args.port, tokens, retention_s)
    return 0
