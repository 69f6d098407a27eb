"""How sure a prediction is, and what drove it: conformal intervals and Shapley contributions.

- ``Calibration``: split conformal prediction (Vovk et al.; Lei et al., 2018). The absolute
  residuals of the final model on the validation split, on the model scale, give for each
  level L the half-width q_L = the ceil((n + 1) L)-th smallest residual: with n exchangeable
  calibration posts, a new post's ``[score - q_L, score + q_L]`` holds its true value with
  probability at least L. A constant width on the log1p scale is a multiplicative range in
  likes, the right shape for counts. The validation split also chose the kept epoch and the
  WiSE-FT alpha, so the quantile is slightly optimistic (docs/design-notes.md,
  "Intervals without MAPIE").
  MAPIE's ``SplitConformalRegressor`` computes the same quantile, but it wraps an sklearn
  estimator it fits or predicts with itself; here the predictions already exist and the
  quantile is five lines, so a dependency would only add an adapter.
- ``shapley``: exact Shapley values over input *groups* (image, caption, sentiment, each
  feature column) of the head's prediction. A group that is "absent" takes its reference
  value, the train mean (of the final model's embeddings, and of the encoded features),
  saved in the artifact. The head runs on embeddings, so the 2^k subsets cost only head
  evaluations. The contributions sum to the prediction minus the reference prediction.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

FIXED_GROUPS = ("image", "caption", "sentiment")


@dataclass
class Calibration:
    """Conformal half-widths on the model scale, per level, fitted on ``n`` posts of ``split``."""

    half_widths: dict[str, float] = field(default_factory=dict)  # "0.8" -> q
    n: int = 0
    split: str = "val"

    @classmethod
    def fit(cls, residuals: np.ndarray, levels: Sequence[float], split: str = "val") -> "Calibration":
        r = np.sort(np.abs(np.asarray(residuals, dtype=np.float64)))
        n = len(r)
        out = {}
        for level in levels:
            k = math.ceil((n + 1) * level)  # the finite-sample correction
            out[f"{level:g}"] = float(r[k - 1]) if k <= n else float("inf")
        return cls(out, n, split)

    def interval(self, score: torch.Tensor, level: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(low, high) on the model scale for (B,) model-scale scores."""
        q = self.half_widths[level]
        return score - q, score + q


def coverage(y_model_scale: np.ndarray, score: np.ndarray, cal: Calibration) -> dict[str, float]:
    """Fraction of posts whose true value lies in each level's interval."""
    err = np.abs(np.asarray(y_model_scale) - np.asarray(score))
    return {level: float(np.mean(err <= q)) for level, q in cal.half_widths.items()}


@dataclass
class Reference:
    """The 'absent' value of each input group: train means, saved with the model."""

    img: torch.Tensor  # (D,)
    txt: torch.Tensor  # (D,)
    sentiment: torch.Tensor  # () scalar
    features: torch.Tensor  # (F,)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"img": self.img, "txt": self.txt, "sentiment": self.sentiment.reshape(1), "features": self.features}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "Reference":
        return cls(t["img"], t["txt"], t["sentiment"].reshape(()), t["features"])

    @classmethod
    def mean_of(cls, img, txt, sentiment, features) -> "Reference":
        return cls(img.float().mean(0), txt.float().mean(0), sentiment.float().mean(), features.float().mean(0))


def _shapley_weights(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(2^k, k) membership of every subset, and (2^k, k) signed Shapley weights such that
    phi = weights.T @ v for the subset values v."""
    subsets = torch.tensor(list(itertools.product((0, 1), repeat=k)), dtype=torch.bool)  # (2^k, k)
    size = subsets.sum(1)
    w = torch.zeros(len(subsets), k, dtype=torch.float64)
    for i in range(k):
        # phi_i = sum over S without i of |S|! (k-|S|-1)! / k! [v(S + i) - v(S)]
        with_i = subsets[:, i]
        s = size - with_i.long()  # |S| for S = the subset without i
        weight = torch.tensor([math.factorial(int(m)) * math.factorial(k - int(m) - 1) / math.factorial(k)
                               for m in s], dtype=torch.float64)
        w[:, i] = torch.where(with_i, weight, -weight)
    return subsets, w


@torch.no_grad()
def shapley(model, img, txt, sentiment, features, ref: Reference, feature_slices: dict[str, slice]) -> tuple:
    """Exact Shapley values of the head's (standardised) output over the input groups.

    Returns ``(groups, phi (B, k) float64, f(x) (B,), f(reference) scalar)``;
    ``phi.sum(1) == f(x) - f(reference)`` up to float error.
    """
    groups = list(FIXED_GROUPS) + list(feature_slices)
    k, b = len(groups), img.shape[0]
    subsets, weights = _shapley_weights(k)
    feat_group = torch.zeros(features.shape[1], dtype=torch.long)  # feature input -> group index
    for j, name in enumerate(feature_slices):
        feat_group[feature_slices[name]] = 3 + j
    values = []
    for mask in subsets:  # 2^k head evaluations, each on the whole batch
        pick = lambda on, x, r: x if on else r.expand_as(x)  # noqa: E731 - a one-line selector
        f_mask = mask[feat_group] if features.shape[1] else torch.zeros(0, dtype=torch.bool)
        f_in = torch.where(f_mask, features.float(), ref.features.expand_as(features))
        x = model.head_input(pick(mask[0], img.float(), ref.img), pick(mask[1], txt.float(), ref.txt),
                             pick(mask[2], sentiment.float(), ref.sentiment), f_in)
        values.append(model.head(x).double())
    v = torch.stack(values)  # (2^k, B)
    phi = (weights.T @ v).T  # (B, k)
    return groups, phi, v[-1], float(v[0, 0]) if b else 0.0
