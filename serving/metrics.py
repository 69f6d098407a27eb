"""Prometheus metrics of one app, served at ``GET /metrics`` (text exposition format).

Each app owns a ``CollectorRegistry``, so several apps in one process (tests) keep
separate counts. ``/metadata`` keeps its human-readable counters; this is for scrapers.

| series                                   | type      | labels                | what                          |
|------------------------------------------|-----------|-----------------------|-------------------------------|
| `http_requests_total`                    | counter   | path, method, status  | answered requests             |
| `http_request_duration_seconds`          | histogram | path                  | time to answer, whole request |
| `prediction_queue_depth`                 | gauge     |                       | posts waiting for the model   |
| `prediction_batch_size`                  | histogram |                       | posts per forward pass        |
| `prediction_batch_duration_seconds`      | histogram |                       | time per forward pass         |
| `prediction_rejected_total`              | counter   | status, reason        | 503 and 504 answers           |
| `model_load_seconds`                     | gauge     |                       | load + warm-up at startup     |
| `model_info`                             | info      | name, version         | the model being served        |
| `image_embedding_cache_hits_total`       | counter   |                       | images not embedded again     |
| `image_embedding_cache_misses_total`     | counter   |                       | images through the image tower|
| `image_embedding_cache_entries`          | gauge     |                       | embeddings in the LRU cache   |

``path`` is the route template, never the raw URL, so clients cannot grow the label set.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

# Seconds: from a cached tiny-model answer (ms) to the 30 s default deadline.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("http_requests", "HTTP requests answered", ["path", "method", "status"], registry=r)
        self.latency = Histogram("http_request_duration_seconds", "Time to answer a request", ["path"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("prediction_queue_depth", "Posts waiting for the model", registry=r)
        self.batch_size = Histogram("prediction_batch_size", "Posts per forward pass", buckets=BATCH_SIZE_BUCKETS,
                                    registry=r)
        self.batch_seconds = Histogram("prediction_batch_duration_seconds", "Time per forward pass (with the "
                                       "processor call)", buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("prediction_rejected", "Requests answered 503 (not ready, overloaded) or 504 "
                                "(deadline)", ["status", "reason"], registry=r)
        self.model_load_seconds = Gauge("model_load_seconds", "Seconds to load and warm up the model", registry=r)
        self.model = Info("model", "The model being served", registry=r)
        self.cache_hits = Counter("image_embedding_cache_hits", "Images whose embedding was not computed again "
                                  "(in the cache, or met earlier in the same batch)", registry=r)
        self.cache_misses = Counter("image_embedding_cache_misses", "Distinct images through the image tower",
                                    registry=r)
        self.cache_entries = Gauge("image_embedding_cache_entries", "Image embeddings in the LRU cache", registry=r)

    def observe_request(self, path: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(path=path, method=method, status=str(status)).inc()
        self.latency.labels(path=path).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        """Called by the micro-batcher after each forward pass."""
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def observe_cache(self, hits: int, misses: int) -> None:
        """Called by the image embedding cache after each lookup round (in the model's thread)."""
        self.cache_hits.inc(hits)
        self.cache_misses.inc(misses)

    def track_cache(self, entries: Callable[[], int]) -> None:
        self.cache_entries.set_function(entries)

    def track_queue(self, queued: Callable[[], int]) -> None:
        """Read the queue depth from the live batcher at scrape time."""
        self.queue_depth.set_function(queued)

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition of every series, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
