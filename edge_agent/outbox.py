"""What an agent process without a broker link leaves for the daemon, and the lock that keeps one at a time.

``edge-agent install`` (:mod:`edge_agent.offline`) runs the daemon's own deployment code while the
daemon is stopped. Two things make that safe and visible:

- :class:`DataDirLock`: an exclusive ``flock`` on ``data_dir/agent.lock``, held by the daemon for its
  whole run and by an install for its whole run, so two processes never drive the same A/B slots.
  The kernel drops it when a process dies, so a ``kill -9`` leaves no stale lock.
- :class:`OutboxLink`: a :class:`~edge_agent.transport.DeviceTransport` that queues ``events`` in
  ``data_dir/outbox/`` (the bounded on-disk FIFO telemetry uses) instead of sending them. The daemon
  sends them, oldest first, each time it connects; its ``reported`` message is rebuilt from the
  stores then, so a queued one would only be stale and is not kept.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path
from typing import IO, Any

from edge_agent.errors import DeploymentError
from edge_agent.telemetry import TelemetryQueue

__all__ = ["OUTBOX_MAX", "DataDirLock", "OutboxLink", "event_outbox"]

OUTBOX_MAX = 1000  # events of offline installs and refusals; the oldest go first beyond this


def event_outbox(data_dir: Path) -> TelemetryQueue:
    """The queue of events waiting for the daemon's next connection."""
    return TelemetryQueue(Path(data_dir) / "outbox", OUTBOX_MAX)


class DataDirLock:
    """Exclusive use of one ``data_dir`` by one agent process (daemon or install)."""

    def __init__(self, data_dir: Path, holder: str) -> None:
        self.path = Path(data_dir) / "agent.lock"
        self.holder = holder
        self._handle: IO[str] | None = None

    def acquire(self) -> DataDirLock:
        """Take the lock; DeploymentError names the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held until release(), past this function
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            other = handle.read().strip() or "another agent process"
            handle.close()
            raise DeploymentError(f"{self.path.parent} is in use by {other}; stop it first "
                                  "(systemctl stop edge-agent), then try again") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{self.holder} (pid {os.getpid()})\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        """Drop the lock (closing the file releases it)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class OutboxLink:
    """A device transport that never connects: ``events`` wait in the outbox for the daemon."""

    def __init__(self, data_dir: Path) -> None:
        self.connected = threading.Event()
        self.queue = event_outbox(data_dir)

    def start(self) -> None:
        """Nothing to connect to."""

    def stop(self) -> None:
        """Nothing to disconnect."""

    def publish(self, kind: str, body: dict[str, Any], qos: int = 1, retain: bool = False) -> bool:
        """Queue an event; the reported state is rebuilt by the daemon when it connects."""
        if kind == "events":
            self.queue.put(body)
        return True
