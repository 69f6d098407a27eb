"""Regression metrics: the one definition training, the baselines and the table scorer share.

Every score this project reports (metrics.json's ``test``/``val``, the baselines, the
table scorer's summary, BENCHMARKS.md's quality section) comes from ``regression_metrics``,
so the keys and their meaning are the same everywhere. It lives here, outside ``models/``,
because it scores arrays, not a model: ``serving/predict.py`` and ``training/baselines.py``
use it without needing anything that builds or loads one.
"""

from __future__ import annotations

import math

import numpy as np


def regression_metrics(y_true, y_pred) -> dict[str, float]:
    """rmse, mae, r2, pearson, spearman of two 1-D arrays (same keys everywhere)."""
    from scipy.stats import pearsonr, spearmanr  # scipy is slow to import; only scorers pay for it

    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    err = y_pred - y_true
    ss_tot = float(((y_true - y_true.mean()) ** 2).sum())
    const = np.ptp(y_pred) == 0 or np.ptp(y_true) == 0  # correlations undefined: report 0
    return {
        "rmse": float(math.sqrt((err ** 2).mean())),
        "mae": float(np.abs(err).mean()),
        "r2": float(1.0 - (err ** 2).sum() / ss_tot) if ss_tot > 0 else 0.0,
        "pearson": 0.0 if const else float(pearsonr(y_true, y_pred)[0]),
        "spearman": 0.0 if const else float(spearmanr(y_true, y_pred)[0]),
    }
