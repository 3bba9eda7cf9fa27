"""Dynamic batching: concurrent requests to one model are stacked along axis 0 and run together.

A batch closes when it holds ``max_batch_size`` rows, when it reaches a preferred size and nothing
else is waiting, or when its oldest request has waited ``max_queue_delay_us``. Only requests whose
non-batch dimensions and dtypes match share a batch. Inference runs in a worker thread, so the
event loop keeps accepting requests meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
    """One queue and one worker task per model."""

    def __init__(self, infer: Infer, settings: BatchSettings, on_batch: Callable[[int], None] | None = None) -> None:
        self._infer = infer
        self.settings = settings
        self._on_batch = on_batch or (lambda _size: None)
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._held: list[_Item] = []
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Queue one validated request; returns its own slice of the batch's outputs."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run())
        rows = len(next(iter(inputs.values())))
        loop = asyncio.get_running_loop()
        item = _Item(inputs, rows, _key(inputs), loop.create_future(), loop.time())
        if rows > self.settings.max_batch_size:
            return await asyncio.to_thread(self._infer, inputs)
        await self._queue.put(item)
        return await item.future

    async def close(self) -> None:
        """Stop the worker; requests still queued fail with CancelledError."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None

    async def _next(self) -> _Item:
        return self._held.pop(0) if self._held else await self._queue.get()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next()
            batch, rows = [first], first.rows
            deadline = first.queued_at + self.settings.max_queue_delay_us / 1e6
            while rows < self.settings.max_batch_size:
                if rows in self.settings.preferred_batch_sizes and self._queue.empty():
                    break
                timeout = deadline - loop.time()
                if timeout <= 0 and self._queue.empty():
                    break
                try:
                    item = self._queue.get_nowait() if self._queue.qsize() else await asyncio.wait_for(
                        self._queue.get(), max(timeout, 0))
                except TimeoutError:
                    break
                if item.key != first.key or rows + item.rows > self.settings.max_batch_size:
                    self._held.append(item)
                    if rows + item.rows > self.settings.max_batch_size:
                        break
                    continue
                batch.append(item)
                rows += item.rows
            await self._execute(batch, rows)

    async def _execute(self, batch: list[_Item], rows: int) -> None:
        stacked = {name: np.concatenate([item.inputs[name] for item in batch]) if len(batch) > 1 else value
                   for name, value in batch[0].inputs.items()}
        try:
            outputs = await asyncio.to_thread(self._infer, stacked)
        except Exception as exc:  # noqa: BLE001 - the error belongs to every request of the batch
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        self._on_batch(rows)
        start = 0
        for item in batch:
            part = {name: value[start:start + item.rows] for name, value in outputs.items()}
            start += item.rows
            if not item.future.done():
                item.future.set_result(part)
