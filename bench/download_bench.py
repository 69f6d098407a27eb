"""Benchmark 3b: downloading a table's image URLs, against the ideal rate of the download workers.

`data_preprocessing/download.py`'s `download_all` fetches 500 distinct URLs into an empty cache at its default 16
workers, from a loopback HTTP server (its own process, keep-alive) that waits 50 ms before every answer and then sends
a 640x480 JPEG of the photo pool (with TCP_NODELAY, as CDNs send: else the client's delayed ACK adds 40 ms to each
answer). With every worker always waiting on one answer that is workers / latency = 320 images/s; the goal is >= 0.8
of it. Each repeat starts from an empty cache (median of 3).
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchlib import BenchConfig, goal, photo_table, ratio, repeat_interleaved, start, table, work_dir, \
    write_result
from common.config import field
from data_preprocessing.download import DownloadConfig, DownloadError, download_all


@dataclass
class DownloadBenchConfig(BenchConfig):
    urls: int = field(500, help="distinct image URLs per repeat")
    latency_ms: float = field(50.0, help="what the server adds to every answer")
    workers: int = field(DownloadConfig.workers, help="download workers (preprocess.py's --download-workers)")
    repeats: int = field(3, help="repeats, each into an empty cache (median reported)")
    pool_images: int = field(200, help="distinct 640x480 JPEGs that the URLs cycle through")

    def __post_init__(self):
        if self.smoke:
            self.urls, self.repeats, self.pool_images = 48, 1, 8
        if min(self.urls, self.workers, self.repeats, self.pool_images) < 1 or self.latency_ms <= 0:
            raise ValueError("--urls, --workers, --repeats and --pool-images must be >= 1, --latency-ms > 0")


def serve(images: list[str], latency_s: float, port_out) -> None:
    """The server process: ``/img/<i>.jpg`` is ``images[i % len(images)]``, sent ``latency_s`` after the request."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    bodies = [Path(p).read_bytes() for p in images]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a CDN
        disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall

        def do_GET(self):
            time.sleep(latency_s)
            body = bodies[int(self.path.rsplit("/", 1)[1].split(".")[0]) % len(bodies)]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 128  # 16 workers connect at once; the default backlog of 5 would drop SYNs

    httpd = Server(("127.0.0.1", 0), Handler)
    port_out.send(httpd.server_address[1])
    httpd.serve_forever()


def download_rate(urls: list[str], cache: Path, workers: int) -> float:
    """Images/s of one ``download_all`` over ``urls`` into an emptied ``cache``; every URL must succeed."""
    shutil.rmtree(cache, ignore_errors=True)
    cfg = DownloadConfig(workers=workers, cache_dir=cache)
    t0 = time.perf_counter()
    failed = [(u, r) for u, r in download_all(urls, cfg, progress=False) if isinstance(r, DownloadError)]
    seconds = time.perf_counter() - t0
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(urls)} downloads failed, e.g. {failed[0]}")
    return len(urls) / seconds


def main(argv: list[str] | None = None) -> dict:
    # 1. Parse args; the photo pool, and the server in its own process (its threads never share our GIL).
    cfg, t_start = start(DownloadBenchConfig, argv, __doc__)
    pool = sorted((photo_table(cfg.out_dir, cfg.pool_images, 1).parent / "images").glob("*.jpg"))
    receive, send = mp.Pipe(duplex=False)
    server = mp.get_context("spawn").Process(target=serve, args=([str(p) for p in pool], cfg.latency_ms / 1000, send),
                                             daemon=True)
    server.start()
    try:
        port = receive.recv()
        urls = [f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(cfg.urls)]

        # 2. Repeats, each from an empty cache.
        cache = work_dir(cfg.out_dir, "download-cache")
        rates = repeat_interleaved({"download": lambda: download_rate(urls, cache, cfg.workers)}, cfg.repeats, 1)
    finally:
        server.terminate()
        server.join()
    shutil.rmtree(cache, ignore_errors=True)

    # 3. Against the ideal: every worker always waiting on one answer.
    ideal = cfg.workers / (cfg.latency_ms / 1000)
    share = ratio(rates["download"]["median"], ideal)
    mean_kb = round(sum(p.stat().st_size for p in pool) / len(pool) / 1024, 1)
    payload = {"images_per_s": rates["download"], "ideal_images_per_s": ideal, "share_of_ideal": share,
               "mean_image_kib": mean_kb,
               "goals": [goal(f"image downloads, {cfg.workers} workers, {cfg.latency_ms:g} ms per answer: "
                              "images/s / workers/latency", share, ">=", 0.8)],
               "tables": [table(["URLs", "workers", "latency (ms)", "images/s (median)", "repeats", "ideal images/s"],
                                [[cfg.urls, cfg.workers, cfg.latency_ms, rates["download"]["median"],
                                  rates["download"]["values"], ideal]],
                                f"**{share}** of the ideal rate; JPEGs of {mean_kb} KiB on average.")]}
    write_result("download", payload, cfg, t_start, __doc__)
    return payload


if __name__ == "__main__":
    main()
