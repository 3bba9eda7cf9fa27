"""The agent's recent log lines, kept in memory for ``fleet logs DEVICE`` (a ``logs`` request).

:class:`LogRing` is a :class:`logging.Handler` that the daemon adds to the root logger while it
runs: every record that passes the configured level is formatted as the console shows it and kept
in a bounded ring (the last :data:`DEFAULT_LINES` lines; each line cut to
:data:`~edge_agent.errors.MAX_ERROR_CHARS` characters), so the agent's memory does not grow with its
uptime. Nothing secret reaches it: the agent never logs passwords, keys or request bodies.
"""

from __future__ import annotations

import collections
import logging
import threading

from edge_agent.errors import brief

__all__ = ["DEFAULT_LINES", "LOG_FORMAT", "LogRing"]

DEFAULT_LINES = 2000
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # what edge-agent prints on its console


class LogRing(logging.Handler):
    """The last ``capacity`` formatted log lines (thread-safe: paho's thread logs too)."""

    def __init__(self, capacity: int = DEFAULT_LINES) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self._lines: collections.deque[str] = collections.deque(maxlen=capacity)
        self._guard = threading.Lock()

    @property
    def capacity(self) -> int:
        """How many lines the ring keeps."""
        return self._lines.maxlen or 0

    def emit(self, record: logging.LogRecord) -> None:
        """Keep one record (a traceback stays on its record's line, cut like any long line)."""
        try:
            line = brief(self.format(record).replace("\n", " | "))
        except Exception:  # noqa: BLE001 - logging's own contract: a bad record must not raise
            self.handleError(record)
            return
        with self._guard:
            self._lines.append(line)

    def tail(self, count: int) -> list[str]:
        """The newest ``count`` lines, oldest first."""
        with self._guard:
            lines = list(self._lines)
        return lines[-count:] if count > 0 else []
