"""Entry point of ``edgedeploy``: builds the parser from the command groups and maps errors.

Errors become one line on stderr starting with ``error:`` and exit 2 (bad usage) or 1 (anything
else), here and nowhere else. Set ``EDGEDEPLOY_DEBUG=1`` to see a traceback for an internal error.
On a device install (``pip install edgedeploy``, the agent's dependencies only) a command that needs
a cloud-side library answers with one ``error:`` line naming the extra that brings it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from edge_agent.errors import EdgeDeployError, UsageError
from edge_agent.exit_codes import exit_code_of

__all__ = ["exit_code_of", "main"]

# Each module defines register(subparsers); a command's handler is stored as ``func``.
_GROUPS = ("model", "keys", "profile", "package", "bundle", "deploy", "service", "serve", "fleet", "image", "repo",
           "controller")
# Cloud-side libraries that the device install leaves out, and the extra of pyproject.toml that brings each.
_EXTRA_OF = {"onnx": "packager", "onnxconverter_common": "packager", "docker": "cloud", "kubernetes": "cloud",
             "hls4ml": "fpga", "qonnx": "fpga"}


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as one ``error:`` line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    """The full ``edgedeploy`` parser."""
    parser = _Parser(prog="edgedeploy", description="Take a trained model from a file to a fleet of devices.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log progress details on stderr (-vv: debug details too)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for group in _GROUPS:
        try:
            module = importlib.import_module(f"packager.cli.{group}")
        except ModuleNotFoundError as exc:
            missing = _missing_extra(exc, group)
            if missing is None:
                raise
            _register_unavailable(subparsers, group, missing)
            continue
        module.register(subparsers)
    return parser


def _missing_extra(exc: ModuleNotFoundError, command: str) -> EdgeDeployError | None:
    """The error for a cloud-side library this install lacks; None for any other missing module."""
    module = (exc.name or "").partition(".")[0]
    extra = _EXTRA_OF.get(module)
    if extra is None:
        return None
    return EdgeDeployError(f"edgedeploy {command} needs the {module!r} module, which this install lacks "
                           f"(a device install carries the agent only): pip install 'edgedeploy[{extra}]'")


def _register_unavailable(subparsers: argparse._SubParsersAction, group: str, error: EdgeDeployError) -> None:
    """A command group whose module needs a missing library: any use of it reports that library's extra."""
    # no option prefix: every word after the command is taken, so no usage error hides the real one
    parser = subparsers.add_parser(group, help=f"(not installed: {str(error).rpartition(': ')[2]})",
                                   add_help=False, prefix_chars="\0")
    parser.add_argument("words", nargs="*")

    def unavailable(_args: argparse.Namespace) -> int:
        raise error

    parser.set_defaults(func=unavailable)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit code."""

    def body() -> int:
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level={0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        if not args.verbose:
            # the Kubernetes client's retries log each refused connection; the error line says it once
            logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        try:
            return int(args.func(args) or 0)
        except ModuleNotFoundError as exc:
            missing = _missing_extra(exc, args.command)
            if missing is None:
                raise
            raise missing from None

    return exit_code_of(body)


if __name__ == "__main__":
    sys.exit(main())
