"""The packaging report: what the packager did and what it measured, as a printable table."""

from __future__ import annotations

from typing import Any

__all__ = ["format_report"]


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"


def _ops(counts: dict[str, int] | None) -> str:
    if not counts:
        return "-"
    return f"{sum(counts.values())} nodes, {len(counts)} types"


def _num(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value:.3f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def format_report(report: dict[str, Any]) -> str:
    """Report as aligned text: one row per measure, before and after packaging."""
    before, after = report.get("before", {}), report.get("after", {})
    rows = [
        ("", "source (fp32)", f"packaged ({report.get('precision', '-')})"),
        ("size", _size(before.get("size")), _size(after.get("size"))),
        ("operators", _ops(before.get("operators")), _ops(after.get("operators"))),
        ("batch-1 latency", _num(before.get("latency_ms"), " ms"), _num(after.get("latency_ms"), " ms")),
    ]
    validation = report.get("validation")
    if validation:
        rows.append((validation["metric"], _num(validation["fp32"], " %"), _num(validation["packaged"], " %")))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append(f"quantization: {report.get('quantization', '-')}; optimization: {report.get('optimization', '-')}")
    lines.append("execution providers (profile order): " + ", ".join(report.get("execution_providers", [])))
    available = report.get("available_here")
    if available is not None:
        lines.append("measured here with: " + (", ".join(available) or "-"))
    if validation:
        lines.append(f"accuracy drop {validation['drop']:.2f} points (limit {validation['limit']:.2f})"
                     + (" — forced" if validation.get("forced") else ""))
    return "\n".join(lines)
