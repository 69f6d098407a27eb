"""Training's loop: the model step of each phase, one epoch, evaluation and the non-finite guard.

``start_phase`` freezes or unfreezes CLIP and builds the phase's (Accelerate-prepared)
``TrainStep``, optimizer and scheduler; ``train_one_epoch`` runs one pass under a
``NonFiniteGuard``; ``predict``/``score`` evaluate a split; ``embed_split`` gives the frozen
CLIP's embeddings of one (the phase-1 cache, ``training/cache.py``).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.config import bar_disabled
from common.metrics import regression_metrics
from models.clip_regressor import CLIPRegressor, TargetTransform
from training.config import SELECT_METRICS, NonFiniteLoss

if TYPE_CHECKING:
    from training.config import TrainConfig

log = logging.getLogger(__name__)

BAR_EVERY = 25  # steps between progress-bar loss updates (each one is a host sync)


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
