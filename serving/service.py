"""The running service: predictor, micro-batcher and decoding threads, built by the
lifespan and handed to endpoints by the ``get_service`` dependency.

The path of one post, in one direction:

1. parse: FastAPI validates the body with the contract's model; ``Contract.read_post``
   turns it into a ``RawPost`` (in the endpoint);
2. prepare: ``Predictor.prepare`` in a decoding thread (``prepare.load_image``,
   ``pre_resize``, ``clean_text``, ``sentiment``);
3. queue: ``MicroBatcher.submit_many``, with posts of concurrent requests;
4. predict: ``Predictor.run_batch`` in the one torch thread -> a ``Prediction`` each;
5. respond: the endpoint returns it (or, in a batch, wraps it with its index).
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from fastapi import Request

from serving.batching import MicroBatcher, QueueFull
from serving.contract import RawPost, RawVariants
from serving.errors import APIError
from serving.metrics import ServingMetrics
from data_preprocessing.posts import Post
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


@dataclass
class Service:
    """Everything the lifespan builds; lives on ``app.state.service`` while serving."""

    settings: ServingSettings
    predictor: Predictor
    batcher: MicroBatcher
    prep_pool: ThreadPoolExecutor  # decoding threads; they never run torch
    torch_thread: ThreadPoolExecutor  # the model's one thread (``torch_thread``)
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
        return cls(settings, predictor, batcher, prep_pool, torch_pool, time.time())

    async def stop(self) -> None:
        await self.batcher.stop()
        self.prep_pool.shutdown(wait=False, cancel_futures=True)
        # Let a batch already in the thread finish; it cannot be interrupted anyway.
        await asyncio.get_running_loop().run_in_executor(None, self.torch_thread.shutdown)

    async def _prepare(self, raw: RawPost) -> Post | APIError:
        try:
            return await asyncio.get_running_loop().run_in_executor(self.prep_pool, self.predictor.prepare, raw)
        except APIError as e:  # this post's image cannot be used; the others go on
            return e

    async def predict(self, posts: Sequence[RawPost]) -> list[Prediction | APIError]:
        """Steps 2-4 for the posts of one request: a Prediction per post, or that post's
        APIError (a bad image). Overload (503) and the deadline (504) fail the whole
        request, since a client retries all of it."""
        s = self.settings
        try:
            async with asyncio.timeout(s.request_timeout_s):
                # Announced to the batcher, so a batch forming now waits for these posts.
                with self.batcher.incoming(len(posts)):
                    prepared = await asyncio.gather(*(self._prepare(p) for p in posts))
                results = iter(await self.batcher.submit_many([p for p in prepared if isinstance(p, Post)]))
        except TimeoutError:
            raise APIError(504, "deadline_exceeded",
                           f"no prediction within {s.request_timeout_s:g}s (REQUEST_TIMEOUT_S)") from None
        except QueueFull as e:
            raise APIError(503, "overloaded",
                           f"the server is at capacity ({e.queued} posts queued, MAX_QUEUE={e.max_queue}); "
                           "retry later", {"Retry-After": str(e.retry_after_s)}) from None
        return [p if isinstance(p, APIError) else next(results) for p in prepared]

    async def predict_variants(self, raw: RawVariants) -> VariantsResponse:
        """One image's caption variants (and grid times): prepared in a decoding thread, then the model's
        one thread runs them as one job, queued there with the micro-batches (it is one forward of the
        image and the captions). The deadline is the same as a post's."""
        s, loop = self.settings, asyncio.get_running_loop()
        try:
            async with asyncio.timeout(s.request_timeout_s):
                prepared = await loop.run_in_executor(self.prep_pool, self.predictor.prepare_variants, raw)
                return await loop.run_in_executor(self.torch_thread, self.predictor.run_variants, prepared)
        except TimeoutError:
            raise APIError(504, "deadline_exceeded",
                           f"no prediction within {s.request_timeout_s:g}s (REQUEST_TIMEOUT_S)") from None

    async def predict_one(self, post: RawPost) -> Prediction:
        (out,) = await self.predict([post])
        if isinstance(out, APIError):
            raise out
        return out


def get_service(request: Request) -> Service:
    """Dependency: the loaded service, or 503 while the model is not loaded."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise APIError(503, "not_ready", "the model is not loaded (yet); retry shortly", {"Retry-After": "5"})
    return service
