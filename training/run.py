"""One training run and its phases, as ``training/train_torch.py`` describes them.

``train(cfg)`` is the whole run: ``setup`` (devices, data checks, run dir, target, model,
loaders), phase 0 (``init_from_probe``), the frozen and fine-tuning phases
(``run_phase``), WiSE-FT (``wise_ft``) and ``finish`` (test, metrics.json, predictions,
plots, the artifact, ``runs/latest``). The pieces it calls live in ``training/data.py``,
``training/loop.py``, ``training/cache.py`` and ``training/state.py``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from common.config import config_dict, git_commit, write_json_atomic
from common.hub import resolve_pretrained
from data_preprocessing.posts import PrepareConfig
from data_preprocessing.table import load_fingerprints, safe_csv_writer
from models.artifact import save_artifact
from models.clip_regressor import CLIPRegressor, HeadConfig, PostBatcher, TargetTransform
from models.explain import Calibration, Reference, coverage
from training.baselines import beaten_by, beaten_message
from training.cache import EmbeddingCache
from training.config import PHASES, RESUME_MAY_DIFFER, DataRefused, TrainConfig
from training.data import (Collator, check_data, label_expression, make_loader, model_prepare_config, open_splits,
                           resolve_num_workers, split_rule)
from training.layout import new_run_dir, publish_latest
from training.loop import (NonFiniteGuard, embed_split, group_lrs, is_better, predict, score, start_phase,
                           train_one_epoch)
from training.state import (CHECKPOINT_DIR, Checkpoint, RunState, cpu_state, load_checkpoint, save_checkpoint,
                            set_rng_state)

log = logging.getLogger(__name__)

# RUN_DIR/config.json: the run's resolved training config, which --resume checks. A different file from
# the artifact's (RUN_DIR/model/config.json, models.artifact.CONFIG_FILE).
RUN_CONFIG_FILE = "config.json"


def check_resume_config(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse to resume with flags that would change what the run computes."""
    if not (run_dir / RUN_CONFIG_FILE).is_file():
        raise SystemExit(f"--resume: {run_dir} holds no run to resume (no {RUN_CONFIG_FILE})")
    saved = json.loads((run_dir / RUN_CONFIG_FILE).read_text())["args"]
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


def on_cpu() -> bool:
    """Run on the CPU when there is no CUDA; that is also what lets Accelerate run DDP over
    gloo on CPU processes."""
    return not torch.cuda.is_available()


def make_accelerator(cfg: TrainConfig, run_dir: Path):
    """Accelerate is the one seam for devices, mixed precision, processes and trackers."""
    from accelerate import Accelerator

    precision = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("no" if on_cpu() else "bf16")
    accelerator = Accelerator(cpu=on_cpu(), mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum,
                              log_with=None if cfg.report_to == "none" else cfg.report_to, project_dir=run_dir)
    resolve_num_workers(cfg, accelerator)  # its default depends on the device; config.json records the count used
    if cfg.report_to != "none":
        accelerator.init_trackers("train", config={k: v for k, v in config_dict(cfg).items()
                                                   if isinstance(v, (int, float, str, bool))})
    return accelerator, precision


def resolve_run_dir(cfg: TrainConfig, processes) -> Path:
    """``--out``, or a new ``runs/<timestamp>`` claimed by rank 0 and sent to every rank (their
    clocks may straddle a second); ``cfg.out`` records it either way. ``processes`` is
    Accelerate's ``PartialState``: the process group, before the Accelerator."""
    if cfg.out is None:
        from accelerate.utils import broadcast_object_list

        name = [str(new_run_dir()) if processes.is_main_process else None]
        if processes.num_processes > 1:
            broadcast_object_list(name)
        cfg.out = name[0]
        log.info("no --out: this run writes %s", cfg.out)
    return Path(cfg.out)


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
        write_json_atomic(run_dir / RUN_CONFIG_FILE, {"args": config_dict(cfg), "git_commit": git_commit(),
                                                    "num_processes": accelerator.num_processes,
                                                    "mixed_precision": precision, "data_meta": meta})
    return None


