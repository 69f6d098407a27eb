"""PNG plots of a training run (matplotlib, Agg backend: no display needed).

Both functions take plain numbers (the ``history`` list of metrics.json, arrays of
predictions), so a finished run can be re-plotted from its files alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and training servers have no display
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(history: Sequence[dict], frozen_epochs: int, path: str | Path,
                         select_metric: str = "val_rmse", probe: dict | None = None,
                         wise_ft: dict | None = None) -> Path:
    """Train loss and validation metrics per epoch, the freeze/unfreeze boundary marked; the
    linear probe phase 1 started from at epoch 0; and, with WiSE-FT, its validation curve
    over alpha with the kept alpha marked.

    ``train_loss`` is the MSE on the standardised target; ``val_rmse`` is on the model scale.
    """
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3 if wise_ft else 2, figsize=(16 if wise_ft else 11, 4))
    ax_loss, ax_val = axes[0], axes[1]
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss (standardised MSE)")
    ax_loss.set_ylabel("loss")
    ax_val.plot(epochs, [h["val_rmse"] for h in history], "o-", color="tab:orange", label="val RMSE (model scale)")
    ax_val.set_ylabel("RMSE")
    ax_r2 = ax_val.twinx()
    ax_r2.plot(epochs, [h["val_r2"] for h in history], "s--", color="tab:green", label="val R²")
    if probe:
        ax_val.plot([0], [probe["val"]["rmse"]], "*", ms=12, color="tab:orange", label="linear probe (start)")
        ax_r2.plot([0], [probe["val"]["r2"]], "*", ms=12, color="tab:green")
    ax_r2.set_ylabel("R²")
    for ax in (ax_loss, ax_val):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if 0 < frozen_epochs < (epochs[-1] if epochs else 0):
            # Between the last frozen and the first fine-tuning epoch.
            ax.axvline(frozen_epochs + 0.5, color="grey", ls=":", label="unfreeze CLIP")
    ax_loss.legend(fontsize=8)
    lines = ax_val.get_legend_handles_labels()
    lines_r2 = ax_r2.get_legend_handles_labels()
    ax_val.legend(lines[0] + lines_r2[0], lines[1] + lines_r2[1], fontsize=8, loc="center left")
    if wise_ft:
        _plot_wise_ft(axes[2], wise_ft)
    fig.suptitle(f"learning curves (model selected by {select_metric})")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_wise_ft(ax, wise_ft: dict) -> None:
    """Validation R² and RMSE of theta(alpha), alpha = 0 the phase-1 model, 1 the fine-tuned one."""
    alphas = [p["alpha"] for p in wise_ft["curve"]]
    ax.plot(alphas, [p["val_r2"] for p in wise_ft["curve"]], "s-", color="tab:green", label="val R²")
    ax_rmse = ax.twinx()
    ax_rmse.plot(alphas, [p["val_rmse"] for p in wise_ft["curve"]], "o--", color="tab:orange", label="val RMSE")
    ax_rmse.set_ylabel("RMSE")
    ax.axvline(wise_ft["chosen_alpha"], color="grey", ls=":", label=f"kept alpha {wise_ft['chosen_alpha']:g}")
    ax.set_xlabel("WiSE-FT alpha: (1-a) phase 1 + a phase 2")
    ax.set_ylabel("R²")
    ax.grid(alpha=0.3)
    lines, lines2 = ax.get_legend_handles_labels(), ax_rmse.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8)
    ax.set_title("weight interpolation on val", fontsize=9)


def plot_predictions(y_true, y_pred, path: str | Path, title: str) -> Path:
    """Scatter of predicted vs actual with the identity line (both on the same scale)."""
    import numpy as np

    plt = _pyplot()
    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(y_true, y_pred, s=8, alpha=0.5)
    lo, hi = float(min(y_true.min(), y_pred.min())), float(max(y_true.max(), y_pred.max()))
    ax.plot([lo, hi], [lo, hi], color="grey", ls="--", lw=1, label="y = x")
    ax.set_xlabel("actual")
    ax.set_ylabel("predicted")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
