"""The two steps around fine-tuning that keep it from making things worse (LP-FT, WiSE-FT).

- ``fit_ridge``: the linear probe. Closed-form ridge regression of the standardised target
  on the frozen head inputs, with its penalty chosen on the validation split. Phase 1 starts
  the head's linear path at this solution (Kumar et al., 2022: fine-tuning from a good
  probe distorts pretrained features less than fine-tuning from a random head).
- ``interpolate``: WiSE-FT's weight-space ensemble (Wortsman et al., 2022),
  theta(alpha) = (1 - alpha) theta_phase1 + alpha theta_phase2. alpha = 0 is the phase-1
  model, so choosing alpha on validation never ends below phase 1 there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-3, 4, 15))


@dataclass
class RidgeFit:
    """A fitted linear probe: ``x @ weight + bias`` predicts the standardised target."""

    weight: torch.Tensor  # (D,) float32
    bias: float
    alpha: float  # the chosen L2 penalty
    val_mse: dict[float, float]  # penalty -> validation MSE (standardised scale)


def fit_ridge(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
              alphas=RIDGE_ALPHAS) -> RidgeFit:
    """Ridge on centred data for every penalty at once (one SVD), the best on val kept.

    ``x``: (N, D) head inputs, ``y``: (N,) standardised targets. The intercept is not
    penalised. float64 throughout: the SVD of a 1,500-wide matrix loses digits in float32.
    """
    x, y = x_train.double(), y_train.double()
    x_mean, y_mean = x.mean(0), y.mean()
    u, s, vh = torch.linalg.svd(x - x_mean, full_matrices=False)  # (N, K), (K,), (K, D)
    uty = u.T @ (y - y_mean)  # (K,)
    best, val_mse = None, {}
    for a in alphas:
        w = vh.T @ (s / (s ** 2 + a) * uty)  # (D,)
        b = y_mean - x_mean @ w
        mse = float(((x_val.double() @ w + b - y_val.double()) ** 2).mean())
        val_mse[float(a)] = mse
        if best is None or mse < best[0]:
            best = (mse, w, b, float(a))
    _, w, b, a = best
    return RidgeFit(w.float(), float(b), a, val_mse)


def interpolate(theta0: dict[str, torch.Tensor], theta1: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) theta0 + alpha theta1 for floating-point tensors; others (e.g. integer
    position ids) are the same in both and are taken from ``theta1``."""
    if theta0.keys() != theta1.keys():
        raise ValueError("WiSE-FT needs two states of the same model")
    return {k: torch.lerp(theta0[k], v, alpha) if v.is_floating_point() else v.clone()
            for k, v in theta1.items()}
