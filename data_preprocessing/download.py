"""Image URLs of a posts table, downloaded once into a content cache.

The table owner (``table.py``) hands every ``http(s)://`` cell of the image column to
``download_all`` and reads the images from the paths it yields; everything about the
network lives here.

* **Cache.** ``cache_path(url)`` is ``CACHE/ab/abcdef...`` (the sha256 of the URL as
  written). A URL whose file is there is never fetched again: posts whose links have
  since expired (TikTok: 6 hours; Instagram's CDN: days) still work. A body is written
  to a hidden ``.part`` name beside its final name and renamed when complete, so a
  killed run never leaves half an image under a cache name. Only 2xx bodies are cached;
  failures are not, so a later run tries them again. What a 200 carries is not checked
  here: an HTML error page is cached as it is, and the image decoder rejects it later
  (``unsupported_format``).
* **Requests.** ``workers`` threads share one httpx client (one connection each). A
  request gets ``timeout_s`` per network operation and in total; ``max_redirects``
  redirects; at most ``tries`` tries for a connection error, a timeout, a 429 or a 5xx,
  waiting ``backoff_s``, then twice that, ... between them (a 429's or 5xx's
  ``Retry-After`` instead, up to ``RETRY_AFTER_CAP_S``). A body over ``max_bytes`` is
  cut off while it streams, or refused up front when its ``Content-Length`` says so.
* **Outcomes.** Each distinct URL gets one result: its cached path, or a
  ``DownloadError`` whose ``reason`` is one of ``REASONS`` and whose ``message`` gives
  the HTTP status or the network error.
* **Memory.** URLs are read from the iterator as workers free up (at most
  ``2 * workers`` in flight) and bodies stream to disk in chunks; what grows with the
  table is only the set of URLs already seen (to fetch a repeated URL once).
"""

from __future__ import annotations

import concurrent.futures as cf
import email.utils
import hashlib
import logging
import os
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from common.config import bar_disabled, field

if TYPE_CHECKING:  # httpx and tqdm are imported where used: scripts' --help stays quick
    import httpx

logger = logging.getLogger(__name__)

REASONS = ("download_failed", "download_timeout", "too_large", "unsupported_url")
SCHEMES = ("http", "https")
RETRY_AFTER_CAP_S = 60.0  # a server asking for longer is not waited on past this
CHUNK_BYTES = 64 * 1024  # bytes read from a response at a time
# A scheme of two or more letters, then "://": "C:\\x" and "C://x" are Windows paths.
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/engagement/images``, else ``~/.cache/engagement/images``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "engagement" / "images"


def is_url(cell: str) -> bool:
    """True for any ``scheme://...`` cell (http, https, ftp, file, ...); False for a local path.
    The cell is taken as written: the table reader strips it first."""
    return bool(_URL_RE.match(cell))


def cache_path(url: str, cache_dir: Path) -> Path:
    """Where ``url``'s body is cached: ``cache_dir/<2 hex>/<sha256 of the URL>``."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()
    return Path(cache_dir) / digest[:2] / digest


@dataclass(frozen=True)
class DownloadConfig:
    """How image URLs are fetched and where they are cached."""

    workers: int = field(16, help="concurrent downloads")
    timeout_s: float = field(20.0, help="seconds allowed per request (each network operation and the whole body)")
    max_bytes: int = field(30_000_000, help="largest image body in bytes; a larger one is rejected as too_large")
    cache_dir: Path = field(help="content cache of downloaded images, keyed by URL", default_factory=default_cache_dir)
    tries: int = field(3, help="tries per URL for connection errors, timeouts, 429 and 5xx")
    max_redirects: int = field(5, help="redirects followed per request")
    backoff_s: float = field(0.5, help="wait before the second try; doubled before each later one")

    def __post_init__(self):
        object.__setattr__(self, "cache_dir", Path(self.cache_dir).expanduser())  # a str from a flag
        # (name as the user sets it, value, lowest allowed, whether the lowest itself is allowed)
        for name, value, low, inclusive in (
                ("--download-workers", self.workers, 1, True), ("--download-timeout", self.timeout_s, 0, False),
                ("--max-image-bytes", self.max_bytes, 1, True), ("tries", self.tries, 1, True),
                ("max_redirects", self.max_redirects, 0, True), ("backoff_s", self.backoff_s, 0, True)):
            if value < low or (value == low and not inclusive):
                raise ValueError(f"{name} must be {'>=' if inclusive else '>'} {low}, got {value}")


@dataclass(kw_only=True)
class DownloadArgs:
    """The download flags of every script that reads a table: a script's config inherits
    them (``class PreprocessConfig(DownloadArgs)``; keyword-only, so they may follow fields
    without defaults) and passes ``cfg.download_config()`` on. A subclass that defines its
    own ``__post_init__`` calls ``super().__post_init__()``."""

    image_cache: str = field(help="content cache of downloaded image URLs (a cached URL is never fetched again); "
                                  "default under $XDG_CACHE_HOME if set, else ~/.cache",
                             default_factory=lambda: str(default_cache_dir()))
    download_workers: int = field(DownloadConfig.workers, help="concurrent image downloads")
    download_timeout: float = field(DownloadConfig.timeout_s, help="seconds allowed per image request")
    max_image_bytes: int = field(DownloadConfig.max_bytes, help="largest image download in bytes (too_large beyond)")

    def __post_init__(self):
        self.download_config()  # out-of-range values fail at parse time, naming their flag

    def download_config(self) -> DownloadConfig:
        return DownloadConfig(workers=self.download_workers, timeout_s=self.download_timeout,
                              max_bytes=self.max_image_bytes, cache_dir=Path(self.image_cache))


class DownloadError(Exception):
    """Why a URL gave no cached file: ``reason`` (one of ``REASONS``) and ``message`` (detail)."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown download reason {reason!r}; one of {REASONS}")
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


