"""Benchmark 2: the cost of phase 1 (frozen CLIP) with and without the embedding cache.

    python bench/phase1_bench.py            # tiny CLIP on the demo set, about 2 minutes
    python bench/phase1_bench.py --smoke    # seconds; checks the script runs

Runs ``training/train_torch.py`` (in this process, through ``main([...])``) with
``--frozen-epochs 5 --finetune-epochs 0``, once with the embedding cache (the default) and
once with ``--no-embedding-cache`` (CLIP recomputed every epoch), interleaved, repeated.

The phase-1 cost is read from the run's own metrics.json:

* cached: ``timings.embedding_cache_build_seconds`` (train/val/test embedded once) plus
  the frozen epochs' ``history[].seconds`` (head steps on the cache, val on the cache);
* uncached: the frozen epochs' ``history[].seconds`` (each re-embeds train and val).

The uncached run also embeds once for its baselines; that pass is not phase-1 cost and is
left out. Writes ``bench/out/phase1.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import config_dict, field, parse_config, setup_logging

log = logging.getLogger(__name__)


@dataclass
class Phase1BenchConfig:
    """Benchmark phase 1 of train_torch.py: embedding cache vs recomputing CLIP every epoch."""

    out_dir: str = field(str(Path(__file__).resolve().parent / "out"), help="where phase1.json and work files go")
    smoke: bool = field(False, help="tiny data, 1 epoch, 1 repeat: checks the script runs, numbers mean nothing")
    posts: int = field(2000, help="demo posts (shared with the other training benchmarks)")
    frozen_epochs: int = field(5, help="phase-1 epochs per run")
    repeats: int = field(3, help="interleaved repeats of each mode (median reported)")
    batch_size: int = field(32, help="--batch-size of the runs")
    num_workers: int = field(-1, help="--num-workers of the runs; -1 = train_torch's default")
    seed: int = field(0, help="demo data seed")

    def __post_init__(self):
        if self.smoke:
            self.posts, self.frozen_epochs, self.repeats, self.batch_size = 48, 1, 1, 16
            self.num_workers = 0  # worker start-up would dominate a 48-post smoke run
        if min(self.posts, self.frozen_epochs, self.repeats, self.batch_size) < 1:
            raise ValueError("--posts, --frozen-epochs, --repeats and --batch-size must be >= 1")


def phase1_seconds(metrics: dict) -> dict:
    """Phase-1 cost of one run, from its metrics.json (see module docstring)."""
    epochs = [h["seconds"] for h in metrics["history"] if h["phase"] == "frozen"]
    t = metrics["timings"]
    build = t.get("embedding_cache_build_seconds") if t.get("embedding_cache_used") else 0.0
    return {"epochs_seconds": epochs, "cache_build_seconds": build,
            "phase1_seconds": round(sum(epochs) + (build or 0.0), 3), "total_seconds": t.get("total_seconds")}


def main(argv: list[str] | None = None) -> dict:
    from bench.benchlib import clip_checkpoint, demo_dataset, ratio, repeat_interleaved, summarize, \
        work_dir, write_result
    from training import train_torch

    # 1. Parse args; data and a tiny CLIP (cached).
    cfg = parse_config(Phase1BenchConfig, argv)
    setup_logging()
    log.info("config: %s", config_dict(cfg))
    t_start = time.perf_counter()
    data = demo_dataset(cfg.out_dir, cfg.posts, cfg.seed, workers=1 if cfg.smoke else 2)
    clip_dir = clip_checkpoint(cfg.out_dir, "tiny")
    runs_root = work_dir(cfg.out_dir) / "phase1-runs"
    runs: dict[str, list[dict]] = {"cache": [], "no_cache": []}

    # 2. One run per call; its run dir is fresh each time (train_torch refuses to overwrite).
    def run(mode: str):
        def once() -> float:
            out = runs_root / f"{mode}-{len(runs[mode])}"
            shutil.rmtree(out, ignore_errors=True)
            argv = ["--data", str(data.data_dir), "--out", str(out), "--clip-model", str(clip_dir),
                    "--frozen-epochs", str(cfg.frozen_epochs), "--finetune-epochs", "0",
                    "--batch-size", str(cfg.batch_size)]
            if cfg.num_workers >= 0:
                argv += ["--num-workers", str(cfg.num_workers)]
            if mode == "no_cache":
                argv.append("--no-embedding-cache")
            t0 = time.perf_counter()
            train_torch.main(argv)
            wall = time.perf_counter() - t0
            res = {**phase1_seconds(json.loads((out / "metrics.json").read_text())), "wall_seconds": round(wall, 3)}
            runs[mode].append(res)
            shutil.rmtree(out, ignore_errors=True)  # keep only the figures, not a model per run
            return res["phase1_seconds"]
        return once

    # 3. Interleaved repeats, medians, the ratio.
    values = repeat_interleaved({"cache": run("cache"), "no_cache": run("no_cache")}, cfg.repeats)
    secs = {k: summarize(v, 3) for k, v in values.items()}
    speedup = ratio(secs["no_cache"]["median"], secs["cache"]["median"], 2)
    log.info("phase 1 (%d frozen epochs): cached %.1f s, recomputed %.1f s: %.2fx", cfg.frozen_epochs,
             secs["cache"]["median"], secs["no_cache"]["median"], speedup or 0)
    payload = {
        "clip": "tiny (random init)", "posts": cfg.posts, "splits": data.data_meta["counts"]["splits"],
        "frozen_epochs": cfg.frozen_epochs,
        "phase1_seconds": secs, "speedup_cache": speedup, "runs": runs,
        "goals": [],  # the issue sets no target here: the ratio is reported as measured
    }
    write_result(cfg.out_dir, "phase1", payload, smoke=cfg.smoke, t_start=t_start, config=config_dict(cfg))
    return payload


if __name__ == "__main__":
    main()
