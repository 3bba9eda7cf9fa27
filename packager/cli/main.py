"""Entry point of ``edgedeploy``: builds the parser from the command groups and maps errors.

Errors become one line on stderr starting with ``error:`` and exit 2 (bad usage) or 1 (anything
else), here and nowhere else. Set ``EDGEDEPLOY_DEBUG=1`` to see a traceback for an internal error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from edge_agent.errors import UsageError
from edge_agent.exit_codes import exit_code_of

__all__ = ["exit_code_of", "main"]

# Each module defines register(subparsers); a command's handler is stored as ``func``.
_GROUPS = ("model", "keys", "profile", "package", "bundle", "deploy", "service", "serve", "fleet", "image")


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as one ``error:`` line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    """The full ``edgedeploy`` parser."""
    parser = _Parser(prog="edgedeploy", description="Take a trained model from a file to a fleet of devices.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details on stderr")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for group in _GROUPS:
        importlib.import_module(f"packager.cli.{group}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit code."""

    def body() -> int:
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        return int(args.func(args) or 0)

    return exit_code_of(body)


if __name__ == "__main__":
    sys.exit(main())
