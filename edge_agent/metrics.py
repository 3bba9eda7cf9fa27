"""Per-model serving metrics: request and error counts, latency histogram and percentiles, batch sizes.

Read by ``/metrics`` (Prometheus text) and by the agent's telemetry. Thread-safe: inference runs in
worker threads while the servers read.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["LATENCY_BUCKETS_MS", "MetricsRegistry", "ModelMetrics"]

LATENCY_BUCKETS_MS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 10000.0)
_RECENT = 4096  # latencies kept for percentiles: recent behaviour, bounded memory


@dataclass
class ModelMetrics:
    """Counters of one model since the process started."""

    requests: int = 0
    errors: int = 0
    latency_sum_ms: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=_RECENT))
    batch_sizes: Counter[int] = field(default_factory=Counter)

    def observe(self, latency_ms: float, ok: bool) -> None:
        self.requests += 1
        self.errors += 0 if ok else 1
        self.latency_sum_ms += latency_ms
        self.recent.append(latency_ms)
        index = next((i for i, edge in enumerate(LATENCY_BUCKETS_MS) if latency_ms <= edge), len(LATENCY_BUCKETS_MS))
        self.buckets[index] += 1

    def summary(self) -> dict[str, Any]:
        recent = np.asarray(self.recent) if self.recent else None
        batches = sum(self.batch_sizes.values())
        rows = sum(size * count for size, count in self.batch_sizes.items())

        def pct(q: float) -> float | None:
            return None if recent is None else round(float(np.percentile(recent, q)), 3)

        return {
            "requests": self.requests,
            "errors": self.errors,
            "p50_ms": pct(50),
            "p95_ms": pct(95),
            "p99_ms": pct(99),
            "mean_ms": round(self.latency_sum_ms / self.requests, 3) if self.requests else None,
            "batches": batches,
            "mean_batch_size": round(rows / batches, 3) if batches else None,
        }


class MetricsRegistry:
    """All models' metrics, behind one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, ModelMetrics] = {}

    def observe(self, model: str, latency_ms: float, ok: bool) -> None:
        """Record one request (``ok`` False for an error answer)."""
        with self._lock:
            self._models.setdefault(model, ModelMetrics()).observe(latency_ms, ok)

    def observe_batch(self, model: str, size: int) -> None:
        """Record one executed batch of ``size`` rows."""
        with self._lock:
            self._models.setdefault(model, ModelMetrics()).batch_sizes[size] += 1

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per model: requests, errors, p50/p95/p99/mean latency (ms), batches, mean batch size."""
        with self._lock:
            return {name: m.summary() for name, m in sorted(self._models.items())}

    def histograms(self) -> dict[str, tuple[list[int], float, int, int]]:
        """Per model: (cumulative bucket counts, latency sum in ms, request count, error count)."""
        with self._lock:
            result = {}
            for name, m in sorted(self._models.items()):
                cumulative, total = [], 0
                for count in m.buckets:
                    total += count
                    cumulative.append(total)
                result[name] = (cumulative, m.latency_sum_ms, m.requests, m.errors)
            return result
