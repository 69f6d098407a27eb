"""Benchmark 4: the server under load per runtime, the raw forward per thread, and the table scorer.

serving/predict.py at its defaults on tables of N and 2N rows (posts/s = N / (seconds at 2N - seconds at N)) against
the raw forward on those posts batched by predict's own ``TableRows`` and ``Batches`` (goal >= 0.9). The raw forward
(``LoadedModel.explain_batch``) at batch 1 and 16, each variant in a fresh process, in a round before each of the
servers' repeats at the lowest concurrency: a shared machine's speed can drift by tens of percent between minutes, so
each ratio of two of them is the median over rounds of the round's ratio (the overhead: a repeat's p50 to the round
just before it). Per RUNTIME on the main thread, and torch on a worker thread (libgomp gives each thread its own
OpenMP team; with more teams than CPUs each parallel region pays a futex wake). Torch's batch-16 FLOPs at the CPU's
measured fp32 matmul peak bound what any fp32 runtime can gain. The servers: ``serving.launch.run_server`` per RUNTIME
(torch, onnx, the opt-in int8, and auto, which picks per batch size and never int8) driven by ``hey`` (one multipart
POST /predict of a 640x480 JPEG per request), levels interleaved across servers up to MAX_QUEUE (so no 503); last,
overload.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchlib import BenchConfig, artifact, counted_flops, goal, matmul_tflops, photo_table, ratio, \
    repeat_interleaved, start, table, timed, work_dir, write_result
from common.config import field
from models import export_onnx
from serving.launch import run_server

log = logging.getLogger(__name__)

CONTENT_TYPE = "multipart/form-data; boundary=benchBoundary7MA4YWxkTrZu0gW"
QUIET = ("--log-level", "warning", "--no-access-log")  # an access log line per request would cost CPU
RUNTIMES = ("torch", "onnx", "int8", "auto")  # one server each; auto picks per batch size (models/runtime.py)
SERVER_ENV = {"MICRO_BATCHING": 1, "MAX_BATCH_SIZE": 16, "MAX_WAIT_MS": 5.0}
PROBES = {"main": ("torch", "main thread"), "worker": ("torch", "worker thread doing all torch work"),
          "onnx": ("onnx", "main thread"), "int8": ("int8", "main thread"),
          "auto": ("auto", "main thread")}  # name -> (RUNTIME, thread)


@dataclass
class ServeBenchConfig(BenchConfig):
    preset: str = field("b32", help="CLIP shape of the served model", choices=("tiny", "b32"))
    concurrency: str = field("1,4,16", help="comma-separated concurrency levels (MAX_QUEUE = the highest)")
    duration_s: float = field(5.0, help="seconds per repeat of one level")
    repeats: int = field(3, help="repeats per level (median reported)")
    overload_concurrency: int = field(64, help="concurrency of the overload step (above MAX_QUEUE: 503s)")
    forward_repeats: int = field(10, help="timed raw forward passes at batch 1 per probe and round (median)")
    warmup_s: float = field(1.5, help="seconds of untimed forward passes first, at each batch size")
    table_rows: str = field("tiny:256,b32:64", help="CLIP shape:N for predict.py, on tables of N and 2N rows")
    matmul_size: int = field(2048, help="side of the square fp32 matmul whose best GFLOP/s is this CPU's peak")

    def __post_init__(self):
        if self.smoke:
            self.preset, self.concurrency, self.duration_s, self.repeats = "tiny", "1,4", 0.5, 1
            self.overload_concurrency, self.forward_repeats, self.warmup_s, self.matmul_size = 16, 1, 0.0, 256
            self.table_rows = "tiny:16"
        self.levels = [int(c) for c in self.concurrency.split(",")]
        self.lo, self.hi = str(min(self.levels)), str(16 if 16 in self.levels else max(self.levels))  # goal levels
        self.tables = {p: int(n) for p, n in (x.split(":") for x in self.table_rows.split(","))}
        counts = (*self.levels, *self.tables.values(), self.repeats, self.forward_repeats)
        if min(*counts, self.matmul_size) < 1 or not set(self.tables) <= {"tiny", "b32"}:
            raise ValueError("--table-rows takes tiny/b32:N; every count and size must be positive")


def multipart_body(image: bytes, text: str) -> bytes:
    """The body ``curl -F image=@post.jpg -F text=...`` sends, as httpx encodes it (hey sends a file as is)."""
    return httpx.Request("POST", "http://bench/predict", headers={"Content-Type": CONTENT_TYPE}, data={"text": text},
                         files={"image": ("post.jpg", image, "image/jpeg")}).read()


def table_scorer(cfg: ServeBenchConfig, preset: str) -> dict:
    """serving/predict.py's posts/s on N more rows, against the raw forward on those posts."""
    import torch

    from models.artifact import load_model
    from serving import predict

    # 1. The artifact, the two tables (over the preprocess benchmark's pool), and predict at its defaults.
    model_dir, n = artifact(cfg.out_dir, preset), cfg.tables[preset]
    tables = {k: photo_table(cfg.out_dir, 8 if cfg.smoke else 200, k) for k in (n, 2 * n)}
    defaults = predict.PredictConfig(model=str(model_dir), input=str(tables[2 * n]), out="")
    args = ["--model", str(model_dir), "--out", str(work_dir(cfg.out_dir, "predict") / f"{preset}.csv"), "--show", "0",
            "--no-progress"]
    seconds = lambda rows: timed(lambda: predict.main([*args, "--input", str(tables[rows])]))  # noqa: E731

    # 2. The ceiling's batches: rows N..2N-1 of the big table, through predict's own Dataset and collate.
    lm = load_model(model_dir)
    table = predict.read_input(defaults, predict.table_columns(defaults))
    rows = predict.read_rows(defaults, table)[0][n:]
    ds, collate, bs = predict.TableRows(rows, lm.prepare, None), predict.Batches(lm.batcher), defaults.batch_size
    batches = [collate([ds[i] for i in range(j, min(j + bs, n))])[2] for j in range(0, n, bs)]

    def forward_pps() -> float:
        lm.explain_batch(batches[0])  # a first pass at a new shape is far slower
        return n / timed(lambda: [lm.explain_batch(b) for b in batches])

    pps = repeat_interleaved({"predict": lambda: n / max(seconds(2 * n) - seconds(n), 1e-9), "forward": forward_pps},
                             cfg.repeats, 2)
    return {"rows": n, "batch_size": bs, "num_workers": defaults.num_workers,
            "torch_threads": torch.get_num_threads(), "posts_per_s": pps,
            "goal": goal(f"table scorer, {preset} CLIP: predict.py posts/s / raw forward",
                         ratio(pps["predict"]["median"], pps["forward"]["median"]), ">=", 0.9, "x")}


