"""Entry point of ``edgedeploy``: builds the parser from the command groups and maps errors.

Errors become one line on stderr starting with ``error:`` and exit 2 (bad usage) or 1 (anything
else), here and nowhere else. Set ``EDGEDEPLOY_DEBUG=1`` to see a traceback for an internal error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from packager.errors import EdgeDeployError, UsageError

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


def exit_code_of(body: Callable[[], int]) -> int:
    """Run a command body and turn any error into one ``error:`` line and an exit code.

    2 for bad usage, 1 for any other failure, 130 on Ctrl-C. Shared by ``edgedeploy`` and ``edge-agent``.
    """
    try:
        return int(body() or 0)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except EdgeDeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns a bug into a clean exit
        if os.environ.get("EDGEDEPLOY_DEBUG"):
            raise
        print(f"error: internal error: {type(exc).__name__}: {exc} (set EDGEDEPLOY_DEBUG=1 for details)",
              file=sys.stderr)
        return 1


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
