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


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


def format_accelerator(report: dict[str, Any]) -> str:
    """The FPGA compiler's part of the report as a few lines."""
    lines = [f"toolchain: {report.get('toolchain', '-')}"]
    precision = report.get("precision")
    if isinstance(precision, dict):
        layers = ", ".join(f"{name}: w {types['weight']}" + (f", act {types['activation_after']}"
                                                             if "activation_after" in types else "")
                           for name, types in precision.get("layers", {}).items())
        lines.append(f"fixed point: input {precision.get('input')}; {layers}")
        estimate = report.get("estimate", {})
        lines.append(f"agreement with fp32 (firmware, calibration set): {_pct(report.get('agreement_top1'))}; "
                     f"estimate: {estimate.get('dsp', '-')} DSP, {estimate.get('lut_for_multipliers', '-')} LUTs for "
                     f"multipliers, {estimate.get('latency_cycles', '-')} cycles")
    resources = report.get("resources")
    if isinstance(resources, dict):
        available = resources.get("available", {})
        used = ", ".join(f"{kind} {resources[kind]}/{available.get(kind, '?')}" for kind in ("LUT4", "BRAM_4K", "DSP"))
        lines.append(f"iCE40: {used}; Fmax {report.get('fmax_mhz', 0):.1f} MHz; "
                     f"{report.get('cycles_per_inference')} cycles per inference "
                     f"({report.get('inferences_per_second_at_fmax', 0):.0f}/s at Fmax); "
                     f"int8 agreement {_pct(report.get('agreement_top1'))}")
    fixed = report.get("accuracy_fixed", report.get("accuracy_int8"))
    if fixed is not None:
        lines.append(f"held-out accuracy: {_pct(fixed)} (fp32 {_pct(report.get('accuracy_fp32'))})")
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    """Report as aligned text: one row per measure, before and after packaging."""
    if "accelerator" in report:
        return format_accelerator(report["accelerator"])
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