def setup(cfg: TrainConfig) -> Run:
    """Devices, data checks, run dir, target, model and loaders: everything before epoch 1."""
    from accelerate import PartialState
    from accelerate.utils import set_seed
    from transformers import CLIPProcessor

    t_start = time.perf_counter()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    processes = PartialState(cpu=on_cpu())  # the process group (several under torchrun); the Accelerator joins it
    if not processes.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)  # one rank tells the story
    # 1. Check the data against the processor before spending time on the model.
    # A local dir, a hub name the hub answers for, or its cached snapshot; never minutes of hub retries.
    clip_source = resolve_pretrained(cfg.clip_model)
    processor = CLIPProcessor.from_pretrained(clip_source)
    meta = check_data(cfg.data, processor.image_processor)
    datasets = open_splits(cfg.data)
    # 2. The run dir (a fresh one, or the checkpoint to continue), devices; the target's statistics.
    run_dir = resolve_run_dir(cfg, processes)
    accelerator, precision = make_accelerator(cfg, run_dir)
    log.info("config: %s", json.dumps(config_dict(cfg)))
    log.info("device %s, %d process(es), mixed precision %s, %d torch threads", accelerator.device,
             accelerator.num_processes, precision, torch.get_num_threads())
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
        pin_memory=accelerator.device.type == "cuda")) for s in datasets}
    run = Run(cfg, accelerator, precision, run_dir, meta, processor, prep, target, model, datasets, loaders, collate,
              state, weights, resumed, t_start)
    # 4. The frozen CLIP's embeddings, once: phase 1, the probe and the baselines run on them.
    if state.baselines is None or (state.test_after_frozen is None and (cfg.frozen_epochs or cfg.linear_probe_init)):
        run.cache = EmbeddingCache(model, datasets, collate, cfg, accelerator)
        state.cache_timings = state.cache_timings or run.cache.timings
        state.baselines = state.baselines or run.cache.baselines(target, prep.features.datetime_inputs())
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
    """Score the kept model on test; write metrics.json, predictions, plots and the artifact;
    point runs/latest at the run; end the log with the results and what they mean."""
    if wise is None and run.weights["best"] is not None:  # without WiSE-FT: the best epoch by val
        run.model.load_state_dict(run.weights["best"])
    pred, labels = predict(run.model, run.loaders["test"], run.accelerator, "test")
    scored = score(pred, labels, run.target)
    calibration, reference = calibrate(run)
    intervals = {"levels": calibration.half_widths, "n_calibration": calibration.n, "split": calibration.split,
                 "coverage_test": coverage(scored["z_true"], scored["z_pred"], calibration)}
    log.info("conformal intervals (model scale half-widths %s, from %d val posts): test coverage %s",
             calibration.half_widths, calibration.n, intervals["coverage_test"])
    metrics = final_metrics(run, wise, scored, intervals)
    if run.is_main:
        write_outputs(run, metrics, wise, scored, labels)
        path = save_model(run, metrics, wise, calibration, reference)
        log.info("wrote %s, metrics.json, plots and predictions in %s", path, run.run_dir)
        latest = publish_latest(run.run_dir)  # only now: the run is complete
        if latest is not None:
            log.info("%s -> %s", latest, run.run_dir.resolve().name)
        log_test_summary(metrics)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()


def final_metrics(run: Run, wise: dict | None, scored: dict, intervals: dict) -> dict:
    """metrics.json: the kept model on test, next to everything it is compared with, and
    what the figures mean (the split rule, the label)."""
    cfg, state, target = run.cfg, run.state, run.target
    total = state.seconds_before + time.perf_counter() - run.t_start
    return {
        "test": scored["model"], "test_label_units": scored["label"],
        "test_after_frozen": state.test_after_frozen, "probe": state.probe, "wise_ft": wise, "intervals": intervals,
        "baselines": state.baselines, "beaten_by": beaten_by(scored["model"]["r2"], state.baselines or {}),
        "best": state.best, "history": state.history,
        "timings": {"total_seconds": round(total, 3), **epoch_timings(state.history, state.cache_timings, cfg)},
        "scale": f"{target.kind} of the label (model scale); test_label_units in label units",
        "target_transform": dataclasses.asdict(target),
        # How the test posts were chosen: a random split's test R² is not next month's.
        "split": split_rule(run.meta),
        "data": {"dir": str(cfg.data), "counts": run.meta.get("counts"),
                 "cleaning_version": run.meta.get("cleaning_version"), "features": run.prep.features.names,
                 "label": label_expression(run.meta)},
        "num_processes": run.accelerator.num_processes, "mixed_precision": run.precision,
    }


