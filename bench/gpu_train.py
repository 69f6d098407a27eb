"""GPU benchmark: ViT-B/32 bf16 training throughput and MFU through the project's own loop.

    OUT=/some/dir python bench/gpu_train.py       # on a CUDA machine; < 6 minutes in total
    python bench/gpu_train.py --smoke             # CPU, tiny CLIP: checks the script runs

Self-contained: needs only this repo and its installed requirements, no internet and no
model hub. In one process it

1. generates ``--posts`` synthetic posts (``make_posts``) and preprocesses them to 224 px
   records (``preprocess.py``), both with ``--data-workers`` processes, in a temp dir;
2. builds a randomly initialised ViT-B/32-shaped CLIP (``build_tiny_clip(preset="b32")``)
   and loads it with SDPA attention;
3. measures training samples/s of phase 2 (CLIP and head trainable, AdamW, bf16 autocast
   via Accelerate) exactly as ``training/train_torch.py`` runs it: ``start_phase`` and
   ``train_one_epoch`` over ``make_loader(EngagementDataset, Collator)`` prepared by
   Accelerate (``--num-workers`` workers, pinned memory, persistent workers). Whole epochs
   are timed after a warm-up epoch, so epoch boundaries are included;
4. measures the same ``train_one_epoch`` over batches already on the GPU (the compute
   ceiling) and the loader alone (no training), to tell which one limits;
5. counts training FLOPs per sample with ``torch.utils.flop_counter.FlopCounterMode`` on a
   real, dynamically padded batch (forward + backward), and again padded to the full
   text length; MFU = samples/s x FLOPs/sample against 989 TFLOP/s (H100/H200 SXM dense
   bf16 datasheet) and against a measured bf16 matmul peak.

Writes ``$OUT/gpu_train.json`` (``OUT`` from the environment, else bench/out/) and prints
a short table last. Goals: >= 3000 samples/s on one H100; project >= 0.9 x ceiling.
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import config_dict, field, parse_config, setup_logging

log = logging.getLogger(__name__)

DATASHEET_BF16_TFLOPS = 989.0  # H100 SXM / H200 SXM, dense bf16 (no sparsity)


def _default_out() -> str:
    return os.environ.get("OUT") or str(Path(__file__).resolve().parent / "out")


@dataclass
class GpuTrainConfig:
    """ViT-B/32 bf16 training samples/s and MFU on one GPU, through the project's training loop."""

    out_dir: str = field(default_factory=_default_out, help="where gpu_train.json goes (default: $OUT, else bench/out)")
    smoke: bool = field(False, help="CPU-sized run with the tiny CLIP: checks the script runs")
    posts: int = field(8192, help="synthetic posts generated (~80%% become the train split)")
    data_workers: int = field(16, help="processes for make_posts and preprocess.py")
    preset: str = field("b32", help="CLIP shape (models/tiny_clip.py preset)", choices=("tiny", "b32"))
    batch_size: int = field(256, help="training batch size")
    num_workers: int = field(12, help="DataLoader workers (the CLIP processor runs in them)")
    timed_epochs: int = field(3, help="epochs timed after one warm-up epoch (median reported)")
    ceiling_batches: int = field(8, help="distinct batches held on the GPU for the ceiling run")
    matmul_size: int = field(8192, help="side of the square bf16 matmul that measures the achievable peak")
    peak_tflops: float = field(DATASHEET_BF16_TFLOPS, help="datasheet dense bf16 TFLOP/s for MFU")
    compile: bool = field(False, help="torch.compile the vision tower (fixed shapes); off: SDPA eager is robust")
    diagnose: bool = field(False, help="also time loader variants (pinning, blocking vs non-blocking copies) to "
                                       "show what limits the project loader")
    work_dir: str | None = field(None, help="where data and the checkpoint go (default: a temp dir, removed)")
    seed: int = field(0, help="seed for data and model")

    def __post_init__(self):
        if self.smoke:
            self.posts, self.data_workers, self.preset, self.batch_size = 96, 2, "tiny", 8
            self.num_workers, self.timed_epochs, self.ceiling_batches, self.matmul_size = 1, 1, 2, 256
        if min(self.posts, self.data_workers, self.batch_size, self.timed_epochs, self.ceiling_batches) < 1:
            raise ValueError("sizes and counts must be >= 1")


# ---------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------


