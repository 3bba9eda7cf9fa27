"""``edgedeploy service``: not built yet (placeholder while the work is in progress)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    del subparsers
