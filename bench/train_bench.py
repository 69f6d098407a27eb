"""Benchmark 1: the training data path, against the compute ceiling and a naive loader.

    python bench/train_bench.py            # tiny and ViT-B/32-shaped CLIP, about 3 minutes
    python bench/train_bench.py --smoke    # tiny CLIP, 2 steps: checks the script runs

Three ways to feed the same train step (CLIP and head trainable, AdamW, MSE on the
standardised target, gradient clipping: what phase 2 of training/train_torch.py does per
batch), on the same batches in the same order:

* ``project``: ``EngagementDataset`` + ``Collator`` in train_torch's ``make_loader`` with
  its default ``--num-workers``: pre-resized records, one processor call per batch,
  dynamic padding;
* ``ceiling``: the step alone on those batches already collated in memory -- the most
  any loader can reach;
* ``naive``: the original style: ``CLIPProcessor`` called per sample on the FULL-SIZE
  JPEG inside ``__getitem__`` (padding to max_length), ``num_workers=0``.

samples/s is timed over ``--steps`` steps after ``--warmup-steps`` (worker start-up, first
allocations), median over interleaved repeats; the goal is project >= 0.9 x ceiling.
Runs with the ``tiny`` preset and a randomly initialised ViT-B/32-shaped CLIP (``b32``,
a few steps: about 0.2 s per image forward+backward per core).

Writes ``bench/out/train_datapath.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import config_dict, field, parse_config, setup_logging

log = logging.getLogger(__name__)

VARIANTS = ("project", "ceiling", "naive")


@dataclass
class TrainBenchConfig:
    """Benchmark the training data path: project loader vs in-memory ceiling vs naive loader."""

    out_dir: str = field(str(Path(__file__).resolve().parent / "out"), help="where train_datapath.json and work files go")
    smoke: bool = field(False, help="tiny CLIP, a couple of steps: checks the script runs, numbers mean nothing")
    presets: str = field("tiny,b32", help="CLIP shapes to run (comma-separated models/tiny_clip.py presets)")
    posts: int = field(2000, help="demo posts generated (the train split is ~80%% of them)")
    repeats: int = field(3, help="interleaved repeats per variant (median reported)")
    tiny_batch_size: int = field(32, help="batch size with the tiny CLIP (train_torch's default)")
    tiny_steps: int = field(15, help="timed steps with the tiny CLIP")
    b32_batch_size: int = field(8, help="batch size with the ViT-B/32-shaped CLIP (small: CPU)")
    b32_steps: int = field(3, help="timed steps with the ViT-B/32-shaped CLIP")
    warmup_steps: int = field(2, help="untimed steps first (worker start-up, first allocations)")
    num_workers: int = field(-1, help="project loader workers; -1 = train_torch's --num-workers default")
    seed: int = field(0, help="demo data seed; also the batch order")

    def __post_init__(self):
        if self.smoke:
            self.presets, self.posts, self.repeats = "tiny", 48, 1
            self.tiny_batch_size, self.tiny_steps, self.warmup_steps = 4, 2, 1
        if not set(self.presets.split(",")) <= {"tiny", "b32"}:
            raise ValueError(f"--presets must name tiny and/or b32, got {self.presets!r}")
        if min(self.repeats, self.tiny_steps, self.b32_steps, self.tiny_batch_size, self.b32_batch_size) < 1:
            raise ValueError("repeats, steps and batch sizes must be >= 1")
        if self.warmup_steps < 0:
            raise ValueError("--warmup-steps must be >= 0")


# ---------------------------------------------------------------------------------------
# The naive loader (the original style)
# ---------------------------------------------------------------------------------------


class NaiveDataset:
    """Per-sample processing of the full-size image, as the original script did.

    Reads the same train posts as the project's split (by the records' ``row``), opens the
    raw JPEG and runs ``CLIPProcessor`` on this one post, padded to max_length.
    """

    def __init__(self, posts_csv: Path, rows: list[int], labels: list[float], sentiments: list[float],
                 texts: list[str], processor, max_length: int, target):
        import pandas as pd

        df = pd.read_csv(posts_csv)
        self.paths = [str(posts_csv.parent / df["image_path"].iloc[r]) for r in rows]
        self.texts, self.labels, self.sentiments = texts, labels, sentiments
        self.processor, self.max_length, self.target = processor, max_length, target

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        import torch
        from PIL import Image

        image = Image.open(self.paths[i]).convert("RGB")  # full size: 320-1280 px a side
        enc = self.processor(text=[self.texts[i]], images=image, return_tensors="pt", padding="max_length",
                             truncation=True, max_length=self.max_length)
        label = torch.tensor(self.labels[i], dtype=torch.float64)
        return {"pixel_values": enc["pixel_values"][0], "input_ids": enc["input_ids"][0],
                "attention_mask": enc["attention_mask"][0],
                "sentiment": torch.tensor(self.sentiments[i], dtype=torch.float32),
                "target": self.target.standardise(self.target.to_model_scale(label)).float()}


# ---------------------------------------------------------------------------------------
# One train step, and timing a stream of batches through it
# ---------------------------------------------------------------------------------------


def train_step(model, optimizer, batch: dict) -> float:
    """Phase-2 step: forward, MSE on the standardised target, backward, clip, AdamW."""
    import torch
    import torch.nn.functional as F

    pred = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["sentiment"])  # (B,)
    loss = F.mse_loss(pred.float(), batch["target"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach())


def time_batches(model, optimizer, batches, warmup: int, steps: int, batch_size: int) -> float:
    """samples/s of ``steps`` steps over the iterable ``batches`` after ``warmup`` untimed ones.

    The clock runs across fetching and stepping, so a loader that cannot keep up shows.
    """
    it = iter(batches)
    for _ in range(warmup):
        train_step(model, optimizer, next(it))
    t0 = time.perf_counter()
    n = 0
    for _ in range(steps):
        batch = next(it)
        train_step(model, optimizer, batch)
        n += len(batch["target"])
    return n / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def bench_preset(cfg: TrainBenchConfig, data, preset: str, num_workers: int) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from transformers import CLIPModel, CLIPProcessor

    from bench.benchlib import clip_checkpoint, goal, ratio, repeat_interleaved, summarize
    from models.clip_regressor import CLIPRegressor, PostBatcher, TargetTransform
    from training.train_torch import Collator, EngagementDataset, EpochShuffle, make_loader

    bs = cfg.tiny_batch_size if preset == "tiny" else cfg.b32_batch_size
    steps = cfg.tiny_steps if preset == "tiny" else cfg.b32_steps
    need = (cfg.warmup_steps + steps) * bs

    # 1. Model, optimizer, processor: one of each, shared by every variant.
    clip_dir = clip_checkpoint(cfg.out_dir, preset)
    torch.manual_seed(cfg.seed)
    model = CLIPRegressor(CLIPModel.from_pretrained(clip_dir)).train()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batcher = PostBatcher.from_clip(processor, model.clip.config)
    train = EngagementDataset(data.data_dir, "train")
    if len(train) < need:
        raise SystemExit(f"error: {len(train)} train posts < {need} needed; raise --posts")
    target = TargetTransform.fit(train.labels())
    collate = Collator(batcher, target)

    # 2. The first `need` posts of the epoch order, for the ceiling and the naive loader.
    order = list(EpochShuffle(len(train), cfg.seed))[:need]  # make_loader's epoch-0 order
    in_memory = [collate([train[i] for i in order[b:b + bs]]) for b in range(0, need, bs)]
    records = [train[i] for i in order]
    naive_ds = NaiveDataset(data.posts_csv, [r["row"] for r in records], [r["label"] for r in records],
                            [r["sentiment"] for r in records], [r["text"] for r in records], processor,
                            batcher.max_length, target)

    def project() -> float:
        loader = make_loader(train, bs, collate, shuffle_seed=cfg.seed, num_workers=num_workers)
        try:
            return time_batches(model, optimizer, loader, cfg.warmup_steps, steps, bs)
        finally:
            del loader  # stops its persistent workers before the next variant runs

    def ceiling() -> float:
        return time_batches(model, optimizer, in_memory, cfg.warmup_steps, steps, bs)

    def naive() -> float:
        loader = DataLoader(naive_ds, batch_size=bs, shuffle=False, num_workers=0)
        return time_batches(model, optimizer, loader, cfg.warmup_steps, steps, bs)

    # 3. Interleaved repeats: P C N P C N ..., so machine noise hits all three alike.
    log.info("%s: batch %d, %d timed steps after %d warm-up, %d repeats, project loader workers %d", preset, bs,
             steps, cfg.warmup_steps, cfg.repeats, num_workers)
    values = repeat_interleaved({"project": project, "ceiling": ceiling, "naive": naive}, cfg.repeats)
    sps = {k: summarize(v, 2) for k, v in values.items()}
    med = {k: v["median"] for k, v in sps.items()}
    params = sum(p.numel() for p in model.parameters())
    return {
        "preset": preset, "params": params, "batch_size": bs, "steps": steps, "warmup_steps": cfg.warmup_steps,
        "num_workers": num_workers, "text_tokens_mean": round(
            sum(b["input_ids"].shape[1] for b in in_memory) / len(in_memory), 1),
        "samples_per_s": sps,
        "ratios": {"project_over_ceiling": ratio(med["project"], med["ceiling"]),
                   "naive_over_ceiling": ratio(med["naive"], med["ceiling"]),
                   "project_over_naive": ratio(med["project"], med["naive"])},
        "goal": goal(f"train data path, {preset} CLIP: project loader / in-memory ceiling",
                     ratio(med["project"], med["ceiling"]), ">=", 0.9, "x"),
    }


def main(argv: list[str] | None = None) -> dict:
    import torch

    from bench.benchlib import demo_dataset, write_result
    from training.train_torch import TrainConfig

    # 1. Parse args; the loader's worker count is train_torch's own default.
    cfg = parse_config(TrainBenchConfig, argv)
    setup_logging()
    log.info("config: %s", config_dict(cfg))
    t_start = time.perf_counter()
    num_workers = cfg.num_workers
    if num_workers < 0:
        num_workers = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "num_workers")

    # 2. Data (cached demo set), then each preset.
    data = demo_dataset(cfg.out_dir, cfg.posts, cfg.seed, workers=1 if cfg.smoke else 2)
    results = {p: bench_preset(cfg, data, p, num_workers) for p in cfg.presets.split(",")}
    for p, r in results.items():
        log.info("%s samples/s: project %s, ceiling %s, naive %s; project/ceiling %s", p,
                 *(r["samples_per_s"][v]["median"] for v in VARIANTS), r["ratios"]["project_over_ceiling"])
    payload = {"torch_threads": torch.get_num_threads(), "posts": cfg.posts, "presets": results,
               "goals": [r["goal"] for r in results.values()]}
    write_result(cfg.out_dir, "train_datapath", payload, smoke=cfg.smoke, t_start=t_start, config=config_dict(cfg))
    return payload


if __name__ == "__main__":
    main()