def write_outputs(run: Run, metrics: dict, wise: dict | None, scored: dict, labels: np.ndarray) -> None:
    """metrics.json, predictions_test.csv and the two plots (rank 0)."""
    from training.plots import plot_learning_curves, plot_predictions

    cfg, state = run.cfg, run.state
    write_json_atomic(run.run_dir / "metrics.json", metrics)
    write_predictions(run.run_dir / "predictions_test.csv", [r.row for r in run.datasets["test"]], labels, scored)
    plot_learning_curves(state.history, cfg.frozen_epochs, run.run_dir / "learning_curves.png", cfg.select_metric,
                         probe=state.probe, wise_ft=wise)
    plot_predictions(scored["z_true"], scored["z_pred"], run.run_dir / "pred_vs_actual.png",
                     f"test, {run.target.kind} scale: R² {scored['model']['r2']:.3f}, "
                     f"RMSE {scored['model']['rmse']:.3f}")


def save_model(run: Run, metrics: dict, wise: dict | None, calibration: Calibration, reference: Reference) -> Path:
    """The artifact in RUN_DIR/model: weights, processor, config with the training record,
    the label it predicts, the table schema and the train/val post fingerprints (rank 0)."""
    cfg, state = run.cfg, run.state
    extra = {"training": {"args": config_dict(cfg), "git_commit": git_commit(), "best": state.best,
                          "wise_ft_alpha": wise and wise["chosen_alpha"],
                          "num_processes": run.accelerator.num_processes, "mixed_precision": run.precision,
                          "data": metrics["data"], "split": metrics["split"]},
             # what the prediction is (LabelExpr.to_dict(): "the sum of the post's 'likes' + ... counts")
             "label": metrics["data"]["label"],
             "metrics": {k: metrics[k] for k in ("test", "test_label_units", "test_after_frozen", "baselines")}}
    # The posts the model was fit (train) and calibrated (val) on, so the table scorer can
    # mark them; none for data preprocessed before fingerprints existed.
    seen = load_fingerprints(cfg.data, ("train", "val"))
    if seen is None:
        log.warning("%s has no post fingerprints: serving/predict.py will not be able to mark the posts "
                    "this model was trained on; re-run preprocess.py to get them", cfg.data)
    return save_artifact(run.model, run.processor, run.target, run.run_dir / "model", prepare=run.prep,
                         extra_config=extra, calibration=calibration, reference=reference,
                         table=run.meta.get("table"), fingerprints=seen)


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
    """The end of the log: one line per model (test R², model scale), how the test posts were
    chosen, and, plainly, any baseline that beats the kept model."""
    rows = [("fine-tuned (kept model)", metrics["test"])]
    if metrics["wise_ft"]:
        rows[0] = (f"fine-tuned, WiSE-FT alpha {metrics['wise_ft']['chosen_alpha']:g}", metrics["test"])
    rows += [("best frozen-phase model", metrics["test_after_frozen"]),
             ("linear probe (phase 1 start)", (metrics["probe"] or {}).get("test"))]
    rows += [(f"baseline {name}", m) for name, m in (metrics["baselines"] or {}).items()]
    log.info("test R² (model scale) and RMSE:\n%s", "\n".join(
        f"  {name:<34} r2 {m['r2']:.4f}  rmse {m['rmse']:.4f}" for name, m in rows if m))
    log.info("test posts: %s", metrics["split"]["description"])
    verdict = beaten_message(metrics["test"]["r2"], metrics["baselines"] or {})
    if verdict:
        log.warning("%s", verdict)
