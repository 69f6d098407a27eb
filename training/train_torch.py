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

import csv
import dataclasses
import json
import logging
import math
import os
import random
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

from common.config import atomic_dir, config_dict, field, git_commit, parse_config, setup_logging, write_json_atomic
from data_preprocessing.posts import PrepareConfig, Record
from data_preprocessing.records import RecordReader, check_cleaning_version, check_record_format, load_meta
from models.clip_regressor import (DEFAULT_CLIP, CLIPRegressor, HeadConfig, PostBatcher, TargetTransform,
                                   regression_metrics, save_artifact)

log = logging.getLogger(__name__)

PHASES = ("frozen", "finetune")
# Metric -> True if higher is better. All are on the validation split, model scale.
SELECT_METRICS = {"val_rmse": False, "val_mae": False, "val_r2": True, "val_pearson": True, "val_spearman": True}
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FORMAT = 1
# Flags that may differ between an interrupted run and its --resume (they change how,
# not what, it computes).
RESUME_MAY_DIFFER = ("resume", "stop_after_epochs", "num_workers", "torch_threads", "eval_batch_size")


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
                                      "the demo is far less trained and needs 1e-4 (make demo passes it)")
    warmup_frac: float = field(0.1, help="phase 2 linear warmup, as a fraction of its optimizer steps; cosine after")
    weight_decay: float = field(0.01, help="AdamW weight decay on matrices (never on biases/LayerNorm)")
    max_grad_norm: float = field(1.0, help="clip the global gradient norm to this (0 = off)")
    # -- batches --------------------------------------------------------------------------
    batch_size: int = field(32, help="training batch size per process")
    eval_batch_size: int = field(64, help="evaluation / embedding batch size per process")
    grad_accum: int = field(1, help="gradient accumulation steps (effective batch = batch size x this x processes)")
    num_workers: int = field(1, help="DataLoader worker processes (run the CLIP processor off the main process)")
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
    mixed_precision: str = field("auto", help="auto = bf16 on CUDA, none on CPU", choices=("auto", "no", "bf16"))
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
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.num_workers < 0 or self.torch_threads < 0:
            raise ValueError("--weight-decay, --max-grad-norm, --num-workers, --torch-threads must be >= 0")
        if self.select_metric not in SELECT_METRICS:
            raise ValueError(f"--select-metric must be one of {tuple(SELECT_METRICS)}")

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
                                                     leave=False, disable=None)], dtype=np.float64)


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
    return step, optimizer, scheduler


# ---------------------------------------------------------------------------------------
# Loops
# ---------------------------------------------------------------------------------------