class _Retryable(Exception):
    """A try that failed in a way worth another: the error to report, and the server's wait."""

    def __init__(self, error: DownloadError, wait_s: float | None = None):
        super().__init__(error.message)
        self.error, self.wait_s = error, wait_s


# ---------------------------------------------------------------------------------------
# One URL
# ---------------------------------------------------------------------------------------


def _retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date), capped."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_S)


def _check_status(response: httpx.Response) -> None:
    """Raise unless the final response is a 2xx; 429 and 5xx are worth another try."""
    status = response.status_code
    if 200 <= status < 300:
        return
    error = DownloadError("download_failed", f"HTTP {status} {response.reason_phrase}".strip())
    if status == 429 or status >= 500:
        raise _Retryable(error, _retry_after(response.headers.get("retry-after")))
    raise error


def _stream_to_cache(response: httpx.Response, dest: Path, cfg: DownloadConfig, deadline: float) -> None:
    """Write the body to a hidden temp name beside ``dest``, then rename it into place."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cfg.max_bytes:
        raise DownloadError("too_large",
                            f"Content-Length {int(declared):,} bytes > --max-image-bytes {cfg.max_bytes:,}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
    # os.open with 0o666: the file gets the user's umask (mkstemp would force 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            size = 0
            for chunk in response.iter_bytes(CHUNK_BYTES):
                size += len(chunk)
                if size > cfg.max_bytes:  # stop reading: the rest of the body is never fetched
                    raise DownloadError("too_large", f"body over --max-image-bytes {cfg.max_bytes:,}")
                if time.monotonic() > deadline:  # a slow drip: each read is in time, the whole is not
                    raise _Retryable(DownloadError("download_timeout", f"body not complete in {cfg.timeout_s:g} s"))
                fh.write(chunk)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)  # after a failure; a no-op once renamed


def _try_once(client: httpx.Client, url: str, dest: Path, cfg: DownloadConfig) -> None:
    """One GET (following redirects) into the cache; httpx's errors become ours."""
    import httpx

    deadline = time.monotonic() + cfg.timeout_s
    try:
        with client.stream("GET", url) as response:
            _check_status(response)
            _stream_to_cache(response, dest, cfg, deadline)
    except httpx.TooManyRedirects:
        raise DownloadError("download_failed", f"more than {cfg.max_redirects} redirects") from None
    except httpx.UnsupportedProtocol as e:  # a redirect to ftp:// and the like, or no host at all ("http://")
        if e.request.url.scheme and e.request.url.scheme not in SCHEMES:
            raise DownloadError("unsupported_url", f"redirected to {e.request.url}") from None
        raise DownloadError("download_failed", f"invalid URL: {e}") from None
    except httpx.TimeoutException as e:
        raise _Retryable(DownloadError("download_timeout", f"{type(e).__name__} after {cfg.timeout_s:g} s")) from None
    except httpx.TransportError as e:  # connection refused or reset, DNS, a broken response
        raise _Retryable(DownloadError("download_failed", f"{type(e).__name__}: {e}")) from None
    except (httpx.InvalidURL, httpx.RequestError) as e:  # a malformed URL, an undecodable body
        raise DownloadError("download_failed", f"{type(e).__name__}: {e}") from None


