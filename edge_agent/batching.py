"""Dynamic batching: concurrent requests to one model are stacked along axis 0 and run together.

A batch closes when it holds ``max_batch_size`` rows, when it reaches a preferred size and nothing
else is waiting, or when its oldest request has waited ``max_queue_delay_us``. Only requests whose
non-batch dimensions and dtypes match share a batch. Inference runs in a worker thread, so the
event loop keeps accepting requests meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_agent.errors import ModelNotReadyError

__all__ = ["BatchSettings", "DynamicBatcher"]

log = logging.getLogger(__name__)
Infer = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class BatchSettings:
    """How a model's requests are batched (the bundle's ``batching`` document)."""

    max_batch_size: int = 8
    max_queue_delay_us: int = 500
    preferred_batch_sizes: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> BatchSettings:
        return cls(int(doc.get("max_batch_size", 8)), int(doc.get("max_queue_delay_us", 500)),
                   tuple(int(n) for n in doc.get("preferred_batch_sizes") or ()))


@dataclass
class _Item:
    inputs: dict[str, np.ndarray]
    rows: int
    key: tuple[Any, ...]
    future: asyncio.Future[dict[str, np.ndarray]]
    queued_at: float = field(default=0.0)


def _key(inputs: dict[str, np.ndarray]) -> tuple[Any, ...]:
    return tuple((name, value.dtype.str, value.shape[1:]) for name, value in sorted(inputs.items()))


class DynamicBatcher:
    """One queue and one worker task per model.

    The queue is a deque plus an event rather than ``asyncio.Queue``: waiting for the event with a
    timeout can never lose a request, whereas cancelling a ``Queue.get`` on Python 3.11 can.
    """

    def __init__(self, infer: Infer, settings: BatchSettings, on_batch: Callable[[int], None] | None = None,
                 in_flight: Callable[[], int] | None = None) -> None:
        self._infer = infer
        # requests of this model currently being served; when every one of them is already in the
        # batch, waiting out the queue delay cannot add anyone we know of, so the batch closes at once
        self._in_flight = in_flight
        self.settings = settings
        self._on_batch = on_batch or (lambda _size: None)
        self._pending: deque[_Item] = deque()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self.batch_sizes: Counter[int] = Counter()  # rows per executed batch, for tests and benchmarks

    async def submit(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Queue one validated request; returns its own slice of the batch's outputs."""
        rows = len(next(iter(inputs.values())))
        if rows > self.settings.max_batch_size or rows == 0:
            return await asyncio.to_thread(self._infer, inputs)
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run())
        item = _Item(inputs, rows, _key(inputs), loop.create_future(), loop.time())
        self._pending.append(item)
        self._arrived.set()
        return await item.future

    async def close(self) -> None:
        """Stop the worker; requests still queued fail with ModelNotReadyError."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(ModelNotReadyError("the model was unloaded while the request waited"))

    async def _wait(self, timeout: float | None) -> None:
        self._arrived.clear()
        if self._pending:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._arrived.wait(), timeout)

    def _take_matching(self, key: tuple[Any, ...], room: int) -> _Item | None:
        """The oldest waiting request with the same non-batch shape that fits in ``room`` rows."""
        for index, item in enumerate(self._pending):
            if item.key == key and item.rows <= room:
                del self._pending[index]
                return item
        return None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                await self._wait(None)
            first = self._pending.popleft()
            batch, rows = [first], first.rows
            deadline = first.queued_at + self.settings.max_queue_delay_us / 1e6
            while rows < self.settings.max_batch_size:
                item = self._take_matching(first.key, self.settings.max_batch_size - rows)
                if item is not None:
                    batch.append(item)
                    rows += item.rows
                    continue
                if rows in self.settings.preferred_batch_sizes or len(self._pending) > 0:
                    break  # a preferred size with nothing to add, or only non-fitting requests wait
                if self._in_flight is not None and len(batch) >= self._in_flight():
                    break
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                await self._wait(timeout)
            await self._execute(batch, rows)

    async def _execute(self, batch: list[_Item], rows: int) -> None:
        stacked = {name: np.concatenate([item.inputs[name] for item in batch]) if len(batch) > 1 else value
                   for name, value in batch[0].inputs.items()}
        try:
            outputs = await asyncio.to_thread(self._infer, stacked)
        except Exception as exc:  # noqa: BLE001 - only the request that caused it must fail
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(exc)
                return
            log.warning("a batch of %d requests failed; running them one by one", len(batch))
            for item in batch:
                await self._execute([item], item.rows)
            return
        self._on_batch(rows)
        self.batch_sizes[rows] += 1
        start = 0
        for item in batch:
            part = {name: value[start:start + item.rows] for name, value in outputs.items()}
            start += item.rows
            if not item.future.done():
                item.future.set_result(part)
