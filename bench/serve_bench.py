"""Benchmark 4: POST /predict under load, with micro-batching on and off.

    python bench/serve_bench.py            # ViT-B/32-shaped model (random weights), about 4 minutes
    python bench/serve_bench.py --smoke    # tiny model, under a second per level

The server as users run it (``serving.launch.run_server``), driven by ``hey``, one
multipart POST /predict (a 640x480 JPEG and its caption) per request. First the model
alone: raw forward at batch 1 (the latency ceiling) and per post at batch 16 (what
batching can add at most). Then MICRO_BATCHING=1 and =0, both servers up, runs
alternating, at each concurrency; then overload (MAX_QUEUE=2). Goals: p50 at concurrency
1 / raw forward <= 1.3; req/s at 16 >= 2x at 1 (batching on); no errors at nominal load;
only 503 under overload. Writes ``OUT/serving.json``.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchlib import BenchConfig, clip_checkpoint, goal, photo_pool, ratio, start, work_dir, write_result
from common.config import field
from serving.launch import run_server

log = logging.getLogger(__name__)

BOUNDARY = "benchBoundary7MA4YWxkTrZu0gW"
QUIET = ("--log-level", "warning", "--no-access-log")  # an access log line per request would cost CPU
# Server settings at nominal load: a queue longer than the highest concurrency, so no 503 is expected.
SERVER_ENV = {"MAX_BATCH_SIZE": 16, "MAX_WAIT_MS": 5.0, "MAX_QUEUE": 256}


@dataclass
class ServeBenchConfig(BenchConfig):
    """Benchmark POST /predict under load (latency percentiles, req/s, overload behaviour)."""

    preset: str = field("b32", help="CLIP shape of the served model", choices=("tiny", "b32"))
    concurrency: str = field("1,4,16,64", help="comma-separated concurrency levels")
    duration_s: float = field(5.0, help="seconds per repeat of one level")
    repeats: int = field(3, help="repeats per level (median reported)")
    overload_concurrency: int = field(64, help="concurrency of the overload step (MAX_QUEUE=2)")
    forward_repeats: int = field(30, help="timed raw forward passes at batch 1 (median reported)")

    def __post_init__(self):
        if self.smoke:  # and micro-batching on only (see measure_servers)
            self.preset, self.concurrency, self.duration_s, self.repeats = "tiny", "1,4", 0.5, 1
            self.overload_concurrency, self.forward_repeats = 8, 3
        if min(self.levels) < 1 or self.repeats < 1 or self.duration_s <= 0 or self.forward_repeats < 1:
            raise ValueError("--concurrency levels, --repeats, --duration-s and --forward-repeats must be positive")

    @property
    def levels(self) -> list[int]:
        return [int(c) for c in self.concurrency.split(",")]


def build_artifact(out_dir: str, preset: str) -> Path:
    """A servable artifact around a random-init CLIP of ``preset`` (cached)."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from models.clip_regressor import CLIPRegressor, TargetTransform, save_artifact

    path = work_dir(out_dir) / f"artifact-{preset}"
    if not (path / "config.json").is_file():
        clip_dir = clip_checkpoint(out_dir, preset)
        torch.manual_seed(0)
        save_artifact(CLIPRegressor(CLIPModel.from_pretrained(clip_dir)), CLIPProcessor.from_pretrained(clip_dir),
                      TargetTransform(kind="log1p", mean=4.0, std=1.2), path,  # a plausible likes scale
                      extra_config={"run_name": f"bench-{preset}", "note": "random weights, for benchmarks only"})
    return path


def multipart_body(image: bytes, text: str) -> bytes:
    """The body ``curl -F image=@post.jpg -F text=...`` sends."""
    part = f"--{BOUNDARY}\r\nContent-Disposition: form-data; name="
    return b"".join([f'{part}"image"; filename="post.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'.encode(), image,
                     f'\r\n{part}"text"\r\n\r\n{text}\r\n--{BOUNDARY}--\r\n'.encode()])


