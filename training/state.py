"""Run state and checkpoints: what a training run must remember to continue where it stopped.

``RunState`` holds the run's bookkeeping with named fields (nanoGPT's checkpoint dict,
typed). ``save_checkpoint``/``load_checkpoint`` are the one pair that writes and reads
``RUN_DIR/checkpoint/``:

    model.safetensors        the model after the last finished epoch
    best.safetensors         the best model so far by the selection metric (if any)
    phase1.safetensors       the model phase 2 started from (WiSE-FT's theta_phase1), once known
    training_state.pt        {"format", "state": RunState as a dict, "optimizer", "scheduler", "rng"}

Weights are safetensors; ``training_state.pt`` holds only plain containers, tensors and
numbers, read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.config import atomic_dir

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FORMAT = 2  # 2: RunState fields, phase1.safetensors (1: an untyped dict)
_WEIGHTS = ("model", "best", "phase1")


@dataclass
class RunState:
    """A run's bookkeeping; everything in it is JSON-like (it goes into metrics.json too)."""

    epoch: int = 0  # last finished epoch (1-based; 0 = none yet)
    history: list[dict] = field(default_factory=list)  # one metrics dict per finished epoch
    best: dict | None = None  # {"epoch", "phase", "metric", "value"} of the best model so far
    probe: dict | None = None  # the linear probe phase 1 started from (alpha, val/test metrics)
    test_after_frozen: dict | None = None  # the best phase-1 model on test
    baselines: dict | None = None  # {name: test metrics}
    cache_timings: dict | None = None  # embedding cache build times (seconds)
    optimizer_phase: str | None = None  # the phase the saved optimizer/scheduler belong to
    target_transform: dict | None = None  # TargetTransform fields, fitted on train
    seconds_before: float = 0.0  # wall time of earlier sessions of this run (resume)


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` returns."""

    state: RunState
    weights: dict[str, dict[str, torch.Tensor] | None]  # "model", "best", "phase1"
    optimizer: dict
    scheduler: dict
    rng: dict


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
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


def save_checkpoint(run_dir: Path, state: RunState, weights: dict[str, dict | None], optimizer, scheduler) -> None:
    """Write RUN_DIR/checkpoint atomically (temp dir, then rename)."""
    from safetensors.torch import save_file

    with atomic_dir(Path(run_dir) / CHECKPOINT_DIR) as tmp:
        for name in _WEIGHTS:
            if weights.get(name) is not None:
                save_file(weights[name], str(tmp / f"{name}.safetensors"))
        torch.save({"format": CHECKPOINT_FORMAT, "state": dataclasses.asdict(state),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   tmp / "training_state.pt")


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read RUN_DIR/checkpoint; refuse one written in another format."""
    from safetensors.torch import load_file

    ckpt = Path(run_dir) / CHECKPOINT_DIR
    if not (ckpt / "training_state.pt").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt}")
    saved = torch.load(ckpt / "training_state.pt", map_location="cpu", weights_only=True)
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{ckpt} holds a checkpoint of format {saved.get('format')!r}, written by an older "
                         f"train_torch.py; this one reads format {CHECKPOINT_FORMAT}. Start a new run (another "
                         "--out), or resume it with the commit that wrote it.")
    weights = {n: load_file(str(ckpt / f"{n}.safetensors")) if (ckpt / f"{n}.safetensors").is_file() else None
               for n in _WEIGHTS}
    return Checkpoint(RunState(**saved["state"]), weights, saved["optimizer"], saved["scheduler"], saved["rng"])
