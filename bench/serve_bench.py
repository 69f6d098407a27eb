"""Benchmark 4: the prediction API under load, with micro-batching on and off.

    python bench/serve_bench.py            # full: ViT-B/32-shaped model, about 4 minutes
    python bench/serve_bench.py --smoke    # tiny model, a second per level

A real ``uvicorn serving.app:app`` on 127.0.0.1, driven by a real load tool: ``hey``
(``apt-get install hey``; ``make bench`` installs it if missing). Where hey is absent the
script falls back to a small asyncio/httpx load generator and says so in the JSON. Every
request is one multipart POST /predict with a 640x480 JPEG and a typical caption.

Measured, in one run on one machine:

1. the raw model forward at batch 1 (``CLIPRegressor.forward`` on ready tensors), and for
   reference the per-post forward at batch 16 and the decode+prepare+processor cost;
2. for MICRO_BATCHING=1 and =0 (two servers up at once, runs alternating between them), at
   each concurrency (1, 4, 16, 64): req/s (median over ``--repeats`` runs of about
   ``--duration-s`` each), p50/p95/p99 latency over all the level's requests, status codes
   and transport errors;
3. an overload step (tiny MAX_QUEUE, concurrency 64): which status codes come back.

Goals: p50 at concurrency 1 / raw forward <= 1.3; req/s at 16 >= 2x req/s at 1 (both with
micro-batching on, the default); zero errors at nominal load; only 503 under overload.
The artifact is ``build_tiny_clip(preset)`` + a random head, saved with
``save_artifact`` and a ``TargetTransform``: the weights do not matter for speed.

Writes ``bench/out/serving.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import REPO_ROOT, config_dict, field, parse_config, setup_logging

log = logging.getLogger(__name__)

BOUNDARY = "benchBoundary7MA4YWxkTrZu0gW"
LOAD_TOOLS = ("auto", "hey", "python")


@dataclass
class ServeBenchConfig:
    """Benchmark POST /predict under load (latency percentiles, req/s, overload behaviour)."""

    out_dir: str = field(str(Path(__file__).resolve().parent / "out"), help="where serving.json and work files go")
    smoke: bool = field(False, help="tiny model, short levels: checks the script runs, numbers mean nothing")
    preset: str = field("b32", help="CLIP shape of the served model (models/tiny_clip.py preset)",
                        choices=("tiny", "b32"))
    concurrency: str = field("1,4,16,64", help="comma-separated concurrency levels")
    duration_s: float = field(5.0, help="seconds per repeat of one level")
    repeats: int = field(3, help="repeats per level (median reported)")
    warmup_s: float = field(3.0, help="load (concurrency 4) sent to a fresh server before measuring")
    calibrate_s: float = field(1.0, help="seconds of load per level that size its repeats (also its warm-up)")
    max_batch_size: int = field(16, help="MAX_BATCH_SIZE of the server")
    max_wait_ms: float = field(5.0, help="MAX_WAIT_MS of the server (micro-batching on)")
    max_queue: int = field(256, help="MAX_QUEUE at nominal load (>= the highest concurrency: no 503 expected)")
    overload_concurrency: int = field(64, help="concurrency of the overload step")
    overload_max_queue: int = field(2, help="MAX_QUEUE of the overload step (tiny, so it overflows)")
    overload_s: float = field(6.0, help="seconds of the overload step")
    forward_repeats: int = field(30, help="timed raw forward passes at batch 1 (median reported)")
    modes: str = field("on,off", help="micro-batching modes to measure (comma-separated: on, off)")
    overload: bool = field(True, help="run the overload step")
    load_tool: str = field("auto", help="hey, python (built-in asyncio/httpx generator) or auto (hey if on PATH)",
                           choices=LOAD_TOOLS)
    startup_timeout_s: float = field(180.0, help="how long to wait for /ready")

    def __post_init__(self):
        if self.smoke:
            # One mode: each server start costs seconds; the overload step still runs.
            self.preset, self.concurrency, self.duration_s, self.repeats = "tiny", "1,4", 0.5, 1
            self.modes = "on"
            self.warmup_s, self.overload_concurrency, self.overload_s, self.forward_repeats = 0.3, 8, 0.5, 3
            self.calibrate_s = 0.0
        try:
            levels = [int(c) for c in self.concurrency.split(",")]
        except ValueError:
            raise ValueError(f"--concurrency must be comma-separated integers, got {self.concurrency!r}") from None
        if not set(self.modes.split(",")) <= {"on", "off"} or not self.modes:
            raise ValueError(f"--modes must be on, off or on,off; got {self.modes!r}")
        if not levels or min(levels) < 1:
            raise ValueError("--concurrency levels must be >= 1")
        if self.repeats < 1 or self.duration_s <= 0 or self.forward_repeats < 1:
            raise ValueError("--repeats, --duration-s and --forward-repeats must be positive")

    @property
    def levels(self) -> list[int]:
        return [int(c) for c in self.concurrency.split(",")]


# ---------------------------------------------------------------------------------------
# Inputs: the artifact and the request body
# ---------------------------------------------------------------------------------------


def build_artifact(out_dir: str, preset: str) -> Path:
    """A servable artifact around a random-init CLIP of ``preset`` (cached)."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from bench.benchlib import clip_checkpoint, work_dir
    from models.clip_regressor import CLIPRegressor, TargetTransform, save_artifact

    path = work_dir(out_dir) / f"artifact-{preset}"
    if (path / "config.json").is_file():
        return path
    clip_dir = clip_checkpoint(out_dir, preset)
    torch.manual_seed(0)
    model = CLIPRegressor(CLIPModel.from_pretrained(clip_dir))
    # A plausible likes scale (log1p mean/std of the demo set) so responses look real.
    target = TargetTransform(kind="log1p", mean=4.0, std=1.2)
    save_artifact(model, CLIPProcessor.from_pretrained(clip_dir), target, path,
                  extra_config={"run_name": f"bench-{preset}", "note": "random weights, for benchmarks only"})
    return path


