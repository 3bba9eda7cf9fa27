"""The command lines' one mapping from an error to an ``error:`` line and an exit code.

Shared by ``edgedeploy`` and ``edge-agent``, so both answer the same way: 2 for bad usage, 1 for any
other failure, 130 on Ctrl-C.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from edge_agent.errors import EdgeDeployError, UsageError

__all__ = ["exit_code_of"]


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
    except Exception as exc:  # the one place that turns a bug into a clean exit
        if os.environ.get("EDGEDEPLOY_DEBUG"):
            raise
        print(f"error: internal error: {type(exc).__name__}: {exc} (set EDGEDEPLOY_DEBUG=1 for details)",
              file=sys.stderr)
        return 1
