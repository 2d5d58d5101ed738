"""Dynamic batching of Embed calls: concurrent requests share forward passes.

One worker task per embedding model takes the first waiting request, waits up to `max_wait_s` for
more until `max_batch_size` prompts are gathered, and runs one `encode` on a worker thread. Each
request gets back its own rows, in its own order. A request larger than the batch runs alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from server.errors import ResourceExhaustedError, UnavailableError
from server.models.base import EmbeddingModel

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    texts: tuple[str, ...]
    future: asyncio.Future[tuple[np.ndarray, int]]


class EmbedBatcher:
    """Batches the Embed calls of one embedding model. Call start() before use, stop() after."""

    def __init__(
        self,
        model: EmbeddingModel,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_waiting_prompts: int,
    ) -> None:
        self._model = model
        self._max_batch = max_batch_size
        self._max_wait_s = max_wait_s
        self._max_waiting = max_waiting_prompts
        self._queue: deque[_Pending] = deque()
        self._queued_prompts = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches_run = 0

    async def start(self) -> None:
        """Start the worker task."""
        if self._task is None:
            self._task = asyncio.create_task(self._worker(), name="embed-batcher")

    async def stop(self) -> None:
        """Stop the worker; requests still queued fail with UNAVAILABLE."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(UnavailableError("the server is shutting down"))
        self._queued_prompts = 0

    async def embed(self, texts: tuple[str, ...]) -> tuple[np.ndarray, int]:
        """The raw vectors of `texts` (one row each, in order) and the tokens they took."""
        if self._task is None:
            raise UnavailableError("the embedding batcher is not running")
        if self._queued_prompts and self._queued_prompts + len(texts) > self._max_waiting:
            raise ResourceExhaustedError(
                f"{self._queued_prompts} prompts are already waiting to be embedded "
                f"(limit {self._max_waiting}); retry later"
            )
        future: asyncio.Future[tuple[np.ndarray, int]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(texts, future))
        self._queued_prompts += len(texts)
        self._wakeup.set()
        return await future

    def _take_batch(self) -> list[_Pending]:
        """Pop requests until the batch is full; cancelled requests are dropped here."""
        batch: list[_Pending] = []
        size = 0
        while self._queue:
            head = self._queue[0]
            if head.future.done():  # its caller left before the batch started
                self._queue.popleft()
                self._queued_prompts -= len(head.texts)
                continue
            if batch and size + len(head.texts) > self._max_batch:
                break
            self._queue.popleft()
            self._queued_prompts -= len(head.texts)
            batch.append(head)
            size += len(head.texts)
        return batch

    def _queued_live(self) -> int:
        return sum(len(p.texts) for p in self._queue if not p.future.done())

    async def _worker(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Give concurrent callers a moment to join this forward pass, unless it is full.
            deadline = time.monotonic() + self._max_wait_s
            while self._queued_live() < self._max_batch and time.monotonic() < deadline:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), deadline - time.monotonic())
            batch = self._take_batch()
            if not batch:
                continue
            texts = [t for p in batch for t in p.texts]
            try:
                vectors, counts = await asyncio.to_thread(self._encode, texts)
            except Exception as exc:
                log.exception("embedding batch of %d prompts failed", len(texts))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            self.batches_run += 1
            row = 0
            for p in batch:
                n = len(p.texts)
                if not p.future.done():
                    p.future.set_result((vectors[row : row + n], sum(counts[row : row + n])))
                row += n

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        return self._model.encode(texts), self._model.count_tokens(texts)
