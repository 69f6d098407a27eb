"""Fine-tune CLIP end to end to predict post engagement (image + caption + sentiment -> likes).

    python training/train_torch.py --data data/prep --out runs/demo --clip-model DIR_OR_HUB_NAME
    accelerate launch training/train_torch.py ...        # or: torchrun --nproc_per_node N ...

Two explicit phases (logged as a table at start, with "N of M parameters trainable" at
each boundary):

1. **frozen** (``--frozen-epochs``): CLIP frozen, only the MLP head trains at ``--head-lr``
   (constant). A frozen CLIP maps the same post to the same embedding every epoch (there
   is no augmentation), so its (img, txt) embeddings for train/val/test are computed
   ONCE (shard-wise across ranks, then gathered) and every frozen epoch runs the head on
   them through ``CLIPRegressor.head_forward``: exactly what the full forward computes.
   ``--no-embedding-cache`` recomputes them instead (for the equivalence test and benchmarks).
2. **finetune** (``--finetune-epochs``): CLIP unfrozen. AdamW with CLIP and head in their
   own parameter groups (``--clip-lr``, ``--finetune-head-lr``), no decay on biases and
   LayerNorm (any 0-/1-D tensor), linear warmup then cosine decay, gradient clipping.
   It starts from the best frozen-phase model.

The target is ``--target-transform`` (log1p) of the label, standardised with train-split
statistics; the head regresses that. Validation every epoch keeps the best model by
``--select-metric``; the best model is scored on test at the end, next to three baselines.

Reproducibility and resume: every epoch's randomness (shuffle order and dropout) is
reseeded from ``(--seed, epoch)``, so a resumed run, a cached and an uncached run see the
same batches and masks. A checkpoint (model, best model, optimizer, scheduler, history,
RNG states) is written after every epoch and kept after the run; ``--resume`` continues
from it and ends with the same epochs and results as an uninterrupted run.
``--stop-after-epochs N`` exits cleanly after N epochs in total (tests, time-boxing).

Several processes (``accelerate launch`` / ``torchrun``): Accelerate shards every loader,
so each rank sees its part of each epoch (the last batch is topped up with a few repeats,
which ``gather_for_metrics`` drops again for evaluation); only rank 0 writes files.

Outputs in ``--out``: config.json (at start), checkpoint/, metrics.json,
predictions_test.csv, learning_curves.png, pred_vs_actual.png and model/ (the artifact
that ``models.clip_regressor.load_model`` and the server load).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from common.config import bar_disabled, config_dict, field, git_commit, parse_config, setup_logging, write_json_atomic
from common.hub import PretrainedUnavailable, resolve_pretrained
from data_preprocessing.posts import PrepareConfig, Record
from data_preprocessing.records import RecordReader, check_cleaning_version, check_record_format, load_meta
from data_preprocessing.table import load_fingerprints, safe_csv_writer
from models.clip_regressor import (DEFAULT_CLIP, CLIPRegressor, HeadConfig, PostBatcher, TargetTransform,
                                   regression_metrics, save_artifact)
from models.explain import Calibration, Reference, coverage
from training.probe import parse_alphas
from training.state import (CHECKPOINT_DIR, Checkpoint, RunState, cpu_state, load_checkpoint, save_checkpoint,
                            set_rng_state)

log = logging.getLogger(__name__)

PHASES = ("frozen", "finetune")
BAR_EVERY = 25  # steps between progress-bar loss updates (each one is a host sync)
# Metric -> True if higher is better. All are on the validation split, model scale.
SELECT_METRICS = {"val_rmse": False, "val_mae": False, "val_r2": True, "val_pearson": True, "val_spearman": True}
# Flags that may differ between an interrupted run and its --resume (they change how,
# not what, it computes).
RESUME_MAY_DIFFER = ("resume", "stop_after_epochs", "num_workers", "torch_threads", "eval_batch_size", "report_to")


# ---------------------------------------------------------------------------------------
# Config: every default in one place
# ---------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Fine-tune CLIP end to end on preprocessed posts (frozen-head phase, then full fine-tuning)."""

    data: str = field(help="preprocess.py output dir: {train,val,test}.pkl/.idx and meta.json")
    out: str = field(help="run dir for config.json, checkpoint/, metrics.json, plots and model/")
    clip_model: str = field(DEFAULT_CLIP, help="CLIP to start from: hub name or local dir (from_pretrained)")
    # -- phases ---------------------------------------------------------------------------
    frozen_epochs: int = field(5, help="phase 1 epochs: CLIP frozen, head only, on cached embeddings")
    finetune_epochs: int = field(5, help="phase 2 epochs: CLIP and head trained end to end")
    head_lr: float = field(1e-3, help="phase 1 head learning rate (constant)")
    finetune_head_lr: float | None = field(
        None, help="phase 2 head learning rate; default head-lr/10: the head is already fit, and a "
                   "large head step on top of a moving backbone undoes phase 1")
    clip_lr: float = field(1e-5, help="phase 2 CLIP learning rate. 1e-5 suits a pretrained CLIP such as "
                                      "ViT-B/32 (higher overwrites its features); the offline tiny CLIP of "
                                      "the demo is far less trained: make demo passes 3e-5")
    warmup_frac: float = field(0.1, help="phase 2 linear warmup, as a fraction of its optimizer steps; cosine after")
    weight_decay: float = field(0.01, help="AdamW weight decay on matrices (never on biases/LayerNorm)")
    max_grad_norm: float = field(1.0, help="clip the global gradient norm to this (0 = off)")
    # -- batches --------------------------------------------------------------------------
    batch_size: int = field(32, help="training batch size per process")
    eval_batch_size: int = field(64, help="evaluation / embedding batch size per process")
    grad_accum: int = field(1, help="gradient accumulation steps (effective batch = batch size x this x processes)")
    num_workers: int | None = field(None, help="DataLoader worker processes (run the CLIP processor off the main "
                                    "process); default: on a GPU min(8, CPUs per process - 1), on the CPU the "
                                    "cores torch's threads leave free (none at the default --torch-threads)")
    torch_threads: int = field(0, help="torch intra-op threads (0 = torch's default)")
    # -- model and target -----------------------------------------------------------------
    head_hidden: int = field(256, help="hidden width of the MLP head")
    head_dropout: float = field(0.1, help="dropout in the MLP head")
    target_transform: str = field("log1p", help="label -> model scale before standardising",
                                  choices=("log1p", "none"))
    select_metric: str = field("val_rmse", help="validation metric that picks the best epoch",
                               choices=tuple(SELECT_METRICS))
    # -- run control ----------------------------------------------------------------------
    embedding_cache: bool = field(True, help="phase 1: embed with the frozen CLIP once and reuse it "
                                             "(--no-embedding-cache recomputes every epoch, for tests/benchmarks)")
    linear_probe_init: bool = field(True, help="phase 0: start the head's linear path at the closed-form ridge "
                                               "solution on the frozen embeddings (LP-FT); phase 1 refines it")
    wise_ft_alphas: str = field("0,0.25,0.5,0.75,1", help="after phase 2, keep the best on val of the weight "
                                "interpolations (1-a)*phase1 + a*phase2 for these a (WiSE-FT); 'none' = off, "
                                "keep the best epoch")
    interval_levels: str = field("0.8", help="prediction-interval levels, comma-separated: split conformal "
                                            "on the val residuals of the kept model (see README)")
    report_to: str = field("none", help="Accelerate tracker for per-epoch metrics, LRs and the phase boundary "
                                        "(tensorboard writes under OUT/train)", choices=("none", "tensorboard"))
    mixed_precision: str = field("auto", help="auto = bf16 on CUDA, none on CPU", choices=("auto", "no", "bf16"))
    compile: bool = field(False, help="torch.compile each phase's train step (inductor): pays off on a GPU "
                                      "over many steps; on CPU the compile time outweighs it for the demo "
                                      "(README, Training)")
    seed: int = field(0, help="seed for the head init, shuffling and dropout (CPU runs are reproducible)")
    resume: bool = field(False, help="continue an interrupted run from OUT/checkpoint")
    stop_after_epochs: int = field(0, help="exit cleanly once this many epochs (in total) are done; for tests "
                                           "and time-boxing, continue with --resume (0 = run to the end)")
    max_nonfinite_steps: int = field(10, help="abort after this many consecutive non-finite losses")

    def __post_init__(self):
        if self.frozen_epochs < 0 or self.finetune_epochs < 0 or self.frozen_epochs + self.finetune_epochs == 0:
            raise ValueError("--frozen-epochs and --finetune-epochs must be >= 0 and not both 0")
        for name in ("head_lr", "clip_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")
        if self.finetune_head_lr is None:
            self.finetune_head_lr = self.head_lr / 10
        if self.finetune_head_lr <= 0:
            raise ValueError("--finetune-head-lr must be > 0")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError("--warmup-frac must be in [0, 1)")
        if min(self.batch_size, self.eval_batch_size, self.grad_accum, self.max_nonfinite_steps) < 1:
            raise ValueError("batch sizes, --grad-accum and --max-nonfinite-steps must be >= 1")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or (self.num_workers or 0) < 0 or self.torch_threads < 0:
            raise ValueError("--weight-decay, --max-grad-norm, --num-workers, --torch-threads must be >= 0")
        if self.select_metric not in SELECT_METRICS:
            raise ValueError(f"--select-metric must be one of {tuple(SELECT_METRICS)}")
        self.alphas = parse_alphas(self.wise_ft_alphas)  # validated here; a derived, typed view
        self.levels = tuple(float(x) for x in self.interval_levels.split(",") if x.strip())
        if not all(0 < x < 1 for x in self.levels):
            raise ValueError(f"--interval-levels must lie in (0, 1), got {self.interval_levels!r}")

    @property
    def total_epochs(self) -> int:
        return self.frozen_epochs + self.finetune_epochs

    def phase_of(self, epoch: int) -> str:
        """Phase of 1-based global ``epoch``."""
        return "frozen" if epoch <= self.frozen_epochs else "finetune"


