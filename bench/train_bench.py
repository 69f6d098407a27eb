"""Benchmark 1: the training data path against the compute ceiling, and phase 1's embedding cache.

samples/s of phase-2 train steps (``train_torch.start_phase``, ``train_one_epoch``) fed by train_torch's
``make_loader(EngagementDataset, Collator)`` at its default ``--num-workers`` (project), against the same batches
already in memory (ceiling; goal >= 0.9x), and the loader alone. Pixel bytes: a Collator batch (uint8) against its
float32 normalised tensor. Phase 1: ``train_torch.main --frozen-epochs 5 --finetune-epochs 0`` on the tiny CLIP with
the embedding cache and with ``--no-embedding-cache`` (CLIP re-run every epoch); seconds from metrics.json.
"""

from __future__ import annotations

import itertools
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchlib import BenchConfig, Phase2, clip_checkpoint, demo_records, goal, ratio, repeat_interleaved, start, \
    table, train_run, work_dir, write_result
from common.config import field


@dataclass
class TrainBenchConfig(BenchConfig):
    presets: str = field("tiny:32x40,b32:8x3", help="CLIP shape:batch size x timed steps, comma-separated (32 is "
                         "train_torch's default batch; 40 tiny steps of an epoch's 50: 15 varied 10%% run to run)")
    posts: int = field(2000, help="demo posts generated (the train split is ~80%% of them)")
    repeats: int = field(3, help="interleaved repeats per variant (median reported)")
    warmup_steps: int = field(2, help="untimed steps first (worker start-up, first allocations)")
    frozen_epochs: int = field(5, help="phase-1 epochs of each embedding-cache run (tiny CLIP)")

    def __post_init__(self):
        if self.smoke:
            self.presets, self.posts, self.repeats, self.warmup_steps, self.frozen_epochs = "tiny:4x2", 48, 1, 1, 1
        self.shapes = {p: tuple(map(int, s.split("x"))) for p, s in (x.split(":") for x in self.presets.split(","))}
        if not set(self.shapes) <= {"tiny", "b32"} or self.warmup_steps < 0 or \
                min(self.repeats, self.frozen_epochs, *sum(self.shapes.values(), ())) < 1:
            raise ValueError("--presets: tiny/b32:BATCHxSTEPS; --repeats, --frozen-epochs, batch sizes and steps "
                             "must be >= 1, --warmup-steps >= 0")


def pixel_bytes(p2: Phase2, batch: dict) -> dict:
    """A batch's pixel bytes: uint8 as the Collator makes them, float32 as the model normalises them (and as
    the loader carried them before)."""
    pv = batch["pixel_values"]
    normalised = p2.model.normalize_pixels(pv.to(p2.accelerator.device))
    return {"shape": list(pv.shape), "dtype": str(pv.dtype), "bytes": pv.nbytes, "float32_bytes": normalised.nbytes,
            "float32_over_batch": ratio(normalised.nbytes, pv.nbytes, 2)}


def bench_preset(cfg: TrainBenchConfig, records_dir: Path, preset: str) -> dict:
    from accelerate import Accelerator

    # 1. Phase 2 as train_torch builds it: one model, step and optimizer for every variant.
    bs, steps = cfg.shapes[preset]
    p2 = Phase2(clip_checkpoint(cfg.out_dir, preset), records_dir, Accelerator(cpu=True), bs)
    if len(p2.train) < (cfg.warmup_steps + steps) * bs:
        raise SystemExit(f"error: {len(p2.train)} train posts < {(cfg.warmup_steps + steps) * bs} needed; raise --posts")

    # 2. The ceiling: the project loader's first batches (epoch 0), collated in memory. Then interleaved
    #    repeats, a fresh loader each time (its workers stop when it goes).
    in_memory = list(itertools.islice(p2.loader(0), cfg.warmup_steps + steps))
    sps = repeat_interleaved(
        {"project": lambda: p2.samples_per_s(p2.loader(), steps, cfg.warmup_steps),
         "ceiling": lambda: p2.samples_per_s(in_memory, steps, cfg.warmup_steps),
         **{f"loader_w{w}": lambda w=w: p2.samples_per_s(p2.loader(w), steps, cfg.warmup_steps, train=False)
            for w in (1, 2)}}, cfg.repeats, 2)
    return {"preset": preset, "params": sum(p.numel() for p in p2.model.parameters()), "batch_size": bs,
            "steps": steps, "num_workers": p2.cfg.num_workers, "samples_per_s": sps,
            "pixels": pixel_bytes(p2, in_memory[0]),
            "goal": goal(f"train data path, {preset} CLIP: project loader / in-memory ceiling",
                         ratio(sps["project"]["median"], sps["ceiling"]["median"]), ">=", 0.9, "x")}


