"""The running service: predictor, micro-batcher and decoding threads, built by the
lifespan and handed to endpoints by the ``get_service`` dependency.

The path of one post, in one direction:

1. parse: FastAPI validates the body with the contract's model; ``Contract.read_post``
   turns it into a ``RawPost`` (in the endpoint);
2. admit: ``Predictor.check`` reads the image's header in a decoding thread, and the post
   waits for room in the decode budget (``PixelBudget``, MAX_DECODE_PIXELS);
3. prepare: ``Predictor.prepare`` in a decoding thread (``prepare.load_image``,
   ``pre_resize``, ``clean_text``, ``sentiment``), unless the request's deadline passed;
4. queue: ``MicroBatcher.submit_many``, with posts of concurrent requests;
5. predict: ``Predictor.run_batch`` in the one torch thread -> a ``Prediction`` each;
6. respond: the endpoint returns it (or, in a batch, wraps it with its index).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from fastapi import Request

from data_preprocessing.posts import Post
from serving.batching import MicroBatcher, QueueFull
from serving.contract import RawPost, RawVariants
from serving.errors import INTERNAL_ERROR, APIError
from serving.metrics import ServingMetrics
from serving.middleware import request_deadline
from serving.predictor import Predictor
from serving.schemas import Prediction, VariantsResponse
from serving.settings import ServingSettings


def torch_thread(torch_threads: int | None) -> ThreadPoolExecutor:
    """The one thread that runs torch in the server: loading, warm-up and every batch.

    Why one: libgomp gives each OS thread that enters a parallel region its own OpenMP
    team. A second team (the model loaded or warmed up on another thread) leaves more
    libgomp threads than cores; libgomp then stops spin-waiting between parallel regions
    and each of the forward's many regions pays a futex wake-up. On a 2-core Intel machine
    the ViT-B/32 forward took 83 ms on the main thread and 112 ms on the inference thread
    for that reason (bench/serve_bench.py measures it). The prepare threads never run torch.
    """
    def init() -> None:
        import torch

        if torch_threads:  # per thread in OpenMP (omp_set_num_threads), so set it here
            torch.set_num_threads(torch_threads)

    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference", initializer=init)


class DecodeBusy(Exception):
    """No room in the decode budget within DECODE_WAIT_S."""


class PixelBudget:
    """The pixels being decoded at once across the server (MAX_DECODE_PIXELS), handed out
    first come, first served.

    Decoding costs memory in proportion to pixels, whatever the file's size: a 78 KB
    16-bit PNG decodes to 40 MP. Posts are decoded before they are queued for the model,
    so the queue limit cannot bound this; the budget does. A post takes min(its pixels,
    the whole budget): an image larger than the budget (within MAX_PIXELS) is decoded when
    no other is. A post that fits is admitted at once, so ordinary photos go on while a
    huge image waits for room (the default leaves room for phone photos beside one image
    at MAX_PIXELS).
    """

    def __init__(self, total: int):
        self.total = total
        self.in_use = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    async def acquire(self, pixels: int, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for room; returns the pixels taken (give them back with
        ``release``), or raises ``DecodeBusy``."""
        n = min(max(pixels, 1), self.total)
        if self.in_use + n <= self.total:  # fits now: goes ahead of larger posts still waiting
            self.in_use += n
            return n
        entry = (n, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout_s):
                await entry[1]
        except (TimeoutError, asyncio.CancelledError) as e:
            if entry[1].done() and not entry[1].cancelled():  # granted as the caller gave up: give it back
                self.release(n)
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._grant()  # the others may have queued behind this one
            if isinstance(e, TimeoutError):
                raise DecodeBusy() from None
            raise
        return n

    def release(self, n: int) -> None:
        self.in_use -= n
        self._grant()

    def _grant(self) -> None:
        """Grant waiters in arrival order, each that fits now: a photo never waits behind a
        huge image that is waiting for the whole budget (which gets 503 past DECODE_WAIT_S)."""
        for entry in list(self._waiters):
            n, future = entry
            if future.done():
                self._waiters.remove(entry)
            elif self.in_use + n <= self.total:
                self._waiters.remove(entry)
                self.in_use += n
                future.set_result(None)


def prepare_unless_late(predictor: Predictor, raw: RawPost, deadline: float) -> Post:
    """``predictor.prepare(raw)`` in a decoding thread, unless the request's deadline has
    passed. Cancelling the request withdraws posts still queued for a thread, but only once
    the event loop runs again: a post a thread picks up in between would be decoded for a
    caller that already got its 504."""
    if time.monotonic() >= deadline:  # asyncio's loop time is time.monotonic()
        raise TimeoutError("the request's deadline passed before its post was prepared")
    return predictor.prepare(raw)


