"""GPU benchmark: ViT-B/32 bf16 training throughput and MFU through the project's own loop.

Its own demo posts, records and random ViT-B/32 (SDPA); phase 2 (``benchlib.Phase2``, bf16 via Accelerate) in whole
epochs after a warm-up one over the project's loader, over batches already on the GPU (ceiling), and the loader alone.
MFU from ``FlopCounterMode`` against 989 TFLOP/s (H100/H200 SXM dense bf16) and a measured matmul. Goals: >= 3000
samples/s on one H100; project >= 0.9x ceiling. Writes ``$OUT/gpu_train.json``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchlib import OUT_DIR, BenchConfig, Phase2, clip_checkpoint, counted_flops, demo_records, goal, \
    matmul_tflops, ratio, start, summarize, table, write_result
from common.config import field

log = logging.getLogger(__name__)

DATASHEET_BF16_TFLOPS = 989.0  # H100 SXM / H200 SXM, dense bf16 (no sparsity)


@dataclass
class GpuTrainConfig(BenchConfig):
    out_dir: str = field(default_factory=lambda: os.environ.get("OUT") or str(OUT_DIR),
                         help="where gpu_train.json goes (default: $OUT, else bench/out)")
    posts: int = field(8192, help="demo posts generated (~80%% become the train split)")
    data_workers: int = field(16, help="processes for make_posts and preprocess.py")
    preset: str = field("b32", help="CLIP shape (models/tiny_clip.py preset)", choices=("tiny", "b32"))
    batch_size: int = field(256, help="training batch size")
    num_workers: int = field(12, help="DataLoader workers (the CLIP processor runs in them)")
    timed_epochs: int = field(3, help="epochs timed after one warm-up epoch (median reported)")
    matmul_size: int = field(8192, help="side of the square bf16 matmul that measures the achievable peak")
    compile: bool = field(False, help="train_torch's --compile: the step under torch.compile (the warm-up epoch compiles)")

    def __post_init__(self):
        if self.smoke:
            self.posts, self.data_workers, self.preset, self.batch_size = 48, 2, "tiny", 8
            self.num_workers, self.timed_epochs = 1, 1
        if min(self.posts, self.data_workers, self.batch_size, self.timed_epochs) < 1:
            raise ValueError("sizes and counts must be >= 1")


def train_flops_per_sample(p2, batch: dict) -> float:
    """Training FLOPs (forward + backward, no optimizer step) of one batch, per sample."""
    import torch.nn.functional as F

    step = getattr(p2.step, "_orig_mod", p2.step)  # with --compile, count the eager step's FLOPs (the same math)
    flops = counted_flops(lambda: p2.accelerator.backward(F.mse_loss(step(batch).float(), batch["target"])))
    p2.optimizer.zero_grad(set_to_none=True)
    return flops / len(batch["target"])


def measure(cfg: GpuTrainConfig, p2, loader) -> dict:
    """samples/s over whole epochs, after a warm-up one: the project (loader + step), the loader
    alone, and the step over batches already on the device (ceiling)."""
    def epoch(e: int, train: bool) -> float:
        loader.set_epoch(e)
        return p2.samples_per_s(loader, len(loader), train=train)

    p2.run(loader, "warm-up")  # workers start, kernels pick their algorithms
    sps = {"project": [epoch(e, True) for e in range(1, cfg.timed_epochs + 1)],
           "loader_only": [epoch(100 + e, False) for e in range(cfg.timed_epochs)]}
    loader.set_epoch(200)
    held = [{k: v.clone() for k, v in b.items()} for b, _ in zip(loader, range(8))]
    full = [b for b in held if len(b["target"]) == cfg.batch_size] or held
    p2.run(itertools.islice(itertools.cycle(full), len(loader)), "warm-up")
    sps["ceiling"] = [p2.samples_per_s(itertools.cycle(full), len(loader)) for _ in range(cfg.timed_epochs)]
    log.info("samples/s: %s", {k: [round(x) for x in v] for k, v in sps.items()})
    return {"samples_per_s": {k: summarize(v, 1) for k, v in sps.items()}, "batch": full[0]}


def figures(cfg: GpuTrainConfig, p2, sps: dict, batch: dict, data: dict) -> dict:
    """FLOPs per sample, the matmul peak, MFU, ratios, goals, and the BENCHMARKS.md text and tables."""
    import torch

    cuda, med = torch.cuda.is_available(), {k: v["median"] for k, v in sps.items()}
    flops = train_flops_per_sample(p2, batch)  # a real batch: dynamic padding, as training pads
    peak = round(matmul_tflops(cfg.matmul_size, "cuda", torch.bfloat16, iters=20), 1) if cuda else None
    mfu = {f"{k}_vs_{name}": round(med[k] * flops / (t * 1e12), 4) if t else None for k in ("project", "ceiling")
           for name, t in (("datasheet", DATASHEET_BF16_TFLOPS if cuda else None), ("measured_matmul", peak))}
    device, tokens = torch.cuda.get_device_name(0) if cuda else "cpu", int(batch["input_ids"].shape[1])
    pct = lambda x: "–" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    about = (f"{device}, CUDA {torch.version.cuda}, {p2.accelerator.mixed_precision} autocast via Accelerate, SDPA "
             f"attention, {'a torch.compile' if cfg.compile else 'an eager'} step, batch {cfg.batch_size}, "
             f"{cfg.num_workers} loader workers, {data['train_posts']:,} train posts ({data['batches_per_epoch']} "
             "batches/epoch); whole epochs through `train_torch.train_one_epoch`, timed after a warm-up epoch.")
    return {
        "device": device, "cuda": torch.version.cuda, "mixed_precision": p2.accelerator.mixed_precision,
        "samples_per_s": sps, "mfu": mfu,
        "ratios": {"project_over_ceiling": ratio(med["project"], med["ceiling"]),
                   "loader_only_over_ceiling": ratio(med["loader_only"], med["ceiling"])},
        "flops": {"gflop_per_sample": round(flops / 1e9, 2), "text_tokens": tokens},
        "peak_tflops": {"datasheet_bf16_dense": DATASHEET_BF16_TFLOPS, "measured_bf16_matmul": peak},
        "goals": [goal(f"GPU training throughput, ViT-B/32 bf16 ({device})", med["project"], ">=", 3000,
                       "samples/s", "goal set for one H100"),
                  goal("GPU train data path: project loader / on-device ceiling",
                       ratio(med["project"], med["ceiling"]), ">=", 0.9, "x")],
        "about": about, "tables": [
            table(["samples/s", "median", "repeats"], [[name, sps[k]["median"], sps[k]["values"]] for name, k in (
                ("project: DataLoader + step", "project"), ("ceiling: step on on-device batches", "ceiling"),
                ("loader alone (no training)", "loader_only"))]),
            table(["FLOPs and MFU", "value"], [
                [f"training GFLOP/sample (fwd+bwd, {tokens} text tokens)", round(flops / 1e9, 2)],
                ["measured bf16 matmul TFLOP/s", peak],
                *[[f"MFU of {k} vs {p.replace('_', ' ')} peak", pct(mfu[f"{k}_vs_{p}"])]
                  for k in ("project", "ceiling") for p in ("datasheet", "measured_matmul")]])]}


def main(argv: list[str] | None = None) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the loader forks; tokenizers must not
    import torch
    from accelerate import Accelerator

    # 1. Parse args; data first (its worker pools fork before CUDA is touched).
    cfg, t_start = start(GpuTrainConfig, argv, __doc__)
    cuda = torch.cuda.is_available()
    if not cuda and not cfg.smoke:
        raise SystemExit("error: no CUDA device; this benchmark is for a GPU machine (use --smoke on CPU)")
    with tempfile.TemporaryDirectory(prefix="gpu_train_") as work:
        records = demo_records(work, cfg.posts, workers=cfg.data_workers)
        t_data = time.perf_counter() - t_start

        # 2. Model, step and the project's loader, as train_torch builds them.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        accelerator = Accelerator(mixed_precision="bf16" if cuda else "no")
        p2 = Phase2(clip_checkpoint(work, cfg.preset), records, accelerator, cfg.batch_size, compile=cfg.compile)
        loader = accelerator.prepare(p2.loader(cfg.num_workers, pin_memory=cuda))

        # 3. Measure; figures; the JSON, and a table last on stdout.
        m = measure(cfg, p2, loader)
        data = {"posts": cfg.posts, "train_posts": len(p2.train), "seconds_to_ready": round(t_data, 1),
                "batches_per_epoch": len(loader)}
        payload = {**figures(cfg, p2, m["samples_per_s"], m["batch"], data), "data": data, "model": {
            "preset": cfg.preset, "params": sum(p.numel() for p in p2.model.parameters()),
            "batch_size": cfg.batch_size, "num_workers": cfg.num_workers}}
    write_result("gpu_train", payload, cfg, t_start, __doc__)
    print(json.dumps({"device": payload["device"], **{k: v["median"] for k, v in payload["samples_per_s"].items()},
                      **payload["ratios"], **payload["mfu"]}, indent=1))  # the headline figures, last on stdout
    return payload


if __name__ == "__main__":
    main()
