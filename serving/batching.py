"""A bounded micro-batcher: concurrent requests share one forward pass.

Requests ``submit`` prepared posts; one worker task takes up to ``max_batch_size`` of
them and runs ``run_batch`` on them in a dedicated one-thread executor. Before a batch it
waits for company only if company is on its way: requests announce posts they are still
decoding (``incoming``), and the worker waits for those, at most ``max_wait_s``. A lone
request therefore never waits, and concurrent ones still meet in one batch. So:

- the event loop never runs model code (it only moves futures around);
- at most one inference runs at a time, which on CPU is what gives the best throughput
  (torch already uses every core inside one forward pass; two passes would fight);
- while one batch runs, new posts pile up and form the next batch, so throughput rises
  with concurrency without any tuning;
- the queue is bounded: ``submit`` raises ``QueueFull`` (the server answers 503 with
  Retry-After) instead of letting latency and memory grow without limit;
- one bad post never fails its batch mates: when a batch raises, its posts run again one
  by one, and only a post that fails alone gets the error.

A post whose caller gave up (deadline, disconnect) is skipped before inference.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")  # a prepared post
R = TypeVar("R")  # its result


class QueueFull(Exception):
    """The queue cannot take the posts now; ``retry_after_s`` estimates when it can."""

    def __init__(self, queued: int, max_queue: int, retry_after_s: int):
        super().__init__(f"{queued} posts queued (max {max_queue})")
        self.queued = queued
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future


class MicroBatcher(Generic[T, R]):
    """Group posts from concurrent callers into batches for ``run_batch``.

    ``run_batch(items) -> results`` is a blocking function (one result per item, in
    order); it runs in ``executor``, a one-thread executor (the server passes its torch
    thread, ``serving.service.torch_thread``), else in a thread of this batcher's own.
    ``max_batch_size=1, max_wait_s=0`` runs every post alone (MICRO_BATCHING=0). ``observe(size, seconds)``, if given, is
    told about every batch that ran (the server's /metrics).
    """

    def __init__(self, run_batch: Callable[[list[T]], Sequence[R]], *, max_batch_size: int, max_wait_s: float,
                 max_queue: int, observe: Callable[[int, float], None] | None = None,
                 executor: ThreadPoolExecutor | None = None):
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_s >= 0")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.observe = observe
        self._queue: deque[_Pending[T]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = executor
        self._owns_executor = executor is None  # shut down only the thread we started
        self._incoming = 0  # posts being prepared by callers that will submit them soon
        # Running statistics, for /metadata and Retry-After.
        self.batches = 0
        self.posts = 0
        self.largest_batch = 0
        self._batch_seconds_ema: float | None = None

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task = asyncio.create_task(self._worker(), name="micro-batcher")

    async def stop(self) -> None:
        """Stop the worker; posts still queued fail with ``RuntimeError``."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(RuntimeError("server is shutting down"))
        if self._executor is not None and self._owns_executor:
            # Let a batch already in the thread finish; it cannot be interrupted anyway.
            await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
            self._executor = None

    # -- submitting ---------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._queue)

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely drained: batches ahead x time per batch."""
        per_batch = self._batch_seconds_ema or 1.0
        batches_ahead = math.ceil(len(self._queue) / self.max_batch_size) + 1
        return max(1, math.ceil(batches_ahead * per_batch))

    async def submit_many(self, items: Sequence[T], return_exceptions: bool = False) -> list[R]:
        """Queue ``items`` together and wait for their results (in order).

        All or nothing: if they do not fit in the queue, none is queued and ``QueueFull``
        is raised. A request larger than ``max_queue`` on its own is let into an empty
        queue, so a big batch request is slow rather than impossible. Cancelling the
        caller (e.g. its deadline) withdraws the posts that have not run yet. An item the
        model failed on raises its exception, or, with ``return_exceptions``, is returned
        as it, so the other items keep their results.
        """
        if self._task is None or self._wakeup is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        if not items:
            return []
        if self._queue and len(self._queue) + len(items) > self.max_queue:
            raise QueueFull(len(self._queue), self.max_queue, self.retry_after_s())
        loop = asyncio.get_running_loop()
        pending = [_Pending(item, loop.create_future()) for item in items]
        self._queue.extend(pending)
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(p.future for p in pending), return_exceptions=return_exceptions))
        finally:
            for p in pending:  # on cancellation or a failed sibling: withdraw the rest
                if not p.future.done():
                    p.future.cancel()

    @contextmanager
    def incoming(self, n: int = 1):
        """Announce ``n`` posts that are being prepared and will be submitted after this block."""
        self._incoming += n
        try:
            yield
        finally:
            self._incoming -= n
            if self._wakeup is not None:
                self._wakeup.set()  # a waiting worker re-checks whether to keep waiting

    async def submit(self, item: T) -> R:
        return (await self.submit_many([item]))[0]

    # -- the worker ---------------------------------------------------------------------
    def _live(self) -> int:
        return sum(1 for p in self._queue if not p.future.done())

    def _take_batch(self) -> list[_Pending[T]]:
        batch: list[_Pending[T]] = []
        while self._queue and len(batch) < self.max_batch_size:
            p = self._queue.popleft()
            if not p.future.done():  # skip posts whose caller already gave up
                batch.append(p)
        return batch

    async def _wait_for_more(self, loop: asyncio.AbstractEventLoop) -> None:
        """While announced posts are still being prepared, wait (up to max_wait_s) for them."""
        deadline = loop.time() + self.max_wait_s
        while self._incoming > 0 and self._live() < self.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.max_wait_s > 0:
                await self._wait_for_more(loop)
            batch = self._take_batch()
            if not batch:
                continue
            try:
                await self._settle(loop, batch)
            except asyncio.CancelledError:
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(RuntimeError("server is shutting down"))
                raise

    async def _settle(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending[T]]) -> None:
        """Run ``batch`` and give each caller its result. If the batch raises (one post's
        MemoryError, say), run its posts again one by one: only a post that fails alone
        gets the exception (the server answers it 500), and its batch mates their results."""
        try:
            results = await self._forward(loop, [p.item for p in batch])
        except Exception as e:  # noqa: BLE001 - handed to the callers
            if len(batch) == 1:
                log.exception("inference failed for a post")
                if not batch[0].future.done():
                    batch[0].future.set_exception(e)
                return
            log.warning("inference failed for a batch of %d posts (%s: %s); running them one by one", len(batch),
                        type(e).__name__, e)
            for p in batch:
                if not p.future.done():  # a caller may have given up meanwhile
                    await self._settle(loop, [p])
            return
        for p, r in zip(batch, results):
            if not p.future.done():
                p.future.set_result(r)

    async def _forward(self, loop: asyncio.AbstractEventLoop, items: list[T]) -> Sequence[R]:
        """One ``run_batch`` call in the executor, counted in the statistics."""
        t0 = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, self.run_batch, items)
            if len(results) != len(items):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} posts")
            return results
        finally:
            dt = time.perf_counter() - t0
            self._batch_seconds_ema = dt if self._batch_seconds_ema is None else 0.8 * self._batch_seconds_ema + 0.2 * dt
            self.batches += 1
            self.posts += len(items)
            self.largest_batch = max(self.largest_batch, len(items))
            if self.observe is not None:
                self.observe(len(items), dt)

    def stats(self) -> dict:
        return {"batches": self.batches, "posts": self.posts, "largest_batch": self.largest_batch,
                "mean_batch_size": round(self.posts / self.batches, 3) if self.batches else None,
                "queued": len(self._queue),
                "batch_seconds_ema": round(self._batch_seconds_ema, 4) if self._batch_seconds_ema else None}