def measure_model(artifact: Path, image: bytes, caption: str, repeats: int) -> dict:
    """Raw forward at batch 1 and per post at batch 16, and the per-post preparation the server adds."""
    import torch

    from data_preprocessing.posts import prepare_post
    from models.clip_regressor import load_model

    lm = load_model(artifact)
    features = dict.fromkeys(lm.prepare.features.names, "")  # every feature missing: always valid

    def prepare() -> dict:  # what the server does per post before the forward pass
        return lm.batcher([prepare_post(image, caption, features, lm.prepare)])

    def ms(fn, n: int, warmup_s: float = 1.5) -> list[float]:
        t_end = time.perf_counter() + warmup_s  # the first passes at a new shape are far slower
        while time.perf_counter() < t_end:
            fn()
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append(round((time.perf_counter() - t0) * 1000, 2))
        return out

    b1 = prepare()
    b16 = {k: torch.cat([v] * 16) for k, v in b1.items()}
    with torch.inference_mode():
        fwd1, fwd16 = ms(lambda: lm.model(**b1), repeats), ms(lambda: lm.model(**b16), max(3, repeats // 8))
    return {"forward_b1_ms": statistics.median(fwd1), "forward_b1_ms_values": fwd1,
            "forward_b16_per_post_ms": round(statistics.median(fwd16) / 16, 2),
            "prepare_ms": statistics.median(ms(prepare, repeats)), "torch_threads": torch.get_num_threads()}


def run_hey(url: str, body_path: Path, concurrency: int, n: int) -> dict:
    """``hey -n N -c C -o csv``: latency and status of every answered request. A fixed N makes
    transport errors countable: hey's CSV lists only requests that got an HTTP answer."""
    n = max(1, -(-n // concurrency)) * concurrency  # a whole number of requests per connection
    out = subprocess.run(["hey", "-n", str(n), "-c", str(concurrency), "-m", "POST", "-t", "60", "-o", "csv",
                          "-T", f"multipart/form-data; boundary={BOUNDARY}", "-D", str(body_path), url + "/predict"],
                         capture_output=True, text=True, timeout=600, check=True)
    rows = list(csv.DictReader(out.stdout.strip().splitlines()))
    lat = [float(r["response-time"]) for r in rows]
    # hey's own clock: the last request's start offset + its latency.
    wall = max((float(r["offset"]) + t for r, t in zip(rows, lat)), default=0.0)
    return {"lat_s": lat, "status": [int(r["status-code"]) for r in rows], "sent": n, "wall_s": wall}


def percentile_ms(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of latencies in seconds, in ms."""
    v = sorted(values)
    return round(v[min(len(v) - 1, max(0, int(-(-q * len(v) // 100)) - 1))] * 1000, 2) if v else None


def level_summary(runs: list[dict]) -> dict:
    """One level: req/s of 200s (median over repeats), latency percentiles over all its 200s."""
    rps = [r["status"].count(200) / r["wall_s"] for r in runs if r["wall_s"] > 0]
    ok = [t for r in runs for t, c in zip(r["lat_s"], r["status"]) if c == 200]
    status = {str(c): sum(r["status"].count(c) for r in runs) for c in sorted({c for r in runs for c in r["status"]})}
    sent = sum(r["sent"] for r in runs)
    transport = sent - sum(len(r["status"]) for r in runs)
    return {"rps": round(statistics.median(rps), 2) if rps else None, "rps_repeats": [round(x, 2) for x in rps],
            "p50_ms": percentile_ms(ok, 50), "p95_ms": percentile_ms(ok, 95), "p99_ms": percentile_ms(ok, 99),
            "requests": sent, "status": status, "transport_errors": transport,
            "errors": transport + sum(n for c, n in status.items() if c != "200")}


def measure_level(urls: dict[str, str], body_path: Path, c: int, duration_s: float, repeats: int) -> dict:
    """One concurrency level on every server: a short run sizes N (and warms up), then the
    repeats, interleaved across servers (A B A B ...)."""
    n = {}
    for m, url in urls.items():
        cal = run_hey(url, body_path, c, max(2 * c, 8))
        n[m] = max(c, int(len(cal["status"]) / max(cal["wall_s"], 1e-3) * duration_s))
    runs = {m: [] for m in urls}
    for _ in range(repeats):
        for m, url in urls.items():
            runs[m].append(run_hey(url, body_path, c, n[m]))
    return {m: level_summary(r) for m, r in runs.items()}


def measure_servers(cfg: ServeBenchConfig, artifact: Path, body_path: Path) -> tuple[dict, dict]:
    """Every level on a server per micro-batching mode, then the overload step on a server with
    MAX_QUEUE=2; all servers up at once (an idle one costs nothing)."""
    envs = {"micro_batching_on": {"MICRO_BATCHING": 1, **SERVER_ENV},
            "micro_batching_off": {"MICRO_BATCHING": 0, **SERVER_ENV},
            "overload": {"MICRO_BATCHING": 1, **SERVER_ENV, "MAX_QUEUE": 2}}
    if cfg.smoke:
        del envs["micro_batching_off"]  # a server start costs seconds
    modes = {m: {"env": env, "levels": {}} for m, env in envs.items() if m != "overload"}
    with contextlib.ExitStack() as stack:
        urls = {m: stack.enter_context(run_server(artifact, env=env, log_path=body_path.parent / f"{m}.log",
                                                  uvicorn_args=QUIET)) for m, env in envs.items()}
        overload_url = urls.pop("overload")
        for c in cfg.levels:
            for m, s in measure_level(urls, body_path, c, cfg.duration_s, cfg.repeats).items():
                modes[m]["levels"][str(c)] = s
                log.info("%s c=%d: %s req/s, p50 %s ms, status %s", m, c, s["rps"], s["p50_ms"], s["status"])
        s = measure_level({"o": overload_url}, body_path, cfg.overload_concurrency, cfg.duration_s, 1)["o"]
    bad = s["transport_errors"] + sum(n for c, n in s["status"].items() if c not in ("200", "503"))
    return modes, {"env": envs["overload"], "concurrency": cfg.overload_concurrency, "requests": s["requests"],
                   "status": s["status"], "transport_errors": s["transport_errors"], "non_503_failures": bad}


def off_note(x: float | None) -> str:
    return "" if x is None else f"micro-batching off: {x}x"


def goals(cfg: ServeBenchConfig, model: dict, modes: dict, overload: dict) -> tuple[dict, list[dict]]:
    """The ratios (levels 1 and 16, or the lowest and highest) and the four goals."""
    lo, hi = str(min(cfg.levels)), str(16 if 16 in cfg.levels else max(cfg.levels))
    lv = {m: modes.get(f"micro_batching_{m}", {}).get("levels") or {lo: {}, hi: {}} for m in ("on", "off")}
    over = {m: ratio(lv[m][lo].get("p50_ms"), model["forward_b1_ms"]) for m in lv}
    scale = {m: ratio(lv[m][hi].get("rps"), lv[m][lo].get("rps")) for m in lv}
    ratios = {"levels": [int(lo), int(hi)],
              "overhead_p50_lo_over_forward_b1": {f"micro_batching_{m}": v for m, v in over.items()},
              "rps_hi_over_lo": {f"micro_batching_{m}": v for m, v in scale.items()},
              "model_forward_b1_over_b16_per_post": ratio(model["forward_b1_ms"], model["forward_b16_per_post_ms"])}
    errors = sum(s["errors"] for d in modes.values() for s in d["levels"].values())
    return ratios, [
        goal(f"serving overhead: p50 at concurrency {lo} / raw forward at batch 1", over["on"], "<=", 1.3, "x",
             off_note(over["off"])),
        goal(f"throughput at concurrency {hi} / at {lo} (micro-batching on)", scale["on"], ">=", 2.0, "x",
             off_note(scale["off"])),
        goal("errors at nominal load (all levels, both modes)", errors, "==", 0, "requests"),
        goal("non-503 failures under overload", overload["non_503_failures"], "==", 0, "requests",
             f"{overload['status'].get('503', 0)} of {overload['requests']} answered 503")]


def main(argv: list[str] | None = None) -> dict:
    # 1. Parse args; the artifact and one post's multipart body on disk, for hey.
    cfg, t_start = start(ServeBenchConfig, argv)
    if not shutil.which("hey"):
        raise SystemExit("error: hey is not on PATH: apt-get install hey (make bench does)")
    artifact = build_artifact(cfg.out_dir, cfg.preset)
    pool = photo_pool(cfg.out_dir, 8)
    with open(pool / "posts.csv", newline="") as fh:
        post = next(p for p in csv.DictReader(fh) if p["description"].strip())  # a post with a caption
    image = (pool / post["image_path"]).read_bytes()
    body_path = work_dir(cfg.out_dir, "serving") / "body.bin"
    body_path.write_bytes(multipart_body(image, post["description"]))

    # 2. The model alone first, while nothing else competes for the cores; then the servers.
    model = measure_model(artifact, image, post["description"], cfg.forward_repeats)
    log.info("model alone: %s", {k: v for k, v in model.items() if k != "forward_b1_ms_values"})
    modes, overload = measure_servers(cfg, artifact, body_path)
    ratios, goal_rows = goals(cfg, model, modes, overload)
    payload = {"load_tool": "hey", "model": {"preset": cfg.preset, **model},
               "request": {"image": "640x480 JPEG", "image_bytes": len(image), "body_bytes": body_path.stat().st_size},
               "modes": modes, "overload": overload, "ratios": ratios, "goals": goal_rows}
    write_result("serving", payload, cfg, t_start)
    return payload


if __name__ == "__main__":
    main()