def phase1(cfg: TrainBenchConfig, records_dir: Path) -> dict:
    """Phase-1 seconds with the embedding cache and without: the frozen epochs (each re-embeds train and
    val without the cache) plus, with the cache, the one embedding pass that built it."""
    run_dir = work_dir(cfg.out_dir) / "phase1-run"

    def run(cached: bool) -> float:
        metrics = train_run(cfg.out_dir, records_dir, run_dir, "--frozen-epochs", str(cfg.frozen_epochs),
                            "--finetune-epochs", "0", *([] if cached else ["--no-embedding-cache"]), smoke=cfg.smoke)
        epochs = sum(h["seconds"] for h in metrics["history"] if h["phase"] == "frozen")
        return round(epochs + (metrics["timings"]["embedding_cache_build_seconds"] if cached else 0.0), 3)

    secs = repeat_interleaved({"cache": lambda: run(True), "no_cache": lambda: run(False)}, cfg.repeats, 3)
    shutil.rmtree(run_dir, ignore_errors=True)  # keep the figures, not a model
    saved = round(secs["no_cache"]["median"] - secs["cache"]["median"], 2)
    return {"posts": cfg.posts, "frozen_epochs": cfg.frozen_epochs, "seconds": secs, "saved_seconds": saved,
            "speedup": ratio(secs["no_cache"]["median"], secs["cache"]["median"], 2)}


def main(argv: list[str] | None = None) -> dict:
    import torch

    cfg, t_start = start(TrainBenchConfig, argv, __doc__)
    records_dir = demo_records(cfg.out_dir, cfg.posts, workers=1 if cfg.smoke else 2)
    presets = {p: bench_preset(cfg, records_dir, p) for p in cfg.shapes}
    p1 = phase1(cfg, records_dir)
    med = {p: {k: v["median"] for k, v in r["samples_per_s"].items()} for p, r in presets.items()}
    speed = [[f"{p} ({r['params'] / 1e6:.1f}M)", r["batch_size"], f"{r['steps']} × {cfg.repeats}", r["num_workers"],
              med[p]["project"], med[p]["ceiling"], r["goal"]["measured"], med[p]["loader_w1"], med[p]["loader_w2"]]
             for p, r in presets.items()]
    pixels = [[p, "x".join(map(str, r["pixels"]["shape"])), *(r["pixels"][k] for k in ("bytes", "float32_bytes",
               "float32_over_batch"))] for p, r in presets.items()]
    p1_rows = [[name, p1["seconds"][k]["median"], p1["seconds"][k]["values"]]
               for name, k in (("embedding cache", "cache"), ("recompute every epoch", "no_cache"))]
    payload = {"presets": presets, "phase1": p1, "goals": [r["goal"] for r in presets.values()], "tables": [
        table(["CLIP", "batch", "steps × repeats", "workers", "project", "ceiling", "project/ceiling",
               "loader alone, 1 worker", "loader alone, 2 workers"], speed, f"samples/s; torch threads "
              f"{torch.get_num_threads()}."),
        table(["CLIP", "pixels per batch", "bytes, uint8 (as loaded)", "bytes, float32 normalised", "float32 / uint8"],
              pixels),
        table(["phase 1, tiny CLIP", "phase-1 seconds (median)", "repeats"], p1_rows,
              f"{cfg.posts:,} posts, {cfg.frozen_epochs} frozen epochs. Recompute / cached: **{p1['speedup']}x**; "
              f"the cache saved {p1['saved_seconds']} s.")]}
    write_result("train_datapath", payload, cfg, t_start, __doc__)
    return payload


if __name__ == "__main__":
    main()