class NonFiniteGuard:
    """Counts non-finite losses; raises ``NonFiniteLoss`` after ``limit`` in a row (across epochs)."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0

    def check(self, finite: bool, where: str) -> bool:
        if finite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        log.warning("non-finite loss at %s: update skipped (%d in a row, abort at %d)", where, self.in_a_row,
                    self.limit)
        if self.in_a_row >= self.limit:
            raise NonFiniteLoss(f"{self.in_a_row} consecutive non-finite losses (last at {where}): training "
                                "diverged. Lower the learning rates, or check the data for inf/NaN labels.")
        return False


def train_one_epoch(step: nn.Module, loader, optimizer, scheduler, accelerator, guard: NonFiniteGuard, *,
                    max_grad_norm: float, desc: str) -> dict:
    """One pass over ``loader``; returns mean train loss (standardised MSE) and skipped steps."""
    from tqdm.auto import tqdm

    step.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    n_seen, skipped = 0, 0
    bar = tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process)
    for i, batch in enumerate(bar):
        with accelerator.accumulate(step):
            pred = step(batch)  # (B,)
            loss = F.mse_loss(pred.float(), batch["target"])
            # Decide on all ranks together, or one rank would wait forever in all-reduce.
            finite = bool(accelerator.gather(torch.isfinite(loss.detach()).float().reshape(1)).min() > 0)
            if not guard.check(finite, f"{desc} batch {i}"):
                # Also drop gradients accumulated earlier in this window: no update
                # ever contains part of a diverging window.
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            accelerator.backward(loss)
            if accelerator.sync_gradients and max_grad_norm > 0:
                accelerator.clip_grad_norm_(step.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach().double() * len(pred)
        n_seen += len(pred)
        bar.set_postfix(loss=f"{loss_sum.item() / max(n_seen, 1):.4f}")
    totals = accelerator.reduce(torch.stack([loss_sum, torch.tensor(float(n_seen), dtype=torch.float64,
                                                                    device=accelerator.device)]), "sum")
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
    for batch in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
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
    for batch in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
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
# Checkpoints
# ---------------------------------------------------------------------------------------


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}


def rng_state() -> dict:
    """Python, numpy and torch RNG states as types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, model: CLIPRegressor, best_state: dict | None, optimizer, scheduler,
                    state: dict) -> None:
    """Write RUN_DIR/checkpoint atomically: weights as safetensors, the rest via torch.save."""
    from safetensors.torch import save_file

    with atomic_dir(run_dir / CHECKPOINT_DIR) as tmp:
        save_file(_cpu_state(model), str(tmp / "model.safetensors"))
        if best_state is not None:
            save_file(best_state, str(tmp / "best.safetensors"))
        torch.save({"format": CHECKPOINT_FORMAT, "state": state, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp / "training_state.pt")


def load_checkpoint(run_dir: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(training_state, model weights, best weights or None) of RUN_DIR/checkpoint."""
    from safetensors.torch import load_file

    ckpt = run_dir / CHECKPOINT_DIR
    if not (ckpt / "training_state.pt").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt}")
    training_state = torch.load(ckpt / "training_state.pt", map_location="cpu", weights_only=True)
    if training_state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{ckpt}: checkpoint format {training_state.get('format')!r} is not {CHECKPOINT_FORMAT}")
    best = load_file(str(ckpt / "best.safetensors")) if (ckpt / "best.safetensors").is_file() else None
    return training_state, load_file(str(ckpt / "model.safetensors")), best


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


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------


def log_phase_table(cfg: TrainConfig) -> None:
    rows = [("phase", "epochs", "trains", "head lr", "CLIP lr", "schedule")]
    if cfg.frozen_epochs:
        rows.append(("1 frozen", f"1-{cfg.frozen_epochs}", "head only",
                     f"{cfg.head_lr:g}", "-", "constant" + (", cached CLIP embeddings" if cfg.embedding_cache else "")))
    if cfg.finetune_epochs:
        rows.append(("2 finetune", f"{cfg.frozen_epochs + 1}-{cfg.total_epochs}", "CLIP + head",
                     f"{cfg.finetune_head_lr:g}", f"{cfg.clip_lr:g}",
                     f"warmup {cfg.warmup_frac:.0%} + cosine, clip grad {cfg.max_grad_norm:g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    log.info("training phases (weight decay %g, no decay on biases/LayerNorm):\n  %s", cfg.weight_decay,
             "\n  ".join(lines))


def write_predictions(path: Path, rows: Sequence[int], labels: np.ndarray, scored: dict) -> None:
    """Per-post test predictions; ``row`` is the post's row in the raw posts table."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["row", "label", "pred_label_units", "target_model_scale", "pred_model_scale"])
        for row in zip(rows, labels, scored["y_pred"], scored["z_true"], scored["z_pred"]):
            w.writerow([int(row[0])] + [repr(float(v)) for v in row[1:]])


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def build_embedding_cache(model: CLIPRegressor, loaders: dict, accelerator) -> tuple[dict, dict]:
    """Embed every split once with the frozen CLIP; returns (cache per split, timings in s)."""
    seconds = {}
    cache = {}
    for split, loader in loaders.items():
        t0 = time.perf_counter()
        cache[split] = embed_split(model, loader, accelerator, f"embed {split}")
        seconds[split] = round(time.perf_counter() - t0, 3)
    timings = {"build_seconds": round(sum(seconds.values()), 3), "seconds_per_split": seconds}
    log.info("embedding cache: %s posts embedded once in %.1f s (%s)", sum(len(c["label"]) for c in cache.values()),
             timings["build_seconds"], ", ".join(f"{s} {t:.1f} s" for s, t in seconds.items()))
    return cache, timings


def cached_baselines(cache: dict, target: TargetTransform) -> dict:
    """The three reference models (training/baselines.py) on the cache's test split."""
    from training.baselines import baseline_metrics

    def arrays(c):
        return {"img": c["img"].numpy(), "txt": c["txt"].numpy(), "sentiment": c["sentiment"].double().numpy(),
                "features": c["features"].double().numpy(), "z": target.to_model_scale(c["label"]).numpy()}

    out = baseline_metrics(arrays(cache["train"]), arrays(cache["test"]))
    for name, m in out.items():
        log.info("baseline %-17s test r2 %.4f rmse %.4f", name, m["r2"], m["rmse"])
    return out


def epoch_timings(history: list[dict], cache_timings: dict | None, cfg: TrainConfig) -> dict:
    """Per-phase epoch times and what the embedding cache saved (seconds)."""
    def mean(phase):
        xs = [h["seconds"] for h in history if h["phase"] == phase]
        return round(sum(xs) / len(xs), 3) if xs else None

    out = {"frozen_epoch_seconds_mean": mean("frozen"), "finetune_epoch_seconds_mean": mean("finetune"),
           "embedding_cache_used": bool(cfg.embedding_cache and cfg.frozen_epochs > 0),
           "embedding_cache_build_seconds": None}
    if cache_timings is not None:
        per_split = cache_timings["seconds_per_split"]
        # Without the cache every frozen epoch re-embeds train and val.
        recompute = per_split["train"] + per_split["val"]
        out["embedding_cache_build_seconds"] = cache_timings["build_seconds"]
        out["embedding_seconds_per_split"] = per_split
        if out["embedding_cache_used"] and out["frozen_epoch_seconds_mean"] is not None:
            out["frozen_epoch_seconds_without_cache_estimate"] = round(out["frozen_epoch_seconds_mean"] + recompute, 3)
            out["embedding_cache_saving_seconds_estimate"] = round(
                cfg.frozen_epochs * recompute - cache_timings["build_seconds"], 3)
    return out


def train(cfg: TrainConfig) -> int:
    """The whole run: data checks, phases, evaluation and outputs. Returns an exit code."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import CLIPProcessor

    from data_preprocessing.records import SPLITS

    t_start = time.perf_counter()
    # 1. Devices, mixed precision and processes: Accelerate is the one seam for all three.
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    cuda = torch.cuda.is_available()
    precision = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if cuda else "no")
    # cpu=True without CUDA: that is also what lets Accelerate run DDP over gloo on CPU processes.
    accelerator = Accelerator(cpu=not cuda, mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum)
    is_main = accelerator.is_main_process
    if not is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one rank tells the story
    run_dir = Path(cfg.out)
    log.info("config: %s", json.dumps(config_dict(cfg)))
    log.info("device %s, %d process(es), mixed precision %s, %d torch threads", accelerator.device,
             accelerator.num_processes, precision, torch.get_num_threads())

    # 2. Check the data against the processor before spending time on the model.
    processor = CLIPProcessor.from_pretrained(cfg.clip_model)
    meta = check_data(cfg.data, processor.image_processor)
    datasets = {s: EngagementDataset(cfg.data, s) for s in SPLITS}
    log.info("data %s: %s (cleaning version %s)", cfg.data, ", ".join(f"{s} {len(d)}" for s, d in datasets.items()),
             meta.get("cleaning_version"))

    # 3. A fresh run dir, or the interrupted run's checkpoint.
    resumed = None
    if cfg.resume:
        check_resume_config(run_dir, cfg)
        if (run_dir / CHECKPOINT_DIR).exists():
            resumed = load_checkpoint(run_dir)
        else:  # interrupted before its first checkpoint: nothing to continue, so start over
            log.warning("--resume: no checkpoint in %s yet; starting from epoch 1", run_dir)
    elif (run_dir / CHECKPOINT_DIR).exists():
        raise SystemExit(f"{run_dir} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    elif is_main:
        write_json_atomic(run_dir / "config.json", {"args": config_dict(cfg), "git_commit": git_commit(),
                                                    "num_processes": accelerator.num_processes,
                                                    "mixed_precision": precision, "data_meta": meta})
    log_phase_table(cfg)

    # 4. Target: label -> model scale, standardised with train statistics (saved, so a resume reuses them).
    if resumed is not None:
        state = resumed[0]["state"]
        target = TargetTransform(**state["target_transform"])
    else:
        target = TargetTransform.fit(datasets["train"].labels(), kind=cfg.target_transform)
        state = {"epoch": 0, "history": [], "best": None, "test_after_frozen": None, "baselines": None,
                 "cache_timings": None, "optimizer_phase": None, "target_transform": dataclasses.asdict(target),
                 "seconds_before": 0.0}
    log.info("target: %s -> standardised (train mean %.4f, std %.4f)", target.kind, target.mean, target.std)

    # 5. Model (the seed fixes the head's init) and the batcher the collate function calls.
    set_seed(cfg.seed)
    prep = model_prepare_config(meta, processor.image_processor)
    log.info("feature columns: %s (%d head inputs)", ", ".join(
        f"{f.name} ({f.column.kind}, {f.transform})" for f in prep.features.features) or "none", prep.features.width)
    model = CLIPRegressor.from_pretrained(cfg.clip_model, HeadConfig(cfg.head_hidden, cfg.head_dropout),
                                          n_features=prep.features.width)
    batcher = PostBatcher.from_clip(processor, model.clip.config, prep.features)
    best_state = None
    if resumed is not None:
        model.load_state_dict(resumed[1])
        best_state = resumed[2]
    model.to(accelerator.device)

    # 6. Loaders: the processor runs on the fly in the collate function (in workers).
    collate = Collator(batcher, target)
    pin = accelerator.device.type == "cuda"
    image_loaders = {s: accelerator.prepare(make_loader(
        datasets[s], cfg.batch_size if s == "train" else cfg.eval_batch_size, collate,
        shuffle_seed=cfg.seed if s == "train" else None, num_workers=cfg.num_workers, pin_memory=pin))
        for s in SPLITS}

    # 7. Phase-1 embedding cache (and the baselines that reuse it), built shard-wise once.
    use_cache = cfg.embedding_cache and cfg.frozen_epochs > 0 and state["test_after_frozen"] is None
    cached_loaders = {}
    if use_cache or state["baselines"] is None:
        embed_loaders = {s: accelerator.prepare(make_loader(
            datasets[s], cfg.eval_batch_size, collate, shuffle_seed=None, num_workers=cfg.num_workers,
            pin_memory=pin)) for s in SPLITS}
        cache, state["cache_timings"] = build_embedding_cache(model, embed_loaders, accelerator)
        if state["baselines"] is None:
            state["baselines"] = cached_baselines(cache, target)
        if use_cache:
            # Same batch size and EpochShuffle as the image loader: the same batches, in the same order.
            cached_loaders = {s: accelerator.prepare(make_loader(
                _Indices(len(cache[s]["label"])), cfg.batch_size if s == "train" else cfg.eval_batch_size,
                CachedBatch(cache[s]), shuffle_seed=cfg.seed if s == "train" else None)) for s in SPLITS}
        del embed_loaders

    # 8. The epochs. Each phase starts with its freeze/unfreeze, optimizer and schedule.
    if resumed is not None:
        set_rng_state(resumed[0]["rng"])
        log.info("resuming after epoch %d of %d", state["epoch"], cfg.total_epochs)
    guard = NonFiniteGuard(cfg.max_nonfinite_steps)
    phase = step = optimizer = scheduler = None
    for epoch in range(state["epoch"] + 1, cfg.total_epochs + 1):
        if cfg.phase_of(epoch) != phase:
            phase = cfg.phase_of(epoch)
            if phase == "finetune" and cfg.frozen_epochs > 0 and state["test_after_frozen"] is None:
                state["test_after_frozen"] = finish_frozen_phase(model, best_state, cached_loaders or image_loaders,
                                                                 accelerator, target)
            log.info("=== phase %d/2 %s: epochs %d-%d ===", PHASES.index(phase) + 1, phase, epoch,
                     cfg.frozen_epochs if phase == "frozen" else cfg.total_epochs)
            step, optimizer, scheduler = start_phase(phase, model, accelerator, cfg, len(image_loaders["train"]))
            if resumed is not None and state["optimizer_phase"] == phase and epoch == state["epoch"] + 1:
                optimizer.load_state_dict(resumed[0]["optimizer"])
                scheduler.load_state_dict(resumed[0]["scheduler"])
        # Every epoch's shuffle and dropout are a function of (seed, epoch) alone.
        set_seed(cfg.seed + 1000 * epoch, device_specific=True)
        t0 = time.perf_counter()
        loaders = cached_loaders if (phase == "frozen" and cached_loaders) else image_loaders
        loaders["train"].set_epoch(epoch)
        stats = train_one_epoch(step, loaders["train"], optimizer, scheduler, accelerator, guard,
                                max_grad_norm=cfg.max_grad_norm, desc=f"epoch {epoch}/{cfg.total_epochs} {phase}")
        val = score(*predict(model, loaders["val"], accelerator, "val"), target)["model"]
        entry = {"epoch": epoch, "phase": phase, **stats, **{f"val_{k}": v for k, v in val.items()},
                 **group_lrs(optimizer), "seconds": round(time.perf_counter() - t0, 3)}
        state["history"].append(entry)
        improved = is_better(entry[cfg.select_metric], state["best"] and state["best"]["value"], cfg.select_metric)
        if improved:
            state["best"] = {"epoch": epoch, "phase": phase, "metric": cfg.select_metric,
                             "value": entry[cfg.select_metric]}
            best_state = _cpu_state(model)
        log.info("epoch %d/%d [%s] train_loss %.4f  val_rmse %.4f  val_r2 %.4f  %s  (%.1f s)%s", epoch,
                 cfg.total_epochs, phase, entry["train_loss"], entry["val_rmse"], entry["val_r2"],
                 "  ".join(f"{k} {v:.2e}" for k, v in group_lrs(optimizer).items()), entry["seconds"],
                 "  *best*" if improved else "")
        state["epoch"], state["optimizer_phase"] = epoch, phase
        if is_main:
            state_to_save = dict(state, seconds_before=state["seconds_before"] + time.perf_counter() - t_start)
            save_checkpoint(run_dir, model, best_state, optimizer, scheduler, state_to_save)
        accelerator.wait_for_everyone()
        if cfg.stop_after_epochs and epoch >= cfg.stop_after_epochs and epoch < cfg.total_epochs:
            log.info("stopping after epoch %d (--stop-after-epochs); continue with --resume", epoch)
            return 0
    if cfg.frozen_epochs > 0 and state["test_after_frozen"] is None:  # no phase 2 to hand over to
        state["test_after_frozen"] = finish_frozen_phase(model, best_state, cached_loaders or image_loaders,
                                                         accelerator, target)

    # 9. The best model on test, the outputs and the artifact.
    finish(cfg, accelerator, model, best_state, state, image_loaders["test"], datasets["test"], target,
           (processor, prep), meta, run_dir, state["seconds_before"] + time.perf_counter() - t_start, precision)
    return 0


def finish_frozen_phase(model: CLIPRegressor, best_state: dict | None, loaders: dict, accelerator,
                        target: TargetTransform) -> dict:
    """End of phase 1: restore its best model (phase 2 starts from it) and score it on test."""
    if best_state is not None:
        model.load_state_dict(best_state)
    result = score(*predict(model, loaders["test"], accelerator, "test (frozen)"), target)["model"]
    log.info("best frozen-phase model on test: r2 %.4f rmse %.4f", result["r2"], result["rmse"])
    return result


def finish(cfg: TrainConfig, accelerator, model: CLIPRegressor, best_state: dict | None, state: dict, test_loader,
           test_set: EngagementDataset, target: TargetTransform, transforms: tuple, meta: dict, run_dir: Path,
           total_seconds: float, precision: str) -> None:
    """Score the best model on test; write metrics.json, predictions, plots and the artifact."""
    from training.plots import plot_learning_curves, plot_predictions

    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        log.warning("no epoch had a finite %s; keeping the last model", cfg.select_metric)
    pred, labels = predict(model, test_loader, accelerator, "test")
    scored = score(pred, labels, target)
    timings = {"total_seconds": round(total_seconds, 3), **epoch_timings(state["history"], state["cache_timings"], cfg)}
    metrics = {
        "test": scored["model"],
        "test_label_units": scored["label"],
        "test_after_frozen": state["test_after_frozen"],
        "baselines": state["baselines"],
        "best": state["best"],
        "history": state["history"],
        "timings": timings,
        "scale": f"{target.kind} of the label (model scale); test_label_units in label units",
        "target_transform": dataclasses.asdict(target),
        "data": {"dir": str(cfg.data), "counts": meta.get("counts"), "cleaning_version": meta.get("cleaning_version")},
        "num_processes": accelerator.num_processes,
        "mixed_precision": precision,
    }
    log.info("test (best epoch %s): r2 %.4f rmse %.4f | after frozen phase r2 %s | baselines r2: %s",
             state["best"] and state["best"]["epoch"], scored["model"]["r2"], scored["model"]["rmse"],
             "-" if state["test_after_frozen"] is None else f"{state['test_after_frozen']['r2']:.4f}",
             ", ".join(f"{k} {v['r2']:.4f}" for k, v in state["baselines"].items()))
    if cfg.embedding_cache and timings.get("embedding_cache_saving_seconds_estimate") is not None:
        log.info("embedding cache: built once in %.1f s; a frozen epoch took %.2f s instead of ~%.1f s; "
                 "saved ~%.1f s over %d frozen epochs", timings["embedding_cache_build_seconds"],
                 timings["frozen_epoch_seconds_mean"], timings["frozen_epoch_seconds_without_cache_estimate"],
                 timings["embedding_cache_saving_seconds_estimate"], cfg.frozen_epochs)
    if accelerator.is_main_process:
        write_json_atomic(run_dir / "metrics.json", metrics)
        write_predictions(run_dir / "predictions_test.csv", [test_set[i].row for i in range(len(test_set))],
                          labels, scored)
        plot_learning_curves(state["history"], cfg.frozen_epochs, run_dir / "learning_curves.png", cfg.select_metric)
        plot_predictions(scored["z_true"], scored["z_pred"], run_dir / "pred_vs_actual.png",
                         f"test, {target.kind} scale: R² {scored['model']['r2']:.3f}, "
                         f"RMSE {scored['model']['rmse']:.3f}")
        extra = {"training": {"args": config_dict(cfg), "git_commit": git_commit(), "best": state["best"],
                              "num_processes": accelerator.num_processes, "mixed_precision": precision,
                              "data": metrics["data"]},
                 "metrics": {k: metrics[k] for k in ("test", "test_label_units", "test_after_frozen", "baselines")}}
        processor, prep = transforms  # what serving prepares and batches posts with
        path = save_artifact(model, processor, target, run_dir / "model", prepare=prep,
                             extra_config=extra)
        log.info("wrote %s, metrics.json, plots and predictions in %s", path, run_dir)
    accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    cfg = parse_config(TrainConfig, argv)
    try:
        return train(cfg)
    except (DataRefused, NonFiniteLoss) as e:
        raise SystemExit(f"train_torch: {type(e).__name__}: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