def make_data(work: Path, cfg: GpuTrainConfig) -> tuple[Path, dict]:
    """Synthetic posts -> 224 px records, with the time each stage took."""
    from data_preprocessing import preprocess
    from data_preprocessing.make_demo_data import make_posts

    t0 = time.perf_counter()
    make_posts(work / "posts", n=cfg.posts, seed=cfg.seed, workers=cfg.data_workers, progress=False)
    t1 = time.perf_counter()
    preprocess.main(["--input", str(work / "posts" / "posts.csv"), "--out", str(work / "records"),
                     "--workers", str(cfg.data_workers), "--resize-shortest-edge", "224", "--no-progress"])
    t2 = time.perf_counter()
    return work / "records", {"posts": cfg.posts, "make_posts_s": round(t1 - t0, 1),
                              "preprocess_s": round(t2 - t1, 1)}


def matmul_peak_tflops(device, n: int, iters: int = 20) -> float | None:
    """Achieved bf16 TFLOP/s of an n x n x n matmul (the realistic ceiling of this GPU)."""
    import torch

    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    return round(2 * n**3 * iters / seconds / 1e12, 1)


def count_flops(step, batch: dict, accelerator) -> float:
    """Training FLOPs (forward + backward) of one batch, per sample; no optimizer step."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        pred = step(batch)
        loss = F.mse_loss(pred.float(), batch["target"])
        accelerator.backward(loss)
    for p in step.parameters():
        p.grad = None
    return counter.get_total_flops() / len(batch["target"])


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


class TimedIter:
    """Wraps a loader; adds up the seconds spent blocked in ``next()`` (data not yet on the device)."""

    def __init__(self, loader):
        self.loader, self.wait_s, self.batches = loader, 0.0, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait_s += time.perf_counter() - t0
            self.batches += 1
            yield batch


class ToDevice:
    """A plain DataLoader whose batches are copied with ``non_blocking=True`` (no Accelerate)."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def set_epoch(self, epoch: int) -> None:
        self.loader.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


