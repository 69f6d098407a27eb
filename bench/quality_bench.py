"""Benchmark 5: prediction quality on the demo set, against its known ceiling and baselines.

    python bench/quality_bench.py                          # runs the default pipeline (~4 min)
    python bench/quality_bench.py --run-dir runs/demo      # reuses a finished training run
    python bench/quality_bench.py --smoke                  # tiny data, 2 epochs

The demo generator knows the best R² any model can reach (``r2_ceiling_theoretical`` and
``r2_ceiling_empirical`` in its meta.json, log1p scale). Training's metrics.json holds the
test R² of the fine-tuned model, of the best frozen-phase model (``test_after_frozen``)
and of three baselines (train mean, sentiment-only line, ridge on frozen CLIP embeddings),
all on the same test split and scale. This script puts them side by side.

Without ``--run-dir`` it runs the default pipeline: demo posts (seed 0) -> preprocess ->
a tiny CLIP pretrained contrastively on a *separate* demo set (seed 1, so the test posts
stay unseen) -> ``train_torch.py`` with its defaults.

Writes ``bench/out/quality.json``; report.py draws the bar chart.
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

BASELINES = ("mean", "sentiment_linear", "frozen_clip_ridge")


@dataclass
class QualityBenchConfig:
    """Test R² of a training run against the demo generator's ceiling and the baselines."""

    out_dir: str = field(str(Path(__file__).resolve().parent / "out"), help="where quality.json and work files go")
    smoke: bool = field(False, help="tiny data and epochs: checks the script runs, numbers mean nothing")
    run_dir: str | None = field(None, help="a finished train_torch.py run (RUN_DIR/metrics.json) to report "
                                           "instead of training one")
    demo_meta: str | None = field(None, help="make_demo_data meta.json with the R² ceiling; default: found "
                                             "through the run's data dir")
    posts: int = field(2000, help="demo posts to train and test on (default pipeline)")
    pretrain_posts: int = field(1000, help="posts of the separate pretraining set (seed + 1); 0 = random-init CLIP")
    pretrain_minutes: float = field(1.5, help="contrastive pretraining budget of the tiny CLIP")
    seed: int = field(0, help="demo data seed")
    train_args: str = field("--clip-lr 1e-4", help="extra train_torch.py arguments (space-separated); the "
                                                   "default matches make demo's tiny-CLIP fine-tuning LR")

    def __post_init__(self):
        if self.smoke:
            self.posts, self.pretrain_posts, self.pretrain_minutes = 48, 0, 0.1
            self.train_args += " --frozen-epochs 1 --finetune-epochs 1 --batch-size 16 --num-workers 0"
        if self.run_dir is not None and not (Path(self.run_dir) / "metrics.json").is_file():
            raise ValueError(f"--run-dir: no metrics.json in {self.run_dir}")
        if self.posts < 20 or self.pretrain_posts < 0 or self.pretrain_minutes <= 0:
            raise ValueError("--posts must be >= 20, --pretrain-posts >= 0, --pretrain-minutes > 0")


def find_demo_meta(metrics: dict) -> Path | None:
    """metrics.json -> its data dir's meta.json -> the posts table's folder -> generator meta.json."""
    data_dir = Path(metrics.get("data", {}).get("dir", ""))
    try:
        source = json.loads((data_dir / "meta.json").read_text())["source"]["path"]
    except (OSError, KeyError, ValueError):
        return None
    meta = Path(source).parent / "meta.json"
    return meta if meta.is_file() else None


