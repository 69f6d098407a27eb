"""Fine-tune CLIP end to end to predict post engagement (image + caption + sentiment -> likes).

    python training/train_torch.py                      # data/processed/ -> runs/<timestamp>/, runs/latest
    python training/train_torch.py --data data/prep --out runs/demo --clip-model DIR_OR_HUB_NAME
    accelerate launch training/train_torch.py ...        # or: torchrun --nproc_per_node N ...

With no arguments it follows the repo's layout (``training/layout.py``), relative to the
current directory: it reads ``data/processed/`` (what ``preprocess.py`` writes by
default), writes a new ``runs/<timestamp>/`` and, once the artifact and metrics are
written, points ``runs/latest`` at it (the server's default ``MODEL_DIR`` is
``runs/latest/model``).

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
``--select-metric``; the best model is scored on test at the end, next to the baselines.

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
that ``models.artifact.load_model`` and the server load). metrics.json and the end
of the log say how the test posts were chosen (the data's split rule), and which
baseline, if any, beats the kept model on test.

This file is the entry point only: the config is ``training/config.py``, the run and its
phases ``training/run.py`` (with ``data.py``, ``loop.py``, ``cache.py``, ``state.py``).
Nothing heavy is imported before the arguments are parsed, so ``--help`` is instant.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import parse_config, setup_logging
from common.hub import PretrainedUnavailable
from training.config import DataRefused, NonFiniteLoss, TrainConfig
from training.layout import check_data_dir

# Where the names this script used to define live now, for ``from training.train_torch
# import Collator`` in older callers (resolved on first use, so importing stays light).
_MOVED_TO = ("training.config", "training.data", "training.loop", "training.cache", "training.run")


def __getattr__(name: str):
    for module in _MOVED_TO:
        mod = importlib.import_module(module)
        if hasattr(mod, name):
            return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> int:
    # 1. parse args (no torch yet: --help and usage errors answer at once)
    setup_logging()
    cfg = parse_config(TrainConfig, argv)
    try:
        # 2. is the data there? (before seconds of imports)
        check_data_dir(cfg.data)
        # 3. the run
        from training.run import train

        return train(cfg)
    except (DataRefused, NonFiniteLoss) as e:
        raise SystemExit(f"train_torch: {type(e).__name__}: {e}") from None
    except PretrainedUnavailable as e:  # no hub and no cached copy: one line, not a traceback
        raise SystemExit(f"error: --clip-model: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
