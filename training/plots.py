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
                         select_metric: str = "val_rmse") -> Path:
    """Train loss and validation metrics per epoch, with the freeze/unfreeze boundary marked.

    ``train_loss`` is the MSE on the standardised target; ``val_rmse`` is on the model scale.
    """
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss (standardised MSE)")
    ax_loss.set_ylabel("loss")
    ax_val.plot(epochs, [h["val_rmse"] for h in history], "o-", color="tab:orange", label="val RMSE (model scale)")
    ax_val.set_ylabel("RMSE")
    ax_r2 = ax_val.twinx()
    ax_r2.plot(epochs, [h["val_r2"] for h in history], "s--", color="tab:green", label="val R²")
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
    fig.suptitle(f"learning curves (model selected by {select_metric})")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
