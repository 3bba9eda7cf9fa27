"""Where edgedeploy keeps its state on this machine (``EDGEDEPLOY_HOME``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["edgedeploy_home"]


def edgedeploy_home() -> Path:
    """Return the home folder (``$EDGEDEPLOY_HOME``, default ``~/.edgedeploy``), creating it."""
    home = Path(os.environ.get("EDGEDEPLOY_HOME") or Path.home() / ".edgedeploy").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home
