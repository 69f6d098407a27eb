"""train_torch.py's configuration: every default in one place, importable without torch.

``python training/train_torch.py --help`` parses this dataclass before anything heavy is
imported, so the help prints at once; the run itself lives in ``training/run.py``. The two
ways a run is refused or stopped with a one-line message (``DataRefused``,
``NonFiniteLoss``) are here too, so the entry point can catch them without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.config import field
from common.hub import DEFAULT_CLIP

# The default layout, relative to the current directory (training/layout.py)
DEFAULT_DATA = "data/processed"  # preprocess.py's default --out
RUNS_DIR = "runs"  # a run without --out goes to runs/<timestamp>/
LATEST = "latest"  # runs/latest -> the newest finished run
PHASES = ("frozen", "finetune")
# Metric -> True if higher is better. All are on the validation split, model scale.
SELECT_METRICS = {"val_rmse": False, "val_mae": False, "val_r2": True, "val_pearson": True, "val_spearman": True}
# Flags that may differ between an interrupted run and its --resume (they change how,
# not what, it computes).
RESUME_MAY_DIFFER = ("resume", "stop_after_epochs", "num_workers", "torch_threads", "eval_batch_size", "report_to")


def parse_alphas(spec: str) -> tuple[float, ...]:
    """``"0,0.25,0.5,0.75,1"`` -> sorted alphas in [0, 1]; ``"none"`` -> () (WiSE-FT off)."""
    if spec.strip().lower() in ("none", ""):
        return ()
    alphas = sorted({float(a) for a in spec.split(",")})
    if alphas[0] < 0 or alphas[-1] > 1:
        raise ValueError(f"--wise-ft-alphas must lie in [0, 1], got {spec!r}")
    return tuple(alphas)


@dataclass
class TrainConfig:
    """Fine-tune CLIP end to end on preprocessed posts (frozen-head phase, then full fine-tuning)."""

    data: str = field(DEFAULT_DATA, help="preprocess.py output dir: {train,val,test}.pkl/.idx and meta.json "
                                         "(relative to the current directory)")
    out: str | None = field(None, help="run dir for config.json, checkpoint/, metrics.json, plots and model/; "
                                       f"default a new {RUNS_DIR}/<timestamp>/ (e.g. {RUNS_DIR}/20261207-183000), "
                                       f"and {RUNS_DIR}/{LATEST} points at the newest finished run")
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
                                            "on the val residuals of the kept model (docs/serving.md, \"How sure, and why\")")
    report_to: str = field("none", help="Accelerate tracker for per-epoch metrics, LRs and the phase boundary "
                                        "(tensorboard writes under OUT/train)", choices=("none", "tensorboard"))
    mixed_precision: str = field("auto", help="auto = bf16 on CUDA, none on CPU", choices=("auto", "no", "bf16"))
    compile: bool = field(False, help="torch.compile each phase's train step (inductor): pays off on a GPU "
                                      "over many steps; on CPU the compile time outweighs it for the demo "
                                      "(docs/design-notes.md, \"--compile\")")
    seed: int = field(0, help="seed for the head init, shuffling and dropout (CPU runs are reproducible)")
    resume: bool = field(False, help="continue an interrupted run from OUT/checkpoint")
    stop_after_epochs: int = field(0, help="exit cleanly once this many epochs (in total) are done; for tests "
                                           "and time-boxing, continue with --resume (0 = run to the end)")
    max_nonfinite_steps: int = field(10, help="abort after this many consecutive non-finite losses")

    def __post_init__(self):
        if self.resume and not self.out:
            raise ValueError("--resume needs --out RUN_DIR: the interrupted run to continue")
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
