"""Helpers shared by the benchmarks: timing, tables and the JSON results file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def time_calls(call: Callable[[], Any], runs: int, warmup: int = 5) -> list[float]:
    """Wall time of each of ``runs`` calls, in milliseconds, after ``warmup`` calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Aligned table on stdout."""
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def write_results(name: str, document: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` with the machine it was measured on."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    document = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version()}, **document}
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}")
    return path