def request_post(seed: int = 0) -> tuple[bytes, str]:
    """(640x480 JPEG bytes, raw caption): one typical post, drawn by the demo generator."""
    import io

    import numpy as np
    from PIL import ImageOps

    from data_preprocessing.make_demo_data import make_caption, render_image

    rng = np.random.default_rng(seed)
    im = ImageOps.fit(render_image(rng, "beach", 3, 0.6, 0.6), (640, 480))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    caption, _ = make_caption(rng, "beach")
    return buf.getvalue(), caption


def multipart_body(image: bytes, text: str) -> bytes:
    """The exact body ``curl -F image=@post.jpg -F text=...`` sends."""
    crlf = b"\r\n"
    return b"".join([
        f"--{BOUNDARY}".encode(), crlf,
        b'Content-Disposition: form-data; name="image"; filename="post.jpg"', crlf,
        b"Content-Type: image/jpeg", crlf, crlf, image, crlf,
        f"--{BOUNDARY}".encode(), crlf,
        b'Content-Disposition: form-data; name="text"', crlf, crlf, text.encode("utf-8"), crlf,
        f"--{BOUNDARY}--".encode(), crlf,
    ])


# ---------------------------------------------------------------------------------------
# The model alone
# ---------------------------------------------------------------------------------------


def measure_model(artifact: Path, image: bytes, caption: str, repeats: int) -> dict:
    """Raw forward at batch 1 (the overhead baseline), forward per post at batch 16, and
    the per-post preparation the server adds (decode, resize, clean, VADER, processor)."""
    import torch

    from data_preprocessing.prepare import clean_text, load_image, pre_resize, sentiment
    from models.clip_regressor import load_model

    def timed(fn, n: int, warmup: int = 5, warmup_s: float = 1.5) -> list[float]:
        # The first few passes at a new shape are 10-100x slower (kernel selection, JIT):
        # warm up for a number of calls *and* a minimum time.
        t_end = time.perf_counter() + warmup_s
        for i in range(10_000):
            if i >= warmup and time.perf_counter() >= t_end:
                break
            fn()
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out

    lm = load_model(artifact)

    def prepare():
        im = pre_resize(load_image(image), lm.resize_policy)
        return lm.batcher([im], [clean_text(caption)], [sentiment(caption)["compound"]])

    batch1 = prepare()
    batch16 = {k: torch.cat([v] * 16) for k, v in batch1.items()}
    with torch.inference_mode():
        fwd1 = timed(lambda: lm.model(**batch1), repeats)
        fwd16 = timed(lambda: lm.model(**batch16), max(3, repeats // 8), warmup=2)
    prep = timed(prepare, repeats)
    med = lambda xs: statistics.median(xs) * 1000  # noqa: E731 - seconds -> ms
    return {"forward_b1_ms": round(med(fwd1), 2), "forward_b1_ms_values": [round(x * 1000, 2) for x in fwd1],
            "forward_b16_per_post_ms": round(med(fwd16) / 16, 2), "prepare_ms": round(med(prep), 2),
            "torch_threads": torch.get_num_threads(), "text_tokens": int(batch1["input_ids"].shape[1])}


# ---------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``uvicorn serving.app:app`` on loopback in its own process group; a context manager."""

    def __init__(self, artifact: Path, env: dict, log_path: Path, startup_timeout_s: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "MODEL_DIR": str(artifact), **{k: str(v) for k, v in env.items()}}
        self.log_path = log_path
        self.timeout = startup_timeout_s

    def __enter__(self) -> "Server":
        import httpx

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "uvicorn", "serving.app:app", "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "warning", "--no-access-log"]
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < self.timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited during startup ({self.proc.returncode}); log:\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    self.startup_s = round(time.perf_counter() - t0, 2)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.__exit__(None, None, None)
        raise RuntimeError(f"server not ready after {self.timeout:.0f} s; log {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: only the server's processes
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


# ---------------------------------------------------------------------------------------
# Load generators: hey, or a fallback in Python
# ---------------------------------------------------------------------------------------
# Each run sends a fixed number of requests N (a multiple of the concurrency), sized from a
# one-second calibration so a repeat lasts about --duration-s. A fixed N is what makes
# transport errors countable: hey's per-request CSV lists only requests that got an HTTP
# answer, so errors = N - rows.


def run_hey(url: str, body_path: Path, concurrency: int, n: int) -> dict:
    """hey -n N -c C -o csv -> {lat_s, status, sent, wall_s} (one entry per answered request)."""
    cmd = ["hey", "-n", str(n), "-c", str(concurrency), "-m", "POST", "-t", "60", "-o", "csv",
           "-T", f"multipart/form-data; boundary={BOUNDARY}", "-D", str(body_path), url + "/predict"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"hey failed ({out.returncode}): {out.stderr[-2000:]}")
    lines = out.stdout.strip().splitlines()
    header = lines[0].split(",")
    i_lat, i_code, i_off = header.index("response-time"), header.index("status-code"), header.index("offset")
    lat, status, end = [], [], 0.0
    for line in lines[1:]:
        cols = line.split(",")
        lat.append(float(cols[i_lat]))
        status.append(int(cols[i_code]))
        end = max(end, float(cols[i_off]) + float(cols[i_lat]))  # hey's own clock: start offset + latency
    return {"lat_s": lat, "status": status, "sent": n, "wall_s": end}


async def _python_load(url: str, body: bytes, concurrency: int, n: int) -> dict:
    import httpx

    lat: list[float] = []
    status: list[int] = []
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def worker():
            for _ in range(n // concurrency):
                t0 = time.perf_counter()
                try:
                    r = await client.post(url + "/predict", content=body, headers=headers)
                except httpx.HTTPError:
                    continue  # counted as sent - answered
                lat.append(time.perf_counter() - t0)
                status.append(r.status_code)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"lat_s": lat, "status": status, "sent": n, "wall_s": wall}


def run_load(tool: str, url: str, body: bytes, body_path: Path, concurrency: int, n: int) -> dict:
    n = max(1, -(-n // concurrency)) * concurrency  # a whole number of requests per connection
    if tool == "hey":
        return run_hey(url, body_path, concurrency, n)
    return asyncio.run(_python_load(url, body, concurrency, n))


def percentile_ms(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of latencies in seconds, in ms."""
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, max(0, int(-(-q * len(v) // 100)) - 1))] * 1000, 2)


def level_summary(runs: list[dict]) -> dict:
    """One level: req/s (median over repeats) and latency percentiles over all its 200s."""
    rps = [sum(1 for c in r["status"] if c == 200) / r["wall_s"] for r in runs if r["wall_s"] > 0]
    ok = [t for r in runs for t, c in zip(r["lat_s"], r["status"]) if c == 200]
    status: dict[str, int] = {}
    for r in runs:
        for c in r["status"]:
            status[str(c)] = status.get(str(c), 0) + 1
    sent = sum(r["sent"] for r in runs)
    transport_errors = sent - sum(len(r["status"]) for r in runs)
    return {"rps": round(statistics.median(rps), 2) if rps else None,
            "rps_repeats": [round(x, 2) for x in rps],
            "p50_ms": percentile_ms(ok, 50), "p95_ms": percentile_ms(ok, 95), "p99_ms": percentile_ms(ok, 99),
            "requests": sent, "status": status, "transport_errors": transport_errors,
            "errors": transport_errors + sum(n for c, n in status.items() if c != "200")}


def calibrate(tool: str, url: str, body: bytes, body_path: Path, concurrency: int, duration_s: float,
              calibrate_s: float) -> int:
    """Requests N that last about ``duration_s`` at this concurrency, from a short run (also a warm-up)."""
    n_cal = max(concurrency, 8)  # one request per connection at high concurrency: slow levels stay short
    t0 = time.perf_counter()
    cal = run_load(tool, url, body, body_path, concurrency, n_cal)
    # Keep calibrating briefly if the first batch was too short to estimate a rate.
    while time.perf_counter() - t0 < calibrate_s:
        cal = run_load(tool, url, body, body_path, concurrency, n_cal)
    rate = len(cal["status"]) / max(cal["wall_s"], 1e-3)
    return max(concurrency, int(rate * duration_s))


def measure_levels(tool: str, servers: dict, body: bytes, body_path: Path, concurrency: int, duration_s: float,
                   repeats: int, calibrate_s: float) -> dict:
    """One concurrency level on every server, repeats interleaved across servers (A B A B ...)."""
    n = {m: calibrate(tool, srv.url, body, body_path, concurrency, duration_s, calibrate_s)
         for m, srv in servers.items()}
    runs: dict[str, list[dict]] = {m: [] for m in servers}
    for _ in range(repeats):
        for m, srv in servers.items():
            runs[m].append(run_load(tool, srv.url, body, body_path, concurrency, n[m]))
    return {m: {**level_summary(runs[m]), "requests_per_repeat": n[m]} for m in servers}


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    from bench.benchlib import goal, ratio, work_dir, write_result

    # 1. Parse args, pick the load tool.
    cfg = parse_config(ServeBenchConfig, argv)
    setup_logging()
    log.info("config: %s", config_dict(cfg))
    t_start = time.perf_counter()
    tool = cfg.load_tool
    if tool == "auto":
        tool = "hey" if shutil.which("hey") else "python"
    if tool == "hey" and not shutil.which("hey"):
        raise SystemExit("error: --load-tool hey but hey is not on PATH (apt-get install hey)")
    log.info("load tool: %s", tool)
    work = work_dir(cfg.out_dir) / "serving"
    work.mkdir(parents=True, exist_ok=True)

    # 2. Inputs: artifact, one post, its multipart body on disk for hey.
    artifact = build_artifact(cfg.out_dir, cfg.preset)
    image, caption = request_post()
    body = multipart_body(image, caption)
    body_path = work / "body.bin"
    body_path.write_bytes(body)

    # 3. The model alone, before any server runs (nothing else competes for the cores).
    model = measure_model(artifact, image, caption, cfg.forward_repeats)
    log.info("raw forward batch 1: %.1f ms; batch 16: %.1f ms/post; prepare: %.1f ms", model["forward_b1_ms"],
             model["forward_b16_per_post_ms"], model["prepare_ms"])

    # 4. One server per mode, all up at once (an idle one costs nothing), so every level runs
    #    on both modes back to back and machine drift hits both alike.
    modes: dict[str, dict] = {}
    wanted = [(m, b) for m, b in (("micro_batching_on", 1), ("micro_batching_off", 0))
              if m.rsplit("_", 1)[1] in cfg.modes.split(",")]
    with contextlib.ExitStack() as stack:
        servers = {}
        for mode, batching in wanted:
            env = {"MICRO_BATCHING": batching, "MAX_BATCH_SIZE": cfg.max_batch_size,
                   "MAX_WAIT_MS": cfg.max_wait_ms, "MAX_QUEUE": cfg.max_queue}
            servers[mode] = stack.enter_context(Server(artifact, env, work / f"server-{mode}.log",
                                                       cfg.startup_timeout_s))
            modes[mode] = {"env": env, "startup_s": servers[mode].startup_s, "levels": {}}
        measure_levels(tool, servers, body, body_path, 4, cfg.warmup_s, 1, 0.0)  # warm-up, discarded
        for c in cfg.levels:
            for mode, s in measure_levels(tool, servers, body, body_path, c, cfg.duration_s, cfg.repeats,
                                          cfg.calibrate_s).items():
                modes[mode]["levels"][str(c)] = s
                log.info("%s c=%d: %.1f req/s, p50 %s ms, p95 %s ms, p99 %s ms, status %s, errors %d", mode, c,
                         s["rps"] or 0, s["p50_ms"], s["p95_ms"], s["p99_ms"], s["status"], s["errors"])

    # 5. Overload: a queue far smaller than the concurrency; only 200 and 503 may come back.
    overload, over_bad, over_note = None, None, "not run"
    if cfg.overload:
        env = {"MICRO_BATCHING": 1, "MAX_BATCH_SIZE": cfg.max_batch_size, "MAX_WAIT_MS": cfg.max_wait_ms,
               "MAX_QUEUE": cfg.overload_max_queue}
        with Server(artifact, env, work / "server-overload.log", cfg.startup_timeout_s) as srv:
            over = measure_levels(tool, {"overload": srv}, body, body_path, cfg.overload_concurrency,
                                  cfg.overload_s, 1, cfg.calibrate_s)["overload"]
        over_bad = over["transport_errors"] + sum(n for c, n in over["status"].items() if c not in ("200", "503"))
        over_note = f"{over['status'].get('503', 0)} of {over['requests']} answered 503"
        overload = {"env": env, "concurrency": cfg.overload_concurrency, "duration_s": cfg.overload_s,
                    "requests": over["requests"], "status": over["status"],
                    "transport_errors": over["transport_errors"], "non_503_errors": over_bad,
                    "rps": over["rps"], "p50_ms": over["p50_ms"]}
        log.info("overload: status %s, transport errors %d", over["status"], over["transport_errors"])

    # 6. Ratios and goals (micro-batching on is the server's default).
    lo, hi = str(min(cfg.levels)), str(16 if 16 in cfg.levels else max(cfg.levels))
    empty = {lo: {"p50_ms": None, "rps": None}, hi: {"p50_ms": None, "rps": None}}
    on = modes.get("micro_batching_on", {}).get("levels", empty)
    off = modes.get("micro_batching_off", {}).get("levels", empty)
    overhead_on = ratio(on[lo]["p50_ms"], model["forward_b1_ms"])
    overhead_off = ratio(off[lo]["p50_ms"], model["forward_b1_ms"])
    scale_on = ratio(on[hi]["rps"], on[lo]["rps"])
    scale_off = ratio(off[hi]["rps"], off[lo]["rps"])
    nominal_errors = sum(lv["errors"] for m in modes.values() for lv in m["levels"].values())
    payload = {
        "load_tool": tool,
        "model": {"preset": cfg.preset, **model},
        "request": {"image": "640x480 JPEG", "image_bytes": len(image), "caption_chars": len(caption),
                    "body_bytes": len(body)},
        "modes": modes,
        "overload": overload,
        "ratios": {"levels": [int(lo), int(hi)],
                   "overhead_p50_lo_over_forward_b1": {"micro_batching_on": overhead_on,
                                                       "micro_batching_off": overhead_off},
                   "rps_hi_over_lo": {"micro_batching_on": scale_on, "micro_batching_off": scale_off},
                   "rps_hi_on_over_off": ratio(on[hi]["rps"], off[hi]["rps"]),
                   # What batching can give at most: forward time per post at batch 1 vs batch 16.
                   "model_forward_b1_over_b16_per_post": ratio(model["forward_b1_ms"],
                                                               model["forward_b16_per_post_ms"])},
        "goals": [
            goal(f"serving overhead: p50 at concurrency {lo} / raw forward at batch 1", overhead_on, "<=", 1.3,
                 "x", f"micro-batching off: {overhead_off}x"),
            goal(f"throughput at concurrency {hi} / at {lo} (micro-batching on)", scale_on, ">=", 2.0, "x",
                 f"micro-batching off: {scale_off}x"),
            goal("errors at nominal load (all levels, both modes)", nominal_errors, "==", 0, "requests"),
            goal("non-503 failures under overload", over_bad, "==", 0, "requests", over_note),
        ],
    }
    write_result(cfg.out_dir, "serving", payload, smoke=cfg.smoke, t_start=t_start, config=config_dict(cfg))
    return payload


if __name__ == "__main__":
    main()