def default_pipeline(cfg: QualityBenchConfig) -> tuple[Path, dict]:
    """Demo data -> pretrained tiny CLIP (separate posts) -> train_torch defaults; returns the run dir."""
    from bench.benchlib import clip_checkpoint, demo_dataset, demo_posts, work_dir
    from models import tiny_clip
    from training import train_torch

    seconds = {}
    t0 = time.perf_counter()
    data = demo_dataset(cfg.out_dir, cfg.posts, cfg.seed, workers=1 if cfg.smoke else 2)
    seconds["data"] = round(time.perf_counter() - t0, 1)
    work = work_dir(cfg.out_dir)
    if cfg.pretrain_posts > 0:
        t0 = time.perf_counter()
        pre_dir, _ = demo_posts(work, cfg.pretrain_posts, cfg.seed + 1)
        clip_dir = work / f"clip-tiny-pretrained-n{cfg.pretrain_posts}-m{cfg.pretrain_minutes:g}"
        if not (clip_dir / "pretrain.json").is_file():
            tiny_clip.main(["--out", str(clip_dir), "--pretrain-on", str(pre_dir / "posts.csv"),
                            "--pretrain-minutes", str(cfg.pretrain_minutes), "--seed", str(cfg.seed)])
        seconds["pretrain"] = round(time.perf_counter() - t0, 1)
    else:
        clip_dir = clip_checkpoint(cfg.out_dir, "tiny")
    run_dir = work / "quality-run"
    shutil.rmtree(run_dir, ignore_errors=True)  # train_torch refuses a dir holding a checkpoint
    t0 = time.perf_counter()
    train_torch.main(["--data", str(data.data_dir), "--out", str(run_dir), "--clip-model", str(clip_dir),
                      *cfg.train_args.split()])
    seconds["train"] = round(time.perf_counter() - t0, 1)
    pipeline = {"posts": cfg.posts, "seed": cfg.seed, "clip": str(clip_dir.name),
                "pretrain_posts": cfg.pretrain_posts, "pretrain_minutes": cfg.pretrain_minutes,
                "train_args": cfg.train_args, "seconds": seconds}
    return run_dir, pipeline


def main(argv: list[str] | None = None) -> dict:
    from bench.benchlib import goal, ratio, write_result

    # 1. Parse args; a given run, or the default pipeline.
    cfg = parse_config(QualityBenchConfig, argv)
    setup_logging()
    log.info("config: %s", config_dict(cfg))
    t_start = time.perf_counter()
    if cfg.run_dir:
        run_dir, pipeline = Path(cfg.run_dir), None
    else:
        run_dir, pipeline = default_pipeline(cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())

    # 2. The ceiling, from the generator's meta.json.
    meta_path = Path(cfg.demo_meta) if cfg.demo_meta else find_demo_meta(metrics)
    demo = json.loads(meta_path.read_text()) if meta_path and meta_path.is_file() else {}
    if not demo:
        log.warning("no make_demo_data meta.json found: the ceiling is unknown (pass --demo-meta)")
    ceiling = {"theoretical": demo.get("r2_ceiling_theoretical"), "empirical": demo.get("r2_ceiling_empirical")}

    # 3. Side by side: R² and its share of the ceiling.
    r2 = {f"baseline_{b}": metrics["baselines"][b]["r2"] for b in BASELINES}
    r2["frozen_only"] = (metrics.get("test_after_frozen") or {}).get("r2")
    r2["fine_tuned"] = metrics["test"]["r2"]
    share = {k: ratio(v, ceiling["theoretical"]) for k, v in r2.items()}
    best_baseline = max(BASELINES, key=lambda b: metrics["baselines"][b]["r2"])
    margin = round(r2["fine_tuned"] - r2[f"baseline_{best_baseline}"], 4)
    gain = None if r2["frozen_only"] is None else round(r2["fine_tuned"] - r2["frozen_only"], 4)
    log.info("test R²: fine-tuned %.4f, frozen-only %s, best baseline %s %.4f, ceiling %s", r2["fine_tuned"],
             r2["frozen_only"], best_baseline, r2[f"baseline_{best_baseline}"], ceiling["theoretical"])
    payload = {
        "run_dir": str(run_dir), "source": "--run-dir" if cfg.run_dir else "default pipeline", "pipeline": pipeline,
        "demo_meta": str(meta_path) if meta_path else None, "scale": metrics.get("scale"),
        "test_posts": (metrics.get("data", {}).get("counts") or {}).get("splits", {}).get("test"),
        "ceiling_r2": ceiling, "r2": r2, "share_of_ceiling": share,
        "test": metrics["test"], "test_after_frozen": metrics.get("test_after_frozen"),
        "baselines": metrics["baselines"], "best": metrics.get("best"),
        "training_seconds": (metrics.get("timings") or {}).get("total_seconds"),
        "goals": [
            goal(f"fine-tuned test R² beats the best baseline ({best_baseline})", margin, ">", 0.0, "R² margin"),
            goal("fine-tuning beats the frozen-only model (test R²)", gain, ">", 0.0, "R² margin"),
        ],
    }
    write_result(cfg.out_dir, "quality", payload, smoke=cfg.smoke, t_start=t_start, config=config_dict(cfg))
    return payload


if __name__ == "__main__":
    main()
