"""How commands print: one JSON document, aligned tables, and progress only on a terminal."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["print_json", "print_table", "progress"]


def print_json(document: Any) -> None:
    """Print one JSON document on stdout and nothing else (``--json``)."""
    json.dump(document, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], empty: str = "(none)") -> None:
    """Print rows as a left-aligned table with a header."""
    if not rows:
        print(empty)
        return
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
    print("  ".join(col.upper().ljust(w) for col, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@contextmanager
def progress(label: str) -> Iterator[None]:
    """Show ``label ... done (1.2 s)`` on stderr while a long step runs, only when it is a terminal."""
    tty = sys.stderr.isatty()
    start = time.monotonic()
    if tty:
        sys.stderr.write(f"{label} ...")
        sys.stderr.flush()
    try:
        yield
    except BaseException:
        if tty:
            sys.stderr.write(" failed\n")
        raise
    if tty:
        sys.stderr.write(f" done ({time.monotonic() - start:.1f} s)\n")