def _fetch(client: httpx.Client, url: str, cfg: DownloadConfig) -> Path | DownloadError:
    """Download ``url`` into the cache (with retries): its cached file, or why not."""
    dest = cache_path(url, cfg.cache_dir)
    for attempt in range(1, cfg.tries + 1):
        try:
            _try_once(client, url, dest, cfg)
            return dest
        except DownloadError as e:
            return e
        except _Retryable as r:
            if attempt == cfg.tries:
                return r.error
            wait = r.wait_s if r.wait_s is not None else cfg.backoff_s * 2 ** (attempt - 1)
            logger.debug("try %d of %s failed (%s); again in %.2f s", attempt, url, r.error, wait)
            time.sleep(wait)
    raise AssertionError("unreachable: the last try returns")


# ---------------------------------------------------------------------------------------
# Many URLs
# ---------------------------------------------------------------------------------------


def _make_client(cfg: DownloadConfig) -> httpx.Client:
    """One client shared by the worker threads (httpx clients are thread-safe): a connection per worker."""
    import httpx

    limits = httpx.Limits(max_connections=cfg.workers, max_keepalive_connections=cfg.workers)
    return httpx.Client(timeout=httpx.Timeout(cfg.timeout_s), limits=limits, follow_redirects=True,
                        max_redirects=cfg.max_redirects)


class _Tally:
    """Outcomes by reason, and the progress bar: its count and rate are network fetches
    (downloads/s), cached URLs show beside it."""

    def __init__(self, progress: bool):
        from tqdm.auto import tqdm

        self.counts: Counter[str] = Counter()
        self.t0, self.network = time.perf_counter(), 0
        self.bar = tqdm(desc="download", unit="img", disable=bar_disabled(progress))

    def add(self, result: Path | DownloadError, fetched: bool) -> None:
        self.counts[result.reason if isinstance(result, DownloadError) else "fetched" if fetched else "cached"] += 1
        if fetched:
            self.network += 1
            self.bar.update(1)
        self.bar.set_postfix(cached=self.counts["cached"], failed=sum(self.counts[r] for r in REASONS), refresh=False)

    def close(self) -> None:
        self.bar.close()
        if not self.counts:  # a table without URLs: nothing to report
            return
        seconds = time.perf_counter() - self.t0
        failed = {r: self.counts[r] for r in REASONS if self.counts[r]}
        logger.info("image URLs: %d downloaded, %d from the cache, %d failed%s; %d fetches in %.1f s (%.1f/s)",
                    self.counts["fetched"], self.counts["cached"], sum(failed.values()),
                    f" ({', '.join(f'{r} {n}' for r, n in failed.items())})" if failed else "",
                    self.network, seconds, self.network / seconds if seconds > 0 else 0.0)


def _without_network(url: str, cfg: DownloadConfig) -> Path | DownloadError | None:
    """The result of a URL that needs no request (cached, or a scheme we do not fetch), else None."""
    scheme = url.partition("://")[0].lower() if is_url(url) else ""
    if scheme not in SCHEMES:
        what = f"{scheme}:// URL" if scheme else "not a scheme:// URL"
        return DownloadError("unsupported_url", f"{what} (only {' and '.join(SCHEMES)} are downloaded)")
    dest = cache_path(url, cfg.cache_dir)
    return dest if dest.is_file() else None


def download_all(urls: Iterable[str], cfg: DownloadConfig,
                 progress: bool = True) -> Iterator[tuple[str, Path | DownloadError]]:
    """``(url, cached path or DownloadError)`` once per distinct URL, in the order they finish.

    ``urls`` is read lazily: at most ``2 * cfg.workers`` requests are in flight. Closing the
    iterator early cancels what has not started and waits for the requests under way.
    """
    tally, seen = _Tally(progress), set()
    pending: set[cf.Future] = set()
    with _make_client(cfg) as client, cf.ThreadPoolExecutor(cfg.workers, thread_name_prefix="download") as pool:
        try:
            for url in urls:
                if url in seen:
                    continue
                seen.add(url)
                result = _without_network(url, cfg)
                if result is not None:
                    tally.add(result, fetched=False)
                    yield url, result
                    continue
                pending.add(pool.submit(lambda u: (u, _fetch(client, u, cfg)), url))
                while len(pending) >= 2 * cfg.workers:
                    done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    yield from _finished(done, tally)
            while pending:
                done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                yield from _finished(done, tally)
        finally:
            for future in pending:
                future.cancel()
            tally.close()


def _finished(done: set[cf.Future], tally: _Tally) -> Iterator[tuple[str, Path | DownloadError]]:
    for future in done:
        url, result = future.result()  # an OSError writing the cache propagates: that is not the URL's fault
        tally.add(result, fetched=True)
        yield url, result