class DataRefused(ValueError):
    """The data directory cannot be trained on as is (the message says why and what to do)."""


class NonFiniteLoss(RuntimeError):
    """Too many consecutive non-finite losses: training has diverged."""


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


class EngagementDataset(Dataset):
    """One split of preprocessed posts; ``[i]`` is its ``posts.Record``, read from disk on access."""

    def __init__(self, data_dir: str | os.PathLike, split: str):
        self.split = split
        self.reader = RecordReader(Path(data_dir) / f"{split}.pkl")

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> Record:
        return self.reader[i]

    def labels(self) -> np.ndarray:
        """(N,) float64 labels of the whole split (reads every record once)."""
        from tqdm.auto import tqdm

        return np.array([r.label for r in tqdm(self.reader, total=len(self), desc=f"{self.split} labels",
                                                     leave=False, disable=bar_disabled())], dtype=np.float64)


class Collator:
    """Records -> model tensors via ``PostBatcher`` (one processor call per batch), plus targets.

    ``label`` is the raw label (float64, label units); ``target`` the standardised model
    scale (float32) the head regresses. Both only when ``target`` is given.
    """

    def __init__(self, batcher: PostBatcher, target: TargetTransform | None = None):
        self.batcher = batcher
        self.target = target

    def __call__(self, records: Sequence[Record]) -> dict[str, torch.Tensor]:
        batch = self.batcher(records)
        if self.target is not None:
            label = torch.tensor([float(r.label) for r in records], dtype=torch.float64)  # (B,)
            batch["label"] = label
            batch["target"] = self.target.standardise(self.target.to_model_scale(label)).float()  # (B,)
        return batch


class EpochShuffle(Sampler[int]):
    """A permutation of ``range(n)`` that is a pure function of ``(seed, epoch)``.

    Accelerate shards its batches across ranks, and every rank computes the same order
    without communicating. Call ``set_epoch`` (via the DataLoader) before each epoch.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class _Indices(Dataset):
    """``range(n)`` as a Dataset: the cached loaders batch indices into the embedding cache."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class CachedBatch:
    """Collate for the embedding cache: a list of indices -> the cached rows as a batch."""

    def __init__(self, cache: dict[str, torch.Tensor]):
        self.cache = cache

    def __call__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {k: v[idx] for k, v in self.cache.items()}


