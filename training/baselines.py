"""Reference models the fine-tuned CLIPRegressor has to beat, on the same test split.

All are fit on the train split and scored on the model scale (the target transform of
the label, log1p by default), with the same metric keys as the main model. Each sees the
encoded feature columns (``features``, (N, F), F = 0 without any) where it can, so the
comparison stays fair:

- ``mean``: the train mean, for every post (R² ~ 0 by construction).
- ``sentiment_linear``: a linear model on caption sentiment (plus the features).
- ``frozen_clip_ridge``: RidgeCV on the initial, frozen CLIP embeddings [img, txt] plus
  sentiment and the features: the precomputed-embedding design this project replaced.
  It reuses the phase-1 embedding cache, so it costs no extra CLIP pass.
- ``features_only`` (only with feature columns): RidgeCV on the features alone, so a user
  sees what the image and the caption add over the account data.
"""

from __future__ import annotations

import numpy as np

from models.clip_regressor import regression_metrics

RIDGE_ALPHAS = np.logspace(-3, 4, 15)  # RidgeCV picks by efficient leave-one-out on train


def baseline_metrics(train: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """``train``/``test`` hold ``img`` (N, D), ``txt`` (N, D), ``sentiment`` (N,), ``features``
    (N, F) and ``z`` (N,), the model-scale label. Returns ``{name: regression_metrics}`` on test."""
    from sklearn.linear_model import LinearRegression, RidgeCV

    def inputs(split, *keys):  # (N, sum of widths)
        return np.hstack([split[k][:, None] if split[k].ndim == 1 else split[k] for k in keys])

    def fit_predict(model, *keys):
        return model.fit(inputs(train, *keys), z_train).predict(inputs(test, *keys))

    z_train, z_test = train["z"], test["z"]
    preds = {
        "mean": np.full(len(z_test), z_train.mean()),
        "sentiment_linear": fit_predict(LinearRegression(), "sentiment", "features"),
        "frozen_clip_ridge": fit_predict(RidgeCV(alphas=RIDGE_ALPHAS), "img", "txt", "sentiment", "features"),
    }
    if train["features"].shape[1] > 0:
        preds["features_only"] = fit_predict(RidgeCV(alphas=RIDGE_ALPHAS), "features")
    return {name: regression_metrics(z_test, p) for name, p in preds.items()}
