"""Benchmark 2: the cost of phase 1 (frozen CLIP) with the embedding cache and without it.

    python bench/phase1_bench.py            # tiny CLIP on the demo set, about 3 minutes
    python bench/phase1_bench.py --smoke    # seconds; checks the script runs

``train_torch.main`` with ``--frozen-epochs 5 --finetune-epochs 0`` on the tiny CLIP, with
the embedding cache (one embedding pass over every split, then the frozen epochs on it) and
with ``--no-embedding-cache`` (CLIP re-run every epoch on train and val), interleaved;
phase-1 seconds from each run's metrics.json. No target was set.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchlib import BenchConfig, clip_checkpoint, demo_records, ratio, repeat_interleaved, start, summarize, \
    table, work_dir, write_result
from common.config import field

log = logging.getLogger(__name__)


@dataclass
class Phase1BenchConfig(BenchConfig):
    """Benchmark phase 1 of train_torch.py: embedding cache vs recomputing CLIP every epoch."""

    posts: int = field(2000, help="demo posts (shared with the other training benchmarks)")
    frozen_epochs: int = field(5, help="phase-1 epochs per run")
    repeats: int = field(3, help="interleaved repeats of each mode (median reported)")

    def __post_init__(self):
        if self.smoke:
            self.posts, self.frozen_epochs, self.repeats = 48, 1, 1
        if min(self.posts, self.frozen_epochs, self.repeats) < 1:
            raise ValueError("--posts, --frozen-epochs and --repeats must be >= 1")


def phase1_seconds(run_dir: Path, cached: bool) -> float:
    """Phase-1 seconds of a finished run: its frozen epochs (each re-embeds train and val without
    the cache) plus, with the cache, the one embedding pass that built it."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    epochs = sum(h["seconds"] for h in metrics["history"] if h["phase"] == "frozen")
    return round(epochs + (metrics["timings"]["embedding_cache_build_seconds"] if cached else 0.0), 3)


def main(argv: list[str] | None = None) -> dict:
    from training import train_torch

    # 1. Parse args; the demo records and a tiny CLIP (cached).
    cfg, t_start = start(Phase1BenchConfig, argv)
    records = demo_records(cfg.out_dir, cfg.posts, workers=1 if cfg.smoke else 2)
    clip_dir = clip_checkpoint(cfg.out_dir, "tiny")
    run_dir = work_dir(cfg.out_dir) / "phase1-run"
    smoke_args = ["--batch-size", "16", "--num-workers", "0"] if cfg.smoke else []  # workers would dominate

    def run(cached: bool) -> float:
        shutil.rmtree(run_dir, ignore_errors=True)  # train_torch refuses to overwrite a run
        train_torch.main(["--data", str(records), "--out", str(run_dir), "--clip-model", str(clip_dir),
                          "--frozen-epochs", str(cfg.frozen_epochs), "--finetune-epochs", "0", *smoke_args,
                          *([] if cached else ["--no-embedding-cache"])])
        return phase1_seconds(run_dir, cached)

    # 2. Interleaved repeats, medians, and what the cache saves.
    values = repeat_interleaved({"cache": lambda: run(True), "no_cache": lambda: run(False)}, cfg.repeats)
    shutil.rmtree(run_dir, ignore_errors=True)  # keep the figures, not a model
    secs = {k: summarize(v, 3) for k, v in values.items()}
    saved = round(secs["no_cache"]["median"] - secs["cache"]["median"], 2)
    log.info("phase 1 (%d frozen epochs): cached %.1f s, recomputed %.1f s, saved %.1f s", cfg.frozen_epochs,
             secs["cache"]["median"], secs["no_cache"]["median"], saved)
    speedup = ratio(secs["no_cache"]["median"], secs["cache"]["median"], 2)
    rows = [[name, secs[k]["median"], secs[k]["values"]]
            for name, k in (("embedding cache", "cache"), ("recompute every epoch", "no_cache"))]
    payload = {"posts": cfg.posts, "frozen_epochs": cfg.frozen_epochs, "phase1_seconds": secs, "saved_seconds": saved,
               "goals": [], "tables": [table(["mode", "phase-1 seconds (median)", "repeats"], rows,
                                             f"{cfg.posts:,} posts, {cfg.frozen_epochs} frozen epochs. Recompute / "
                                             f"cached: **{speedup}x**; the cache saved {saved} s.")]}
    write_result("phase1", payload, cfg, t_start, __doc__)
    return payload


if __name__ == "__main__":
    main()