@dataclass
class Service:
    """Everything the lifespan builds; lives on ``app.state.service`` while serving."""

    settings: ServingSettings
    predictor: Predictor
    batcher: MicroBatcher
    prep_pool: ThreadPoolExecutor  # decoding threads; they never run torch
    torch_thread: ThreadPoolExecutor  # the model's one thread (``torch_thread``)
    decode_budget: PixelBudget  # MAX_DECODE_PIXELS
    loaded_at: float

    @classmethod
    async def start(cls, settings: ServingSettings, predictor: Predictor, metrics: ServingMetrics,
                    torch_pool: ThreadPoolExecutor) -> "Service":
        """``torch_pool`` is the thread that loaded ``predictor``; batches run there too."""
        batching = settings.micro_batching
        batcher = MicroBatcher(predictor.run_batch,
                               max_batch_size=settings.max_batch_size if batching else 1,
                               max_wait_s=settings.max_wait_ms / 1000.0 if batching else 0.0,
                               max_queue=settings.max_queue, observe=metrics.observe_batch, executor=torch_pool)
        await batcher.start()
        metrics.track_queue(lambda: batcher.queued)
        prep_pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1), thread_name_prefix="prepare")
        return cls(settings, predictor, batcher, prep_pool, torch_pool, PixelBudget(settings.max_decode_pixels),
                   time.time())

    async def stop(self) -> None:
        await self.batcher.stop()
        self.prep_pool.shutdown(wait=False, cancel_futures=True)
        # Let a batch already in the thread finish; it cannot be interrupted anyway.
        await asyncio.get_running_loop().run_in_executor(None, self.torch_thread.shutdown)

    async def _prepare(self, raw: RawPost, deadline: float) -> Post | APIError:
        """Steps 2-3 for one post: its Post, or its own APIError (a bad image or feature).
        Raises DecodeBusy when the decode budget has no room for it in time."""
        loop = asyncio.get_running_loop()
        try:
            header = await loop.run_in_executor(self.prep_pool, self.predictor.check, raw)
            pixels = await self.decode_budget.acquire(header.width * header.height, self.settings.decode_wait_s)
            job: Future = self.prep_pool.submit(prepare_unless_late, self.predictor, raw, deadline)
        except APIError as e:  # this post cannot be used; the others go on
            return e
        # The pixels are given back when the thread is done with the post (or it is withdrawn
        # before a thread took it), not when this coroutine stops waiting for it.
        job.add_done_callback(lambda _: _call_soon(loop, self.decode_budget.release, pixels))
        try:
            return await asyncio.wrap_future(job)
        except APIError as e:
            return e

    async def _prepare_all(self, posts: Sequence[RawPost], deadline: float) -> list[Post | APIError]:
        """Each post's Post or APIError; a post that cannot be admitted fails the request,
        and the rest of its posts are withdrawn."""
        tasks = [asyncio.ensure_future(self._prepare(p, deadline)) for p in posts]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()

    async def predict(self, posts: Sequence[RawPost]) -> list[Prediction | APIError]:
        """Steps 2-5 for the posts of one request: a Prediction per post, or that post's
        APIError (a bad image, or the model failing on that post alone). Overload (503)
        and the deadline (504) fail the whole request, since a client retries all of it.

        The deadline is the request's (``middleware.REQUEST_DEADLINE``: REQUEST_TIMEOUT_S
        from the end of its headers, so reading the body counted), else REQUEST_TIMEOUT_S
        from now."""
        s = self.settings
        deadline = request_deadline() or asyncio.get_running_loop().time() + s.request_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                # Announced to the batcher, so a batch forming now waits for these posts.
                with self.batcher.incoming(len(posts)):
                    prepared = await self._prepare_all(posts, deadline)
                ready = [p for p in prepared if isinstance(p, Post)]
                results = iter(await self.batcher.submit_many(ready, return_exceptions=True))
        except TimeoutError:
            raise deadline_error(s) from None
        except QueueFull as e:
            raise APIError(503, "overloaded",
                           f"the server is at capacity ({e.queued} posts queued, MAX_QUEUE={e.max_queue}); "
                           "retry later", {"Retry-After": str(e.retry_after_s)}) from None
        except DecodeBusy:
            raise decode_busy_error(s) from None
        return [p if isinstance(p, APIError) else _answer(next(results)) for p in prepared]

    async def predict_variants(self, raw: RawVariants) -> VariantsResponse:
        """One image's caption variants (and grid times): prepared in a decoding thread, then the model's
        one thread runs them as one job, queued there with the micro-batches (it is one forward of the
        image and the captions). The deadline is the same as a post's."""
        s, loop = self.settings, asyncio.get_running_loop()
        deadline = request_deadline() or loop.time() + s.request_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                # The image is decoded once, as a post's is: admitted by the decode budget.
                first = await self._prepare(RawPost(raw.image, raw.captions[0], raw.features), deadline)
                if isinstance(first, APIError):
                    raise first
                prepared = await loop.run_in_executor(self.prep_pool, self.predictor.prepare_variants, raw, first)
                return await loop.run_in_executor(self.torch_thread, self.predictor.run_variants, prepared)
        except TimeoutError:
            raise deadline_error(s) from None
        except DecodeBusy:
            raise decode_busy_error(s) from None

    async def predict_one(self, post: RawPost) -> Prediction:
        (out,) = await self.predict([post])
        if isinstance(out, APIError):
            raise out
        return out


def deadline_error(s: ServingSettings) -> APIError:
    return APIError(504, "deadline_exceeded", f"no prediction within {s.request_timeout_s:g}s (REQUEST_TIMEOUT_S)")


def decode_busy_error(s: ServingSettings) -> APIError:
    return APIError(503, "overloaded", f"the server is decoding as many pixels as it may (MAX_DECODE_PIXELS="
                                       f"{s.max_decode_pixels:,}); retry later",
                    {"Retry-After": str(math.ceil(s.decode_wait_s))})


def _answer(result: Prediction | Exception) -> Prediction | APIError:
    """A post's result from the batcher: its prediction, or, when the model failed on this
    post run alone (the batcher logged why), its own 500."""
    return APIError(500, "internal_error", INTERNAL_ERROR) if isinstance(result, Exception) else result


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """``fn(*args)`` on ``loop``, from any thread; nothing once the loop is closed (shutdown)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def get_service(request: Request) -> Service:
    """Dependency: the loaded service, or 503 while the model is not loaded."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise APIError(503, "not_ready", "the model is not loaded (yet); retry shortly", {"Retry-After": "5"})
    return service