def make_loader(dataset: Dataset, batch_size: int, collate_fn: Callable, *, shuffle_seed: int | None,
                num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader with its own RNG, so creating an iterator never draws from the global one."""
    return DataLoader(
        dataset, batch_size=batch_size, collate_fn=collate_fn,
        sampler=EpochShuffle(len(dataset), shuffle_seed) if shuffle_seed is not None else None,
        num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(0),  # worker base seeds; the collate is deterministic
    )


def default_num_workers(cuda: bool, processes: int = 1) -> int:
    """``--num-workers`` when it is not given. On a GPU the CPUs are free to prepare batches: up to 8
    workers, one CPU per process kept for its loop. On the CPU the step's intra-op threads already
    use the cores, and a worker on one of them stalls them all at each parallel region (2 cores,
    tiny CLIP: 0.88 of the in-memory ceiling with 1 worker, 1.00 preparing in the main process;
    README, "Loader workers"), so workers get only the cores that torch's threads leave free."""
    cpus = len(os.sched_getaffinity(0)) // max(1, processes)
    if cuda:
        return max(1, min(8, cpus - 1))
    return max(0, min(8, cpus - torch.get_num_threads()))


def resolve_num_workers(cfg: "TrainConfig", accelerator) -> int:
    """``cfg.num_workers``, set to ``default_num_workers`` (and logged) when it was not given."""
    if cfg.num_workers is None:
        cfg.num_workers = default_num_workers(accelerator.device.type == "cuda", accelerator.num_processes)
        log.info("--num-workers not given: %d DataLoader workers on %s", cfg.num_workers, accelerator.device)
    return cfg.num_workers


def model_prepare_config(meta: dict, image_processor) -> PrepareConfig:
    """How serving must prepare a post for the model trained on this data.

    The feature schema (fitted on the train split) comes from the data; the resize policy
    is the processor's own, which gives the model the same tensors as the data's
    pre-resizing (check_data refused data resized below it).
    """
    from data_preprocessing.features import FeatureSchema
    from data_preprocessing.prepare import MAX_PIXELS, ResizePolicy

    data_prepare = meta.get("prepare") or {}  # absent in data written before feature columns
    return PrepareConfig(ResizePolicy.from_image_processor(image_processor),
                         int((meta.get("image_size_policy") or {}).get("max_pixels", MAX_PIXELS)),
                         FeatureSchema.from_dict(data_prepare.get("features")))


def check_data(data_dir: str | os.PathLike, image_processor) -> dict:
    """Refuse data the model would see differently from serving; return its meta.json."""
    from data_preprocessing.prepare import ResizePolicy

    try:
        meta = load_meta(data_dir)
        check_record_format(meta, data_dir)
        check_cleaning_version(meta, data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise DataRefused(str(e)) from None
    edge = (meta.get("image_size_policy") or {}).get("shortest_edge")
    need = ResizePolicy.from_image_processor(image_processor)
    if edge is None:
        raise DataRefused(f"{data_dir}/meta.json has no image_size_policy.shortest_edge; re-run preprocess.py")
    if 0 < int(edge) < need.shortest_edge:  # 0 = kept at full size: never smaller than the processor wants
        raise DataRefused(
            f"{data_dir} holds images pre-resized to a shortest edge of {edge}px, but the CLIP processor "
            f"resizes to {need.shortest_edge}px: every image would be upsampled (blurred) before the model "
            f"sees it. Re-run preprocess.py with --resize-shortest-edge {need.shortest_edge} (or 0).")
    if int(edge) > 0 and int(meta["image_size_policy"].get("resample", need.resample)) != need.resample:
        log.warning("data was pre-resized with resample=%s but the processor uses %s; inputs differ slightly "
                    "from serving's", meta["image_size_policy"].get("resample"), need.resample)
    return meta


# ---------------------------------------------------------------------------------------
# Model steps
# ---------------------------------------------------------------------------------------


def forward_batch(model: CLIPRegressor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) standardised scores for an image batch, or for a batch of cached embeddings."""
    if "img" in batch:  # phase-1 cache: the frozen CLIP already ran
        return model.head_forward(batch["img"], batch["txt"], batch["sentiment"], batch["features"])
    return model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["sentiment"],
                 batch["features"])


class TrainStep(nn.Module):
    """What Accelerate wraps (in DDP under several processes): batch -> (B,) scores.

    Only ``trains`` (what this phase trains) is a registered submodule, so DDP registers
    and all-reduces exactly those gradients; the whole model is reached through a plain
    attribute. Each phase gets a new TrainStep.
    """

    def __init__(self, model: CLIPRegressor, trains: nn.Module):
        super().__init__()
        self.trains = trains
        self.__dict__["model"] = model  # deliberately not a submodule (see docstring)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return forward_batch(self.model, batch)


def param_groups(module: nn.Module, name: str, lr: float, weight_decay: float) -> list[dict]:
    """Trainable params of ``module`` in a decay and a no-decay group (biases, norms: any <2-D)."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [g for g in ({"name": name, "params": decay, "lr": lr, "weight_decay": weight_decay},
                        {"name": f"{name}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
            if g["params"]]


def group_lrs(optimizer) -> dict[str, float]:
    """Current LR of each named parameter group's decay group: ``{"lr_head": .., "lr_clip": ..}``."""
    return {f"lr_{g['name']}": float(g["lr"]) for g in optimizer.param_groups if not g["name"].endswith("_no_decay")}


def start_phase(phase: str, model: CLIPRegressor, accelerator, cfg: TrainConfig, batches_per_epoch: int):
    """Freeze/unfreeze for ``phase`` and build its (prepared) TrainStep, optimizer and scheduler."""
    from transformers import get_constant_schedule, get_cosine_schedule_with_warmup

    # Drop the previous phase's wrappers: an old DDP wrapper would keep its gradient hooks.
    accelerator.free_memory()
    if phase == "frozen":
        model.freeze_clip()
        step = TrainStep(model, model.head)
        groups = param_groups(model.head, "head", cfg.head_lr, cfg.weight_decay)
    else:
        model.unfreeze_clip()
        step = TrainStep(model, model)
        groups = (param_groups(model.clip, "clip", cfg.clip_lr, cfg.weight_decay)
                  + param_groups(model.head, "head", cfg.finetune_head_lr, cfg.weight_decay))
    # The fused kernel: on CPU the default per-tensor AdamW takes ~0.27 s a step for the
    # tiny CLIP's 2.3M parameters, the fused one ~0.01 s.
    optimizer = torch.optim.AdamW(groups, fused=accelerator.device.type in ("cpu", "cuda"))
    if phase == "frozen":
        scheduler = get_constant_schedule(optimizer)
    else:
        # Accelerate steps the scheduler once per process per optimizer step, so count
        # steps as a single process would see them.
        total = cfg.finetune_epochs * math.ceil(batches_per_epoch / cfg.grad_accum) * accelerator.num_processes
        scheduler = get_cosine_schedule_with_warmup(optimizer, round(cfg.warmup_frac * total), total)
    step, optimizer, scheduler = accelerator.prepare(step, optimizer, scheduler)
    if cfg.compile:  # last, around any DDP wrapper, as Accelerate's dynamo plugin does (that plugin
        # lives in the process-wide AcceleratorState, so it cannot differ per run or phase)
        step = torch.compile(step)
    return step, optimizer, scheduler


# ---------------------------------------------------------------------------------------
# Loops
# ---------------------------------------------------------------------------------------


class NonFiniteGuard:
    """Skips every update whose loss is not finite; aborts after ``limit`` in a row (across epochs).

    The decision is made on the device, without the host waiting for it: each step's
    ``found_inf`` (1.0 = skip) goes to the fused AdamW kernel, which then leaves the weights
    and its moments untouched, as it does under GradScaler (``torch/optim/adam.py``). The
    host reads the counters only every ``check_every`` steps and at the end of each epoch,
    so the abort can come up to that many steps late; which updates are skipped, and the
    limit, are exactly those of a per-step check. (The LR schedule still advances on a
    skipped step.)
    """

    def __init__(self, limit: int, check_every: int = 50):
        self.limit, self.check_every = limit, check_every
        self.in_a_row = self.longest = self.skipped = None  # device scalars, made on first use
        self.reported = 0

    def observe(self, loss: torch.Tensor, accelerator) -> torch.Tensor:
        """``found_inf`` for this step: 1.0 when the loss is not finite on any rank (no host sync)."""
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if accelerator.num_processes > 1:  # every rank must skip the same updates
            bad = accelerator.gather(bad).max().reshape(1)
        if self.in_a_row is None:
            self.in_a_row, self.longest, self.skipped = (torch.zeros(1, device=bad.device) for _ in range(3))
        self.in_a_row = (self.in_a_row + bad) * bad  # resets to 0 on a finite loss
        self.longest = torch.maximum(self.longest, self.in_a_row)
        self.skipped += bad
        return bad

    def check(self, where: str) -> int:
        """Read the counters (a host sync): warn about new skips, raise past the limit. Returns skips so far."""
        if self.skipped is None:
            return 0
        skipped, longest = int(self.skipped.item()), int(self.longest.item())
        if skipped > self.reported:
            log.warning("non-finite loss at %s: %d update(s) skipped (abort at %d in a row)", where,
                        skipped - self.reported, self.limit)
            self.reported = skipped
        if longest >= self.limit:
            raise NonFiniteLoss(f"{longest} consecutive non-finite losses (by {where}): training diverged. "
                                "Lower the learning rates, or check the data for inf/NaN labels.")
        return skipped


def train_one_epoch(step: nn.Module, loader, optimizer, scheduler, accelerator, guard: NonFiniteGuard, *,
                    max_grad_norm: float, desc: str) -> dict:
    """One pass over ``loader``; returns mean train loss (standardised MSE) and skipped steps.

    Nothing here waits for the device per step: the loss sums stay on it, and the
    non-finite guard decides there (``NonFiniteGuard``).
    """
    from tqdm.auto import tqdm

    step.train()
    dev = accelerator.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    n_seen = torch.zeros((), dtype=torch.float64, device=dev)
    window_bad = torch.zeros((), device=dev)  # any non-finite loss in this accumulation window (0-d, as
    # the fused kernel's found_inf must be)
    skipped_before = guard.check(desc)
    bar = tqdm(loader, desc=desc, leave=False, disable=bar_disabled(accelerator.is_local_main_process))
    for i, batch in enumerate(bar):
        with accelerator.accumulate(step):
            pred = step(batch)  # (B,)
            loss = F.mse_loss(pred.float(), batch["target"])
            bad = guard.observe(loss, accelerator)
            window_bad = torch.maximum(window_bad, bad.reshape(()))
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if max_grad_norm > 0:
                    accelerator.clip_grad_norm_(step.parameters(), max_grad_norm)
                # No update ever contains part of a diverging window.
                getattr(optimizer, "optimizer", optimizer).found_inf = window_bad
                window_bad = torch.zeros((), device=dev)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        good = 1.0 - bad.double().squeeze()
        loss_sum += torch.nan_to_num(loss.detach().double(), nan=0.0, posinf=0.0, neginf=0.0) * good * len(pred)
        n_seen += good * len(pred)
        if (i + 1) % guard.check_every == 0:
            guard.check(f"{desc} batch {i}")
        if not bar.disable and i % BAR_EVERY == 0:  # .item() waits for the device, so only now and then
            bar.set_postfix(loss=f"{loss_sum.item() / max(n_seen.item(), 1):.4f}")
    skipped = guard.check(desc) - skipped_before
    totals = accelerator.reduce(torch.stack([loss_sum, n_seen]), "sum")
    return {"train_loss": float(totals[0] / totals[1]) if totals[1] > 0 else float("nan"),
            "nonfinite_steps": skipped}


@torch.no_grad()
def predict(model: CLIPRegressor, loader, accelerator, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """(N,) standardised predictions and (N,) labels of a whole split, in loader order.

    Each rank predicts its shard; ``gather_for_metrics`` concatenates them and drops the
    samples Accelerate repeated to even out the last batch.
    """
    from tqdm.auto import tqdm

    model.eval()
    preds, labels = [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=bar_disabled(accelerator.is_local_main_process)):
        with accelerator.autocast():
            s = forward_batch(model, batch)
        s, y = accelerator.gather_for_metrics((s.float(), batch["label"]))
        preds.append(s.cpu())
        labels.append(y.cpu())
    return torch.cat(preds).double().numpy(), torch.cat(labels).double().numpy()


def score(pred_std: np.ndarray, labels: np.ndarray, target: TargetTransform) -> dict:
    """Metrics of standardised predictions: model scale (``model``), label units (``label``)."""
    z_pred = target.unstandardise(torch.from_numpy(pred_std))  # model scale, e.g. log1p(likes)
    z_true = target.to_model_scale(torch.from_numpy(labels))
    y_pred = target.to_label_units(z_pred)
    label_metrics = regression_metrics(labels, y_pred.numpy())
    return {"model": regression_metrics(z_true.numpy(), z_pred.numpy()),
            "label": {k: label_metrics[k] for k in ("rmse", "mae")},
            "z_pred": z_pred.numpy(), "z_true": z_true.numpy(), "y_pred": y_pred.numpy()}


@torch.no_grad()
def embed_split(model: CLIPRegressor, loader, accelerator, desc: str) -> dict[str, torch.Tensor]:
    """The frozen CLIP's embeddings of one split, gathered across ranks (CPU tensors, loader order).

    Keys: ``img``/``txt`` (N, D) L2-normalised float32, ``sentiment``/``target`` (N,)
    float32, ``features`` (N, F) float32, ``label`` (N,) float64: exactly what a phase-1
    batch needs.
    """
    from tqdm.auto import tqdm

    model.eval()
    parts: dict[str, list] = {k: [] for k in ("img", "txt", "sentiment", "features", "target", "label")}
    for batch in tqdm(loader, desc=desc, leave=False, disable=bar_disabled(accelerator.is_local_main_process)):
        with accelerator.autocast():
            img, txt = model.embed(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        rows = accelerator.gather_for_metrics({"img": img.float(), "txt": txt.float(),
                                               "sentiment": batch["sentiment"], "features": batch["features"],
                                               "target": batch["target"], "label": batch["label"]})
        for k, v in rows.items():
            parts[k].append(v.cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def is_better(value: float, best: float | None, metric: str) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if SELECT_METRICS[metric] else value < best


# ---------------------------------------------------------------------------------------
# The phase-1 embedding cache
# ---------------------------------------------------------------------------------------


class EmbeddingCache:
    """The frozen CLIP's embeddings of every split, computed once (shard-wise, then gathered).

    A frozen CLIP maps a post to the same embedding every epoch (no augmentation), so the
    frozen phase, the baselines and the linear probe all run on these. ``loader(split)``
    is the one way in for the epoch loop: the same batch size and ``EpochShuffle`` as the
    image loader, so a cached epoch sees the same batches in the same order.
    """

    def __init__(self, model: CLIPRegressor, datasets: dict, collate: Collator, cfg: TrainConfig, accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.splits, seconds, self._loaders = {}, {}, {}
        for split, ds in datasets.items():
            t0 = time.perf_counter()
            loader = accelerator.prepare(make_loader(ds, cfg.eval_batch_size, collate, shuffle_seed=None,
                                                     num_workers=cfg.num_workers))
            self.splits[split] = embed_split(model, loader, accelerator, f"embed {split}")
            seconds[split] = round(time.perf_counter() - t0, 3)
        self.timings = {"build_seconds": round(sum(seconds.values()), 3), "seconds_per_split": seconds}
        log.info("embedding cache: %d posts embedded once in %.1f s (%s)",
                 sum(len(c["label"]) for c in self.splits.values()), self.timings["build_seconds"],
                 ", ".join(f"{s} {t:.1f} s" for s, t in seconds.items()))

    def loader(self, split: str):
        """The prepared loader over ``split``'s cached rows, built once and reused every epoch."""
        if split not in self._loaders:
            c = self.splits[split]
            bs = self.cfg.batch_size if split == "train" else self.cfg.eval_batch_size
            self._loaders[split] = self.accelerator.prepare(make_loader(
                _Indices(len(c["label"])), bs, CachedBatch(c), shuffle_seed=self.cfg.seed if split == "train" else None))
        return self._loaders[split]

    def head_inputs(self, split: str) -> torch.Tensor:
        """(N, 3D+1+F) what the head sees for every post of ``split``."""
        c = self.splits[split]
        return CLIPRegressor.head_input(c["img"], c["txt"], c["sentiment"], c["features"])

    def baselines(self, target: TargetTransform) -> dict:
        """The reference models (training/baselines.py) on the test split."""
        from training.baselines import baseline_metrics

        def arrays(c):
            return {"img": c["img"].numpy(), "txt": c["txt"].numpy(), "sentiment": c["sentiment"].double().numpy(),
                    "features": c["features"].double().numpy(), "z": target.to_model_scale(c["label"]).numpy()}

        out = baseline_metrics(arrays(self.splits["train"]), arrays(self.splits["test"]))
        for name, m in out.items():
            log.info("baseline %-17s test r2 %.4f rmse %.4f", name, m["r2"], m["rmse"])
        return out


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------


def check_resume_config(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse to resume with flags that would change what the run computes."""
    if not (run_dir / "config.json").is_file():
        raise SystemExit(f"--resume: {run_dir} holds no run to resume (no config.json)")
    saved = json.loads((run_dir / "config.json").read_text())["args"]
    now = config_dict(cfg)
    diff = {k: (saved.get(k), now[k]) for k in now if k not in RESUME_MAY_DIFFER and saved.get(k) != now[k]}
    if diff:
        raise SystemExit("--resume with different settings than the interrupted run (saved, now): "
                         + ", ".join(f"{k}={a!r}->{b!r}" for k, (a, b) in diff.items()))


def log_phase_table(cfg: TrainConfig) -> None:
    rows = [("phase", "epochs", "trains", "head lr", "CLIP lr", "schedule")]
    if cfg.linear_probe_init:
        rows.append(("0 probe", "-", "head linear path", "closed form", "-", "ridge, penalty chosen on val"))
    if cfg.frozen_epochs:
        rows.append(("1 frozen", f"1-{cfg.frozen_epochs}", "head only",
                     f"{cfg.head_lr:g}", "-", "constant" + (", cached CLIP embeddings" if cfg.embedding_cache else "")))
    if cfg.finetune_epochs:
        rows.append(("2 finetune", f"{cfg.frozen_epochs + 1}-{cfg.total_epochs}", "CLIP + head",
                     f"{cfg.finetune_head_lr:g}", f"{cfg.clip_lr:g}",
                     f"warmup {cfg.warmup_frac:.0%} + cosine, clip grad {cfg.max_grad_norm:g}"))
        if cfg.alphas:
            rows.append(("3 WiSE-FT", "-", "-", "-", "-", f"alpha in {list(cfg.alphas)}, chosen on val"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    log.info("training phases (weight decay %g, no decay on biases/LayerNorm):\n  %s", cfg.weight_decay,
             "\n  ".join(lines))


def write_predictions(path: Path, rows: Sequence[int], labels: np.ndarray, scored: dict) -> None:
    """Per-post test predictions; ``row`` is the post's row in the raw posts table. The
    columns are named as ``serving/predict.py`` names them (``pred_engagement`` in label
    units, ``pred_score`` on the model scale), plus the label on the model scale."""
    with open(path, "w", newline="") as fh:
        w = safe_csv_writer(fh)
        w.writerow(["row", "label", "pred_engagement", "pred_score", "target_model_scale"])
        for row in zip(rows, labels, scored["y_pred"], scored["z_pred"], scored["z_true"]):
            w.writerow([int(row[0])] + [float(v) for v in row[1:]])


def epoch_timings(history: list[dict], cache_timings: dict | None, cfg: TrainConfig) -> dict:
    """Measured per-phase epoch times and the embedding cache's build time (seconds)."""
    def mean(phase):
        xs = [h["seconds"] for h in history if h["phase"] == phase]
        return round(sum(xs) / len(xs), 3) if xs else None

    return {"frozen_epoch_seconds_mean": mean("frozen"), "finetune_epoch_seconds_mean": mean("finetune"),
            "embedding_cache_used": bool(cfg.embedding_cache and cfg.frozen_epochs > 0),
            "embedding_cache_build_seconds": (cache_timings or {}).get("build_seconds"),
            "embedding_seconds_per_split": (cache_timings or {}).get("seconds_per_split")}


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything the phases share: built once by ``setup``, read by every step after it."""

    cfg: TrainConfig
    accelerator: object
    precision: str
    run_dir: Path
    meta: dict
    processor: object
    prep: PrepareConfig
    target: TargetTransform
    model: CLIPRegressor
    datasets: dict
    loaders: dict  # split -> prepared image loader (CLIP processing on the fly)
    collate: Collator
    state: RunState
    weights: dict  # "best", "phase1": CPU state dicts or None
    resumed: Checkpoint | None
    t_start: float
    cache: EmbeddingCache | None = None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def loaders_for(self, phase: str) -> dict:
        """The frozen phase runs on the embedding cache when there is one; all else on images."""
        if phase == "frozen" and self.cache is not None and self.cfg.embedding_cache:
            return {s: self.cache.loader(s) for s in ("train", "val", "test")}
        return self.loaders

    def validate(self, phase: str, desc: str = "val") -> dict:
        return score(*predict(self.model, self.loaders_for(phase)["val"], self.accelerator, desc), self.target)


def make_accelerator(cfg: TrainConfig, run_dir: Path):
    """Accelerate is the one seam for devices, mixed precision, processes and trackers."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    precision = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if cuda else "no")
    # cpu=True without CUDA: that is also what lets Accelerate run DDP over gloo on CPU processes.
    accelerator = Accelerator(cpu=not cuda, mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum,
                              log_with=None if cfg.report_to == "none" else cfg.report_to, project_dir=run_dir)
    resolve_num_workers(cfg, accelerator)  # its default depends on the device; config.json records the count used
    if cfg.report_to != "none":
        accelerator.init_trackers("train", config={k: v for k, v in config_dict(cfg).items()
                                                   if isinstance(v, (int, float, str, bool))})
    return accelerator, precision


def start_run_dir(cfg: TrainConfig, run_dir: Path, accelerator, precision: str, meta: dict) -> Checkpoint | None:
    """A fresh run dir (config.json written), or the interrupted run's checkpoint."""
    if cfg.resume:
        check_resume_config(run_dir, cfg)
        if (run_dir / CHECKPOINT_DIR).exists():
            try:
                return load_checkpoint(run_dir)
            except ValueError as e:
                raise DataRefused(str(e)) from None
        log.warning("--resume: no checkpoint in %s yet; starting from epoch 1", run_dir)
        return None
    if (run_dir / CHECKPOINT_DIR).exists():
        raise SystemExit(f"{run_dir} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    if accelerator.is_main_process:
        write_json_atomic(run_dir / "config.json", {"args": config_dict(cfg), "git_commit": git_commit(),
                                                    "num_processes": accelerator.num_processes,
                                                    "mixed_precision": precision, "data_meta": meta})
    return None


def setup(cfg: TrainConfig) -> Run:
    """Devices, data checks, run dir, target, model and loaders: everything before epoch 1."""
    from accelerate.utils import set_seed
    from transformers import CLIPProcessor

    from data_preprocessing.records import SPLITS

    t_start = time.perf_counter()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    run_dir = Path(cfg.out)
    accelerator, precision = make_accelerator(cfg, run_dir)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)  # one rank tells the story
    log.info("config: %s", json.dumps(config_dict(cfg)))
    log.info("device %s, %d process(es), mixed precision %s, %d torch threads", accelerator.device,
             accelerator.num_processes, precision, torch.get_num_threads())
    # 1. Check the data against the processor before spending time on the model.
    # A local dir, a hub name the hub answers for, or its cached snapshot; never minutes of hub retries.
    clip_source = resolve_pretrained(cfg.clip_model)
    processor = CLIPProcessor.from_pretrained(clip_source)
    meta = check_data(cfg.data, processor.image_processor)
    datasets = {s: EngagementDataset(cfg.data, s) for s in SPLITS}
    log.info("data %s: %s (cleaning version %s)", cfg.data, ", ".join(f"{s} {len(d)}" for s, d in datasets.items()),
             meta.get("cleaning_version"))
    # 2. A fresh run dir, or the checkpoint to continue; the target's statistics come with it.
    resumed = start_run_dir(cfg, run_dir, accelerator, precision, meta)
    log_phase_table(cfg)
    if resumed is not None:
        state = resumed.state
        target = TargetTransform(**state.target_transform)
    else:
        target = TargetTransform.fit(datasets["train"].labels(), kind=cfg.target_transform)
        state = RunState(target_transform=dataclasses.asdict(target))
    log.info("target: %s -> standardised (train mean %.4f, std %.4f)", target.kind, target.mean, target.std)
    # 3. Model (the seed fixes the head's init) and its inputs: the processor runs on the fly.
    prep = model_prepare_config(meta, processor.image_processor)
    log.info("feature columns: %s (%d head inputs)", ", ".join(
        f"{f.name} ({f.column.kind}, {f.transform})" for f in prep.features.features) or "none", prep.features.width)
    set_seed(cfg.seed)
    model = CLIPRegressor.from_pretrained(clip_source, HeadConfig(cfg.head_hidden, cfg.head_dropout),
                                          n_features=prep.features.width)
    weights = {"best": None, "phase1": None}
    if resumed is not None:
        model.load_state_dict(resumed.weights["model"])
        weights = {"best": resumed.weights["best"], "phase1": resumed.weights["phase1"]}
    model.to(accelerator.device)
    collate = Collator(PostBatcher.from_clip(processor, model.clip.config, prep.features), target)
    loaders = {s: accelerator.prepare(make_loader(
        datasets[s], cfg.batch_size if s == "train" else cfg.eval_batch_size, collate,
        shuffle_seed=cfg.seed if s == "train" else None, num_workers=cfg.num_workers,
        pin_memory=accelerator.device.type == "cuda")) for s in SPLITS}
    run = Run(cfg, accelerator, precision, run_dir, meta, processor, prep, target, model, datasets, loaders, collate,
              state, weights, resumed, t_start)
    # 4. The frozen CLIP's embeddings, once: phase 1, the probe and the baselines run on them.
    if state.baselines is None or (state.test_after_frozen is None and (cfg.frozen_epochs or cfg.linear_probe_init)):
        run.cache = EmbeddingCache(model, datasets, collate, cfg, accelerator)
        state.cache_timings = state.cache_timings or run.cache.timings
        state.baselines = state.baselines or run.cache.baselines(target)
    return run


def init_from_probe(run: Run) -> None:
    """Phase 0: start the head's linear path at the ridge solution on the frozen embeddings."""
    from training.probe import fit_ridge

    cache, target = run.cache, run.target
    fit = fit_ridge(cache.head_inputs("train"), cache.splits["train"]["target"],
                    cache.head_inputs("val"), cache.splits["val"]["target"])
    with torch.no_grad():
        run.model.head.linear.weight.copy_(fit.weight.unsqueeze(0))
        run.model.head.linear.bias.fill_(fit.bias)
    val = run.validate("frozen", "val (probe)")["model"]
    test = score(*predict(run.model, run.loaders_for("frozen")["test"], run.accelerator, "test (probe)"),
                 target)["model"]
    run.state.probe = {"alpha": fit.alpha, "val_mse_by_alpha": {f"{a:g}": v for a, v in fit.val_mse.items()},
                       "val": val, "test": test}
    # The probe is the model to beat: a frozen epoch that does not improve on it is not kept.
    run.state.best = {"epoch": 0, "phase": "probe", "metric": run.cfg.select_metric,
                      "value": val[run.cfg.select_metric.removeprefix("val_")]}
    run.weights["best"] = cpu_state(run.model)
    log.info("phase 0 linear probe: ridge penalty %g chosen on val; val r2 %.4f rmse %.4f, test r2 %.4f",
             fit.alpha, val["r2"], val["rmse"], test["r2"])


def run_epoch(run: Run, phase: str, epoch: int, step, optimizer, scheduler, guard: NonFiniteGuard) -> dict:
    """Train one epoch, validate, keep the best model; returns the epoch's history entry."""
    from accelerate.utils import set_seed

    cfg, state = run.cfg, run.state
    set_seed(cfg.seed + 1000 * epoch, device_specific=True)  # shuffle and dropout: a function of (seed, epoch)
    t0 = time.perf_counter()
    loaders = run.loaders_for(phase)
    loaders["train"].set_epoch(epoch)
    stats = train_one_epoch(step, loaders["train"], optimizer, scheduler, run.accelerator, guard,
                            max_grad_norm=cfg.max_grad_norm, desc=f"epoch {epoch}/{cfg.total_epochs} {phase}")
    val = run.validate(phase)["model"]
    lrs = group_lrs(optimizer)
    entry = {"epoch": epoch, "phase": phase, **stats, **{f"val_{k}": v for k, v in val.items()}, **lrs,
             "seconds": round(time.perf_counter() - t0, 3)}
    improved = is_better(entry[cfg.select_metric], state.best and state.best["value"], cfg.select_metric)
    if improved:
        state.best = {"epoch": epoch, "phase": phase, "metric": cfg.select_metric, "value": entry[cfg.select_metric]}
        run.weights["best"] = cpu_state(run.model)
    log.info("epoch %d/%d [%s] train_loss %.4f  val_rmse %.4f  val_r2 %.4f  %s  (%.1f s)%s", epoch,
             cfg.total_epochs, phase, entry["train_loss"], entry["val_rmse"], entry["val_r2"],
             "  ".join(f"{k} {v:.2e}" for k, v in lrs.items()), entry["seconds"], "  *best*" if improved else "")
    run.accelerator.log({k: v for k, v in entry.items() if isinstance(v, (int, float))}, step=epoch)
    return entry


def run_phase(run: Run, phase: str, first: int, last: int, guard: NonFiniteGuard) -> bool:
    """Epochs ``first..last`` of ``phase``; False when ``--stop-after-epochs`` ends the run early."""
    cfg, state = run.cfg, run.state
    if first > last or state.epoch >= last:  # no such phase, or finished before a --resume
        return True
    log.info("=== phase %d/2 %s: epochs %d-%d ===", PHASES.index(phase) + 1, phase, first, last)
    step, optimizer, scheduler = start_phase(phase, run.model, run.accelerator, cfg, len(run.loaders["train"]))
    ckpt = run.resumed
    if ckpt is not None and state.optimizer_phase == phase and state.epoch >= first:  # resuming mid-phase
        optimizer.load_state_dict(ckpt.optimizer)
        scheduler.load_state_dict(ckpt.scheduler)
    run.accelerator.log({"phase": PHASES.index(phase) + 1}, step=max(state.epoch, first - 1))
    for epoch in range(max(first, state.epoch + 1), last + 1):
        state.history.append(run_epoch(run, phase, epoch, step, optimizer, scheduler, guard))
        state.epoch, state.optimizer_phase = epoch, phase
        if run.is_main:
            saved = dataclasses.replace(state, seconds_before=state.seconds_before + time.perf_counter() - run.t_start)
            save_checkpoint(run.run_dir, saved, {"model": cpu_state(run.model), **run.weights}, optimizer, scheduler)
        run.accelerator.wait_for_everyone()
        if cfg.stop_after_epochs and epoch >= cfg.stop_after_epochs and epoch < cfg.total_epochs:
            log.info("stopping after epoch %d (--stop-after-epochs); continue with --resume", epoch)
            return False
    return True


def end_frozen_phase(run: Run) -> None:
    """Phase 1 is over: restore its best model (phase 2 and WiSE-FT start from it), score it."""
    if run.weights["best"] is not None:
        run.model.load_state_dict(run.weights["best"])
    run.weights["phase1"] = cpu_state(run.model)
    if run.cfg.frozen_epochs or run.cfg.linear_probe_init:
        loader = run.loaders_for("frozen")["test"]
        run.state.test_after_frozen = score(*predict(run.model, loader, run.accelerator, "test (frozen)"),
                                            run.target)["model"]
        log.info("best frozen-phase model (epoch %s) on test: r2 %.4f rmse %.4f", (run.state.best or {}).get("epoch"),
                 run.state.test_after_frozen["r2"], run.state.test_after_frozen["rmse"])


def wise_ft(run: Run) -> dict | None:
    """Phase 3: keep the best of theta(alpha) = (1-alpha) theta_phase1 + alpha theta_phase2 on val."""
    from training.probe import interpolate

    cfg = run.cfg
    if not cfg.alphas or not cfg.finetune_epochs or run.weights["phase1"] is None:
        return None
    theta1, theta2 = run.weights["phase1"], cpu_state(run.model)  # theta2: the end of fine-tuning
    curve = []
    for alpha in cfg.alphas:
        run.model.load_state_dict(interpolate(theta1, theta2, alpha))
        val = run.validate("finetune", f"val (WiSE-FT alpha {alpha:g})")["model"]
        curve.append({"alpha": alpha, **{f"val_{k}": v for k, v in val.items()}})
    best = curve[0]
    for point in curve[1:]:
        best = point if is_better(point[cfg.select_metric], best[cfg.select_metric], cfg.select_metric) else best
    run.model.load_state_dict(interpolate(theta1, theta2, best["alpha"]))
    log.info("WiSE-FT: %s; kept alpha %g", ", ".join(f"alpha {p['alpha']:g} {cfg.select_metric} "
                                                      f"{p[cfg.select_metric]:.4f}" for p in curve), best["alpha"])
    return {"alphas": list(cfg.alphas), "curve": curve, "chosen_alpha": best["alpha"], "metric": cfg.select_metric}


def train(cfg: TrainConfig) -> int:
    """The whole run: setup, then each phase, then WiSE-FT, test and the outputs. Returns an exit code."""
    run = setup(cfg)
    if run.resumed is not None:
        set_rng_state(run.resumed.rng)
        log.info("resuming after epoch %d of %d", run.state.epoch, cfg.total_epochs)
    elif cfg.linear_probe_init:
        init_from_probe(run)
    guard = NonFiniteGuard(cfg.max_nonfinite_steps)
    if not run_phase(run, "frozen", 1, cfg.frozen_epochs, guard):
        return 0
    if run.weights["phase1"] is None:
        end_frozen_phase(run)
    if not run_phase(run, "finetune", cfg.frozen_epochs + 1, cfg.total_epochs, guard):
        return 0
    finish(run, wise_ft(run))
    return 0


def finish(run: Run, wise: dict | None) -> None:
    """Score the kept model on test; write metrics.json, predictions, plots and the artifact."""
    from training.plots import plot_learning_curves, plot_predictions

    cfg, state, target = run.cfg, run.state, run.target
    if wise is None and run.weights["best"] is not None:  # without WiSE-FT: the best epoch by val
        run.model.load_state_dict(run.weights["best"])
    pred, labels = predict(run.model, run.loaders["test"], run.accelerator, "test")
    scored = score(pred, labels, target)
    calibration, reference = calibrate(run)
    intervals = {"levels": calibration.half_widths, "n_calibration": calibration.n, "split": calibration.split,
                 "coverage_test": coverage(scored["z_true"], scored["z_pred"], calibration)}
    log.info("conformal intervals (model scale half-widths %s, from %d val posts): test coverage %s",
             calibration.half_widths, calibration.n, intervals["coverage_test"])
    total = state.seconds_before + time.perf_counter() - run.t_start
    metrics = {
        "test": scored["model"], "test_label_units": scored["label"],
        "test_after_frozen": state.test_after_frozen, "probe": state.probe, "wise_ft": wise, "intervals": intervals,
        "baselines": state.baselines, "best": state.best, "history": state.history,
        "timings": {"total_seconds": round(total, 3), **epoch_timings(state.history, state.cache_timings, cfg)},
        "scale": f"{target.kind} of the label (model scale); test_label_units in label units",
        "target_transform": dataclasses.asdict(target),
        "data": {"dir": str(cfg.data), "counts": run.meta.get("counts"),
                 "cleaning_version": run.meta.get("cleaning_version"), "features": run.prep.features.names},
        "num_processes": run.accelerator.num_processes, "mixed_precision": run.precision,
    }
    log_test_summary(metrics)
    if run.is_main:
        write_json_atomic(run.run_dir / "metrics.json", metrics)
        write_predictions(run.run_dir / "predictions_test.csv", [r.row for r in run.datasets["test"]], labels, scored)
        plot_learning_curves(state.history, cfg.frozen_epochs, run.run_dir / "learning_curves.png", cfg.select_metric,
                             probe=state.probe, wise_ft=wise)
        plot_predictions(scored["z_true"], scored["z_pred"], run.run_dir / "pred_vs_actual.png",
                         f"test, {target.kind} scale: R² {scored['model']['r2']:.3f}, "
                         f"RMSE {scored['model']['rmse']:.3f}")
        extra = {"training": {"args": config_dict(cfg), "git_commit": git_commit(), "best": state.best,
                              "wise_ft_alpha": wise and wise["chosen_alpha"],
                              "num_processes": run.accelerator.num_processes, "mixed_precision": run.precision,
                              "data": metrics["data"]},
                 "metrics": {k: metrics[k] for k in ("test", "test_label_units", "test_after_frozen", "baselines")}}
        # The posts the model was fit (train) and calibrated (val) on, so the table scorer can
        # mark them; none for data preprocessed before fingerprints existed.
        seen = load_fingerprints(cfg.data, ("train", "val"))
        if seen is None:
            log.warning("%s has no post fingerprints: serving/predict.py will not be able to mark the posts "
                        "this model was trained on; re-run preprocess.py to get them", cfg.data)
        path = save_artifact(run.model, run.processor, target, run.run_dir / "model", prepare=run.prep,
                             extra_config=extra, calibration=calibration, reference=reference,
                             table=run.meta.get("table"), fingerprints=seen)
        log.info("wrote %s, metrics.json, plots and predictions in %s", path, run.run_dir)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()


def calibrate(run: Run) -> tuple[Calibration, Reference]:
    """The kept model's conformal calibration (val residuals) and its reference post (train means).

    Both use the *final* model: its val residuals are what a served prediction is off by,
    and its own train-mean embeddings are what "no image" or "no caption" means to it.
    """
    pred, labels = predict(run.model, run.loaders["val"], run.accelerator, "val (calibration)")
    val = score(pred, labels, run.target)
    calibration = Calibration.fit(val["z_true"] - val["z_pred"], run.cfg.levels)
    loader = run.accelerator.prepare(make_loader(run.datasets["train"], run.cfg.eval_batch_size, run.collate,
                                                 shuffle_seed=None, num_workers=run.cfg.num_workers))
    emb = embed_split(run.model, loader, run.accelerator, "train (reference)")
    return calibration, Reference.mean_of(emb["img"], emb["txt"], emb["sentiment"], emb["features"])


def log_test_summary(metrics: dict) -> None:
    """The final comparison, one line per model, as the demo prints it (test R², model scale)."""
    rows = [("fine-tuned (kept model)", metrics["test"])]
    if metrics["wise_ft"]:
        rows[0] = (f"fine-tuned, WiSE-FT alpha {metrics['wise_ft']['chosen_alpha']:g}", metrics["test"])
    rows += [("best frozen-phase model", metrics["test_after_frozen"]),
             ("linear probe (phase 1 start)", (metrics["probe"] or {}).get("test"))]
    rows += [(f"baseline {name}", m) for name, m in (metrics["baselines"] or {}).items()]
    log.info("test R² (model scale) and RMSE:\n%s", "\n".join(
        f"  {name:<34} r2 {m['r2']:.4f}  rmse {m['rmse']:.4f}" for name, m in rows if m))


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    cfg = parse_config(TrainConfig, argv)
    try:
        return train(cfg)
    except (DataRefused, NonFiniteLoss) as e:
        raise SystemExit(f"train_torch: {type(e).__name__}: {e}") from None
    except PretrainedUnavailable as e:  # no hub and no cached copy: one line, not a traceback
        raise SystemExit(f"error: --clip-model: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
