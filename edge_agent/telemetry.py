"""Device telemetry: a periodic sample, and a bounded on-disk queue that outlives the broker link.

Samples go into ``data_dir/telemetry/<seq>.json`` (atomic writes). When more than ``max_entries``
wait, the oldest are dropped. ``drain`` sends them oldest first and deletes each once sent, so a
restart or an unreachable broker loses nothing but what the cap drops.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from edge_agent.atomic import atomic_write_json

__all__ = ["TelemetryQueue", "sample"]

log = logging.getLogger(__name__)
_PROCESS_START = time.time()
# One Process object for the whole run: cpu_percent() measures since its previous call on it.
_PROCESS = psutil.Process(os.getpid())


class TelemetryQueue:
    """FIFO of JSON messages in a folder, capped at ``max_entries`` (oldest dropped)."""

    def __init__(self, folder: Path, max_entries: int = 1000) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_entries = max_entries
        self.dropped = 0
        files = self._files()
        self._seq = int(files[-1].stem) + 1 if files else 0

    def _files(self) -> list[Path]:
        return sorted(p for p in self.folder.glob("*.json") if p.stem.isdigit())

    def __len__(self) -> int:
        return len(self._files())

    def put(self, message: dict[str, Any]) -> None:
        """Append ``message``; drops the oldest entries beyond the cap."""
        atomic_write_json(self.folder / f"{self._seq:012d}.json", message)
        self._seq += 1
        files = self._files()
        for old in files[: max(0, len(files) - self.max_entries)]:
            old.unlink(missing_ok=True)
            self.dropped += 1

    def peek(self) -> list[dict[str, Any]]:
        """Every queued message, oldest first (unreadable entries are skipped)."""
        return [m for _, m in self._entries()]

    def _entries(self) -> list[tuple[Path, dict[str, Any]]]:
        entries = []
        for path in self._files():
            try:
                entries.append((path, json.loads(path.read_text())))
            except (OSError, ValueError):
                log.warning("dropping unreadable telemetry entry %s", path)
                path.unlink(missing_ok=True)
        return entries

    def drain(self, send: Callable[[dict[str, Any]], bool]) -> int:
        """Send queued messages oldest first until ``send`` returns False; returns how many went out."""
        sent = 0
        for path, message in self._entries():
            if not send(message):
                break
            path.unlink(missing_ok=True)
            sent += 1
        return sent


def sample(device_id: str, metrics: dict[str, dict[str, Any]], versions: dict[str, Any]) -> dict[str, Any]:
    """One telemetry message body: per-model metrics, CPU %, RSS, uptime and versions."""
    process = _PROCESS
    with process.oneshot():
        rss = process.memory_info().rss
        cpu = process.cpu_percent(interval=None)
    models = {name: dict(stats) for name, stats in metrics.items()}  # requests, errors, p50/p95/p99_ms, ...
    return {"device_id": device_id, "ts": time.time(), "uptime_s": round(time.time() - _PROCESS_START, 3),
            "cpu_percent": cpu, "system_cpu_percent": psutil.cpu_percent(interval=None),
            "memory_rss_mb": round(rss / 1024 / 1024, 2), "models": models, "versions": versions}