def forward_probe(name: str, model_dir: str, image: bytes, caption: str, repeats: int, warmup_s: float,
                  matmul_size: int) -> dict:
    """Probe ``name`` (PROBES), in a fresh process: one post's preparation and the raw forward at
    batch 1 and 16, on its thread; then the process's OS threads."""
    import torch

    from data_preprocessing.posts import prepare_post
    from models.artifact import load_model

    def prepare(lm) -> dict:  # what the server does per post before the forward pass
        return lm.batcher([prepare_post(image, caption, dict.fromkeys(lm.prepare.features.names, ""), lm.prepare)])

    def ms(fn, n: int) -> list[float]:  # n timed calls after warmup_s of untimed ones (first passes are slow)
        t_end = time.perf_counter() + warmup_s
        while time.perf_counter() < t_end:
            fn()
        return [round(timed(fn) * 1000, 2) for _ in range(n)]

    def measure() -> dict:
        lm = load_model(model_dir, runtime=PROBES[name][0])
        b1 = prepare(lm)
        b16 = {k: torch.cat([v] * 16) for k, v in b1.items()}
        b1_ms, b16_ms = ms(lambda: lm.explain_batch(b1), repeats), ms(lambda: lm.explain_batch(b16), max(1, repeats // 3))
        out = {"b1_ms": round(statistics.median(b1_ms), 2), "b1_ms_values": b1_ms,
               "b16_per_post_ms": round(statistics.median(b16_ms) / 16, 2),
               "prepare_ms": round(statistics.median(ms(lambda: prepare(lm), repeats)), 2),
               "os_threads": len(os.listdir("/proc/self/task")), "torch_threads": torch.get_num_threads(),
               "runtime": lm.runtime.name}
        if name == "main":  # the fp32 ceiling of the batch-16 forward: its FLOPs at this CPU's matmul peak
            out.update(gflop_per_post=round(counted_flops(lambda: lm.explain_batch(b16)) / 16e9, 3),
                       text_tokens=int(b16["input_ids"].shape[1]),
                       fp32_matmul_gflops=round(matmul_tflops(matmul_size) * 1000, 1), matmul_size=matmul_size)
        return out

    if name != "worker":
        return measure()
    with ThreadPoolExecutor(1) as pool:  # one worker thread, like the server's inference executor
        return pool.submit(measure).result()


def probe_in_own_process(name: str, args: tuple) -> dict:
    """``forward_probe(name, *args)`` in a spawned process that has exited when this returns."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(forward_probe, name, *args).result()


def merge_rounds(rounds: list[dict]) -> dict:
    """One probe's rounds as one: the rounds' median timings (and each round's b1_ms), the best matmul peak."""
    med = lambda k: round(statistics.median(r[k] for r in rounds), 2)  # noqa: E731
    out = {**rounds[0], "b1_ms_values": [r["b1_ms"] for r in rounds],
           **{k: med(k) for k in ("b1_ms", "b16_per_post_ms", "prepare_ms")}}
    if "fp32_matmul_gflops" in out:
        out["fp32_matmul_gflops"] = max(r["fp32_matmul_gflops"] for r in rounds)
    return out


def paired_ratio(a: list, b: list) -> float | None:
    """Median over rounds r of a[r] / b[r] (None if a figure is missing): the two figures of a round were
    taken seconds apart, the rounds minutes apart on a machine whose speed drifts."""
    pairs = list(zip(a, b, strict=True))
    return None if not pairs or None in sum(pairs, ()) else round(statistics.median(x / y for x, y in pairs), 3)


def run_hey(url: str, body_path: Path, concurrency: int, n: int) -> dict:
    """``hey -n N -c C -o csv``: latency and status of every answered request. A fixed N makes
    transport errors countable: hey's CSV lists only requests that got an HTTP answer."""
    n = max(1, -(-n // concurrency)) * concurrency  # a whole number of requests per connection
    out = subprocess.run(["hey", "-n", str(n), "-c", str(concurrency), "-m", "POST", "-t", "60", "-o", "csv",
                          "-T", CONTENT_TYPE, "-D", str(body_path), url + "/predict"],
                         capture_output=True, text=True, timeout=600, check=True)
    rows = list(csv.DictReader(out.stdout.strip().splitlines()))
    lat = [float(r["response-time"]) for r in rows]
    # hey's own clock: the last request's start offset + its latency.
    wall = max((float(r["offset"]) + t for r, t in zip(rows, lat)), default=0.0)
    return {"lat_s": lat, "status": [int(r["status-code"]) for r in rows], "sent": n, "wall_s": wall}


def percentile_ms(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of latencies in seconds, in ms."""
    return round(float(np.percentile(values, q, method="inverted_cdf")) * 1000, 2) if values else None


def level_summary(runs: list[dict]) -> dict:
    """One level: req/s of 200s (median over repeats), latency percentiles over all its 200s, p50 per repeat."""
    rps = [r["status"].count(200) / r["wall_s"] for r in runs if r["wall_s"] > 0]
    ok_per_run = [[t for t, c in zip(r["lat_s"], r["status"]) if c == 200] for r in runs]
    ok = sum(ok_per_run, [])
    status = {str(c): sum(r["status"].count(c) for r in runs) for c in sorted({c for r in runs for c in r["status"]})}
    sent = sum(r["sent"] for r in runs)
    transport = sent - sum(len(r["status"]) for r in runs)
    return {"rps": round(statistics.median(rps), 2) if rps else None, "rps_repeats": [round(x, 2) for x in rps],
            "p50_ms": percentile_ms(ok, 50), "p95_ms": percentile_ms(ok, 95), "p99_ms": percentile_ms(ok, 99),
            "p50_ms_repeats": [percentile_ms(x, 50) for x in ok_per_run],
            "requests": sent, "status": status, "transport_errors": transport,
            "errors": transport + sum(n for c, n in status.items() if c != "200")}


def measure_level(urls: dict[str, str], body_path: Path, c: int, duration_s: float, repeats: int,
                  before_repeat=lambda: None) -> dict:
    """One concurrency level on every server: a short run sizes N (and warms up), then the
    repeats, interleaved across servers (A B A B ...), each after a call of ``before_repeat``."""
    n = {}
    for m, url in urls.items():
        cal = run_hey(url, body_path, c, max(2 * c, 8))
        n[m] = max(c, int(len(cal["status"]) / max(cal["wall_s"], 1e-3) * duration_s))
    runs = {m: [] for m in urls}
    for _ in range(repeats):
        before_repeat()
        for m, url in urls.items():
            runs[m].append(run_hey(url, body_path, c, n[m]))
    return {m: level_summary(r) for m, r in runs.items()}


def measure_servers(cfg: ServeBenchConfig, model_dir: Path, body_path: Path, probe_round) -> tuple:
    """Every level on a server per runtime (all up at once: an idle one costs nothing), then the
    overload step on the torch server; and which runtime each server says it runs (/metadata).
    A round of the forward probes (``probe_round``) precedes each repeat of the lowest level, so
    each overhead ratio divides figures from the same minutes: the machine's speed drifts."""
    env = {r: {**SERVER_ENV, "RUNTIME": r, "MAX_QUEUE": max(cfg.levels)} for r in RUNTIMES}
    servers = {r: {"env": env[r], "levels": {}} for r in RUNTIMES}
    with contextlib.ExitStack() as stack:
        urls = {r: stack.enter_context(run_server(model_dir, env=env[r], log_path=body_path.parent / f"{r}.log",
                                                  uvicorn_args=QUIET)) for r in RUNTIMES}
        for r, url in urls.items():
            with urllib.request.urlopen(url + "/metadata", timeout=10) as fh:  # runtime: RuntimeInfo dict or None
                servers[r]["reported_runtime"] = (json.load(fh)["model"]["runtime"] or {}).get("name")
        rounds = []
        for c in cfg.levels:
            probe = (lambda: rounds.append(probe_round())) if str(c) == cfg.lo else (lambda: None)
            for r, s in measure_level(urls, body_path, c, cfg.duration_s, cfg.repeats, probe).items():
                servers[r]["levels"][str(c)] = s
                log.info("%s c=%d: %s req/s, p50 %s ms, status %s", r, c, s["rps"], s["p50_ms"], s["status"])
        s = measure_level({"torch": urls["torch"]}, body_path, cfg.overload_concurrency, cfg.duration_s, 1)["torch"]
    bad = s["transport_errors"] + sum(n for c, n in s["status"].items() if c not in ("200", "503"))
    fwd = {k: merge_rounds([r[k] for r in rounds]) for k in PROBES}
    log.info("raw forward at batch 1 (ms): %s", {k: f["b1_ms"] for k, f in fwd.items()})
    return fwd, servers, {**s, "concurrency": cfg.overload_concurrency, "max_queue": max(cfg.levels),
                          "non_503_failures": bad}


def goals(cfg: ServeBenchConfig, fwd: dict, servers: dict, overload: dict) -> list[dict]:
    """Overhead per runtime, auto / torch throughput, the thread row, errors and overload."""
    lo, hi = cfg.lo, cfg.hi
    lv = lambda r, c, k: servers[r]["levels"][c][k]  # noqa: E731
    b1 = {PROBES[k][0]: f["b1_ms_values"] for k, f in fwd.items() if k != "worker"}  # runtime -> main thread
    errors = sum(s["errors"] for d in servers.values() for s in d["levels"].values())
    rps = {r: ratio(lv(r, hi, "rps"), lv("torch", hi, "rps")) for r in RUNTIMES}
    most = fp32_ceiling(fwd["main"])["most_gain"]
    return [
        *[goal(f"serving overhead, RUNTIME={r}: p50 at concurrency {lo} / its raw forward at batch 1 (median of the "
               "repeats' ratios, each to the round just before it)", paired_ratio(lv(r, lo, "p50_ms_repeats"), b1[r]),
               "<=", 1.3, "x") for r in RUNTIMES],
        goal(f"throughput at concurrency {hi}, RUNTIME=auto ({servers['auto']['reported_runtime']}) / torch",
             rps["auto"], ">=", 1.5, "x",
             f"onnx / torch: {rps['onnx']}x; the most an fp32 runtime can gain here: {most}x; the opt-in "
             f"int8, quantised (its accuracy cost: docs/serving.md) / torch: {rps['int8']}x"),
        goal("raw forward at batch 1, worker thread doing all torch work / main thread (median of the rounds' ratios)",
             paired_ratio(fwd["worker"]["b1_ms_values"], fwd["main"]["b1_ms_values"]), "<=", 1.1, "x"),
        goal("errors at nominal load (all levels, every runtime)", errors, "==", 0, "requests"),
        goal("non-503 failures under overload", overload["non_503_failures"], "==", 0, "requests",
             f"{overload['status'].get('503', 0)} of {overload['requests']} answered 503")]


def fp32_ceiling(main: dict) -> dict:
    """Torch's batch-16 forward against this CPU's fp32 matmul peak: GFLOP/s achieved, its share of the
    peak, and so the most any runtime that keeps fp32 arithmetic can gain over it per post."""
    achieved = round(main["gflop_per_post"] / main["b16_per_post_ms"] * 1000, 1)
    return {"achieved_gflops": achieved, "share": ratio(achieved, main["fp32_matmul_gflops"]),
            "most_gain": ratio(main["fp32_matmul_gflops"], achieved, 2)}


def tables(cfg: ServeBenchConfig, fwd: dict, servers: dict, overload: dict, scorer: dict) -> list[dict]:
    lo, hi, main = cfg.lo, cfg.hi, fwd["main"]
    model = [[f"{PROBES[k][0]} ({f['runtime']})", PROBES[k][1], f["b1_ms"], f["b16_per_post_ms"], f["prepare_ms"],
              paired_ratio(f["b1_ms_values"], main["b1_ms_values"]), f["os_threads"]] for k, f in fwd.items()]
    load = [[f"{r} ({d['reported_runtime'] or 'not reported'})", int(c),
             *(s[k] for k in ("rps", "p50_ms", "p95_ms", "p99_ms", "requests", "errors"))]
            for r, d in servers.items() for c, s in d["levels"].items()]
    gain = {r: ratio(d["levels"][hi]["rps"], d["levels"][lo]["rps"]) for r, d in servers.items()}
    scored = [[p, t["batch_size"], t["num_workers"], t["torch_threads"], f"{t['rows']} → {2 * t['rows']}",
               t["posts_per_s"]["predict"]["median"], t["posts_per_s"]["forward"]["median"], t["goal"]["measured"]]
              for p, t in scorer.items()]
    ceil = fp32_ceiling(main)
    return [table(["runtime", "thread", "forward at batch 1, ms", "per post at batch 16, ms", "prepare, ms",
                   "batch 1 / main thread (median of the rounds' ratios)", "OS threads"], model,
                  f"torch threads {main['torch_threads']}; medians of {cfg.repeats} rounds, each a fresh process per "
                  "probe; batch 1 per round (ms): "
                  + "; ".join(f"{k} {f['b1_ms_values']}" for k, f in fwd.items()) + "."),
            table(["torch's forward at batch 16 (fp32, main thread)", "value"], [
                [f"GFLOP per post (FlopCounterMode: matmuls and convolutions; {main['text_tokens']} text tokens)",
                 main["gflop_per_post"]], ["GFLOP/s achieved", ceil["achieved_gflops"]],
                [f"fp32 matmul peak, GFLOP/s ({main['matmul_size']}³, best of 5, same threads)",
                 main["fp32_matmul_gflops"]], ["torch / peak", ceil["share"]],
                ["most an fp32 runtime can gain per post: peak / torch", ceil["most_gain"]]],
                  "The bound lets every counted FLOP run at the big square matmul's rate, which the model's thinner "
                  "matmuls do not reach; past it only fewer bits per multiply (bf16 where the CPU has it natively, "
                  "int8) or fewer FLOPs can go."),
            table(["runtime (per /metadata)", "concurrency", "req/s", "p50 ms", "p95 ms", "p99 ms", "requests",
                   "errors"], load,
                  f"req/s at {hi} / at {lo}: {gain}; the model alone runs {ratio(main['b1_ms'], main['b16_per_post_ms'])}"
                  f"x faster per post at batch 16, the most micro-batching can add. Server env {servers['torch']['env']}."
                  f" p50 per repeat at concurrency {lo} (ms): "
                  + "; ".join(f"{r} {d['levels'][lo]['p50_ms_repeats']}" for r, d in servers.items()) + "."
                  f" Overload (concurrency {overload['concurrency']}, MAX_QUEUE={overload['max_queue']}): status codes "
                  f"{overload['status']}, transport errors {overload['transport_errors']}."),
            table(["CLIP", "batch", "workers", "torch threads", "rows", "predict.py posts/s", "raw forward posts/s",
                   "predict / forward"], scored, "serving/predict.py scoring a table: posts/s = N / (seconds at 2N - "
                                                 "seconds at N)")]


def main(argv: list[str] | None = None) -> dict:
    # 1. Parse args; the artifact, exported for RUNTIME=onnx.
    cfg, t_start = start(ServeBenchConfig, argv, __doc__)
    if not shutil.which("hey"):
        raise SystemExit("error: hey is not on PATH: apt-get install hey (make bench does)")
    model_dir = artifact(cfg.out_dir, cfg.preset)
    export_onnx.main([str(model_dir), "--quantize", "int8"])  # RUNTIME=onnx and int8 serve MODEL_DIR/onnx/

    # 2. The table scorer, before any server is up.
    scorer = {p: table_scorer(cfg, p) for p in cfg.tables}
    posts = photo_table(cfg.out_dir, 8, 8)
    with open(posts, newline="") as fh:
        post = next(p for p in csv.DictReader(fh) if p["description"].strip())
    image, text = (posts.parent / post["image_path"]).read_bytes(), post["description"]
    body_path = work_dir(cfg.out_dir, "serving") / "body.bin"
    body_path.write_bytes(multipart_body(image, text))
    # 3. The servers and, between their repeats at the lowest level, the model alone. Each probe in a
    # fresh spawned process, so no other thread has run torch there; gone before the servers' turn
    # (a Pool's replacement worker would import torch during the next server's repeat).
    args = (str(model_dir), image, text, cfg.forward_repeats, cfg.warmup_s, cfg.matmul_size)
    probe_round = lambda: {k: probe_in_own_process(k, args) for k in PROBES}  # noqa: E731
    fwd, servers, overload = measure_servers(cfg, model_dir, body_path, probe_round)
    payload = {"preset": cfg.preset, "forward": fwd, "servers": servers,
               "overload": overload, "table_scorer": scorer, "tables": tables(cfg, fwd, servers, overload, scorer),
               "goals": goals(cfg, fwd, servers, overload) + [t["goal"] for t in scorer.values()]}
    write_result("serving", payload, cfg, t_start, __doc__)
    return payload


if __name__ == "__main__":
    main()