def diagnose_loaders(cfg, train, collate, accelerator, epoch_fn, n_train: int) -> dict:
    """Train and loader-alone samples/s, and time blocked on data, for loader variants."""
    import gc

    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from training.train_torch import make_loader

    cuda = accelerator.device.type == "cuda"
    nb = Accelerator(mixed_precision=accelerator.mixed_precision,
                     dataloader_config=DataLoaderConfiguration(non_blocking=True))
    variants = {
        "accelerate, pin_memory, blocking copy (as train_torch)": ("blocking", True),
        "accelerate, pin_memory, non_blocking copy": ("non_blocking", True),
        "accelerate, no pin_memory": ("blocking", False),
        "plain DataLoader, pin_memory, .to(non_blocking=True)": ("plain", True),
    }
    out = {}
    for name, (mode, pin) in variants.items():
        base = make_loader(train, cfg.batch_size, collate, shuffle_seed=cfg.seed, num_workers=cfg.num_workers,
                           pin_memory=pin and cuda)
        loader = {"blocking": accelerator.prepare, "non_blocking": nb.prepare}.get(
            mode, lambda dl: ToDevice(dl, accelerator.device))(base)
        epoch_fn(loader, 300)  # warm-up: workers start
        sps, waits = [], []
        for e in range(2):
            loader.set_epoch(301 + e)
            timed = TimedIter(loader)
            sps.append(epoch_fn(timed, None))
            waits.append(1000 * timed.wait_s / max(timed.batches, 1))
        loader.set_epoch(400)
        t0 = time.perf_counter()
        for b in loader:
            b["target"].sum().item()
        alone = n_train / (time.perf_counter() - t0)
        out[name] = {"train_samples_per_s": round(statistics.median(sps), 1),
                     "wait_ms_per_batch": round(statistics.median(waits), 1),
                     "loader_alone_samples_per_s": round(alone, 1)}
        log.info("diagnose %s: %s", name, out[name])
        del loader, base
        gc.collect()
    return out


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the loader forks; tokenizers must not
    import torch
    from accelerate import Accelerator
    from transformers import CLIPModel, CLIPProcessor

    from bench.benchlib import goal, ratio, summarize, write_result
    from models.clip_regressor import CLIPRegressor, PostBatcher, TargetTransform
    from models.tiny_clip import build_tiny_clip
    from training import train_torch
    from training.train_torch import Collator, EngagementDataset, NonFiniteGuard, TrainConfig, make_loader

    # 1. Parse args; data first (its worker pools fork before CUDA is touched).
    cfg = parse_config(GpuTrainConfig, argv)
    setup_logging()
    log.info("config: %s", config_dict(cfg))
    t_start = time.perf_counter()
    work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="gpu_train_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        data_dir, data_info = make_data(work, cfg)
        t_data = time.perf_counter()

        # 2. Model: random-init CLIP of the preset, SDPA attention, plus the head.
        clip_dir = build_tiny_clip(work / "clip", preset=cfg.preset, seed=cfg.seed)
        cuda = torch.cuda.is_available()
        if not cuda and not cfg.smoke:
            raise SystemExit("error: no CUDA device; this benchmark is for a GPU machine (use --smoke on CPU)")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        accelerator = Accelerator(mixed_precision="bf16" if cuda else "no")
        device = accelerator.device
        torch.manual_seed(cfg.seed)
        clip = CLIPModel.from_pretrained(clip_dir, attn_implementation="sdpa")
        processor = CLIPProcessor.from_pretrained(clip_dir)
        model = CLIPRegressor(clip).to(device)
        if cfg.compile:
            model.clip.vision_model = torch.compile(model.clip.vision_model)
        params = sum(p.numel() for p in model.parameters())

        # 3. The project's loader and phase-2 step, as train_torch builds them.
        train = EngagementDataset(data_dir, "train")
        target = TargetTransform.fit(train.labels())
        batcher = PostBatcher.from_clip(processor, model.clip.config)
        collate = Collator(batcher, target)
        tcfg = TrainConfig(data=str(data_dir), out=str(work / "run"), clip_model=str(clip_dir), frozen_epochs=0,
                           finetune_epochs=2 + cfg.timed_epochs * 2, batch_size=cfg.batch_size,
                           num_workers=cfg.num_workers)
        loader = accelerator.prepare(make_loader(train, cfg.batch_size, collate, shuffle_seed=cfg.seed,
                                                 num_workers=cfg.num_workers, pin_memory=cuda))
        step, optimizer, scheduler = train_torch.start_phase("finetune", model, accelerator, tcfg, len(loader))
        guard = NonFiniteGuard(tcfg.max_nonfinite_steps)
        n_train = len(train)
        log.info("%s CLIP, %s params; %d train posts, batch %d, %d batches/epoch, %d loader workers", cfg.preset,
                 f"{params:,}", n_train, cfg.batch_size, len(loader), cfg.num_workers)

        def epoch(batches, e: int) -> float:
            """One train_one_epoch call; returns samples/s (GPU work finished inside the clock)."""
            if e is not None and hasattr(batches, "set_epoch"):
                batches.set_epoch(e)
            n = sum(len(b["target"]) for b in batches) if isinstance(batches, list) else n_train
            sync(device)
            t0 = time.perf_counter()
            train_torch.train_one_epoch(step, batches, optimizer, scheduler, accelerator, guard,
                                        max_grad_norm=tcfg.max_grad_norm, desc=f"epoch {e}")
            sync(device)
            return n / (time.perf_counter() - t0)

        # 4. Project: a warm-up epoch (workers start, kernels pick algorithms), then timed epochs.
        epoch(loader, 0)
        project = [epoch(loader, e) for e in range(1, cfg.timed_epochs + 1)]
        log.info("project loader + step: %s samples/s", [round(x) for x in project])

        # 5. Loader alone: how fast batches arrive on the device with nothing else to do.
        loader_only = []
        for e in range(cfg.timed_epochs):
            loader.set_epoch(100 + e)
            sync(device)
            t0 = time.perf_counter()
            for b in loader:
                b["target"].sum().item()  # the batch is on the device
            loader_only.append(n_train / (time.perf_counter() - t0))
        log.info("loader alone: %s samples/s", [round(x) for x in loader_only])

        # 6. Ceiling: the same epoch function over batches already on the device, as many
        # steps as a real epoch; FLOPs counted on one of those real batches.
        loader.set_epoch(200)
        held = []
        for b in loader:
            held.append({k: v.clone() for k, v in b.items()})
            if len(held) == cfg.ceiling_batches:
                break
        full = [b for b in held if len(b["target"]) == cfg.batch_size] or held
        in_memory = [full[i % len(full)] for i in range(len(loader))]
        epoch(in_memory, 0)
        ceiling = [epoch(in_memory, e) for e in range(1, cfg.timed_epochs + 1)]
        log.info("ceiling (batches on device): %s samples/s", [round(x) for x in ceiling])

        flops_dyn = count_flops(step, full[0], accelerator)
        tokens_dyn = float(full[0]["input_ids"].shape[1])
        max_len = batcher.max_length
        small = {k: v[:8] for k, v in full[0].items()}
        pad = max_len - small["input_ids"].shape[1]
        eos = int(processor.tokenizer.pad_token_id or 0)
        small["input_ids"] = torch.nn.functional.pad(small["input_ids"], (0, pad), value=eos)
        small["attention_mask"] = torch.nn.functional.pad(small["attention_mask"], (0, pad), value=0)
        flops_full = count_flops(step, small, accelerator)
        peak = matmul_peak_tflops(device, cfg.matmul_size)
        diagnostics = diagnose_loaders(cfg, train, collate, accelerator, epoch, n_train) if cfg.diagnose else None

        # 7. Figures, goals, JSON; the table goes last on stdout.
        sps = {"project": summarize(project, 1), "ceiling": summarize(ceiling, 1),
               "loader_only": summarize(loader_only, 1)}
        med = {k: v["median"] for k, v in sps.items()}

        def mfu(samples_per_s, peak_tflops):
            return None if not peak_tflops else round(samples_per_s * flops_dyn / (peak_tflops * 1e12), 4)

        payload = {
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "cuda": torch.version.cuda, "mixed_precision": accelerator.mixed_precision,
            "data": {**data_info, "train_posts": n_train, "seconds_to_ready": round(t_data - t_start, 1)},
            "model": {"preset": cfg.preset, "params": params, "attn_implementation": "sdpa",
                      "compile": cfg.compile, "batch_size": cfg.batch_size, "num_workers": cfg.num_workers,
                      "batches_per_epoch": len(loader), "optimizer": "AdamW (train_torch.start_phase, finetune)"},
            "samples_per_s": sps,
            "ratios": {"project_over_ceiling": ratio(med["project"], med["ceiling"]),
                       "loader_only_over_ceiling": ratio(med["loader_only"], med["ceiling"])},
            "flops": {"gflop_per_sample": round(flops_dyn / 1e9, 2), "text_tokens": tokens_dyn,
                      "gflop_per_sample_full_text": round(flops_full / 1e9, 2), "full_text_tokens": max_len,
                      "counted_with": "torch.utils.flop_counter.FlopCounterMode, forward + backward"},
            "peak_tflops": {"datasheet_bf16_dense": cfg.peak_tflops, "measured_bf16_matmul": peak,
                            "matmul_size": cfg.matmul_size},
            "mfu": {"project_vs_datasheet": mfu(med["project"], cfg.peak_tflops if cuda else None),
                    "project_vs_measured_matmul": mfu(med["project"], peak),
                    "ceiling_vs_datasheet": mfu(med["ceiling"], cfg.peak_tflops if cuda else None),
                    "ceiling_vs_measured_matmul": mfu(med["ceiling"], peak)},
            "loader_diagnostics": diagnostics,
            "goals": [
                goal(f"GPU training throughput, ViT-B/32 bf16 ({torch.cuda.get_device_name(0) if cuda else 'cpu'})",
                     med["project"], ">=", 3000, "samples/s", "goal set for one H100"),
                goal("GPU train data path: project loader / on-device ceiling",
                     ratio(med["project"], med["ceiling"]), ">=", 0.9, "x"),
            ],
        }
        write_result(cfg.out_dir, "gpu_train", payload, smoke=cfg.smoke, t_start=t_start, config=config_dict(cfg))
    finally:
        if not cfg.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    rows = [("device", payload["device"]),
            ("samples/s project (loader + step)", med["project"]),
            ("samples/s ceiling (on-device batches)", med["ceiling"]),
            ("samples/s loader alone", med["loader_only"]),
            ("project / ceiling", payload["ratios"]["project_over_ceiling"]),
            (f"GFLOP/sample ({tokens_dyn:.0f} tokens | {max_len})",
             f"{payload['flops']['gflop_per_sample']} | {payload['flops']['gflop_per_sample_full_text']}"),
            ("measured bf16 matmul TFLOP/s", peak),
            ("MFU vs 989 | vs measured", f"{payload['mfu']['project_vs_datasheet']} | "
                                          f"{payload['mfu']['project_vs_measured_matmul']}"),
            ("total seconds", round(time.perf_counter() - t_start, 1))]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return payload


if __name__ == "__main__":
    main()
