"""Telemetry: the bounded on-disk queue and the sample's fields."""

from __future__ import annotations

from pathlib import Path

from edge_agent.metrics import MetricsRegistry
from edge_agent.telemetry import TelemetryQueue, sample


def test_the_queue_is_bounded_and_drops_the_oldest(tmp_path: Path) -> None:
    queue = TelemetryQueue(tmp_path / "q", max_entries=3)
    for i in range(5):
        queue.put({"n": i})
    assert len(queue) == 3 and queue.dropped == 2
    assert [m["n"] for m in queue.peek()] == [2, 3, 4]


def test_drain_sends_in_order_and_keeps_what_was_not_sent(tmp_path: Path) -> None:
    queue = TelemetryQueue(tmp_path / "q", max_entries=10)
    for i in range(4):
        queue.put({"n": i})
    sent: list[int] = []

    def broker_goes_away_after_two(message: dict) -> bool:
        if len(sent) == 2:
            return False
        sent.append(message["n"])
        return True

    assert queue.drain(broker_goes_away_after_two) == 2
    assert sent == [0, 1] and [m["n"] for m in queue.peek()] == [2, 3]
    assert queue.drain(lambda m: sent.append(m["n"]) is None) == 2
    assert sent == [0, 1, 2, 3] and len(queue) == 0


def test_the_queue_survives_a_restart_and_keeps_its_order(tmp_path: Path) -> None:
    first = TelemetryQueue(tmp_path / "q", max_entries=5)
    for i in range(3):
        first.put({"n": i})
    second = TelemetryQueue(tmp_path / "q", max_entries=5)  # a new process over the same folder
    second.put({"n": 3})
    (tmp_path / "q" / "junk.txt").write_text("not ours")
    assert [m["n"] for m in second.peek()] == [0, 1, 2, 3]
    for i in range(4, 8):
        second.put({"n": i})
    assert [m["n"] for m in second.peek()] == [3, 4, 5, 6, 7]


def test_a_sample_carries_model_metrics_and_process_figures() -> None:
    metrics = MetricsRegistry()
    for ms in (1.0, 2.0, 3.0):
        metrics.observe("digits", ms, ok=True)
    metrics.observe("digits", 9.0, ok=False)
    body = sample("dev-1", metrics.snapshot(), {"agent": "0.1"})
    assert body["device_id"] == "dev-1" and body["versions"] == {"agent": "0.1"}
    assert body["models"]["digits"]["requests"] == 4 and body["models"]["digits"]["errors"] == 1
    assert body["models"]["digits"]["p50_ms"] is not None and body["models"]["digits"]["p99_ms"] >= 3.0
    assert body["memory_rss_mb"] > 0 and body["uptime_s"] >= 0 and "cpu_percent" in body
