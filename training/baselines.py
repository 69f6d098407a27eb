"""Reference models the fine-tuned CLIPRegressor has to beat, on the same test split.

All are fit on the train split and scored on the model scale (the target transform of
the label, log1p by default), with the same metric keys as the main model:

- ``mean``: the train mean, for every post (R² ~ 0 by construction).
- ``sentiment_linear``: a line through caption sentiment alone.
- ``frozen_clip_ridge``: RidgeCV on the initial, frozen CLIP embeddings [img, txt] plus
  sentiment, the precomputed-embedding design this project replaced. It reuses the
  phase-1 embedding cache, so it costs no extra CLIP pass.
"""

from __future__ import annotations

import numpy as np

from models.clip_regressor import regression_metrics

RIDGE_ALPHAS = np.logspace(-3, 4, 15)  # RidgeCV picks by efficient leave-one-out on train


def baseline_metrics(train: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """``train``/``test`` hold ``img`` (N, D), ``txt`` (N, D), ``sentiment`` (N,) and ``z`` (N,),
    the model-scale label. Returns ``{name: regression_metrics}`` on the test split."""
    from sklearn.linear_model import LinearRegression, RidgeCV

    def features(split):  # (N, 2D + 1)
        return np.hstack([split["img"], split["txt"], split["sentiment"][:, None]])

    z_train, z_test = train["z"], test["z"]
    preds = {
        "mean": np.full(len(z_test), z_train.mean()),
        "sentiment_linear": LinearRegression().fit(train["sentiment"][:, None], z_train)
                                              .predict(test["sentiment"][:, None]),
        "frozen_clip_ridge": RidgeCV(alphas=RIDGE_ALPHAS).fit(features(train), z_train).predict(features(test)),
    }
    return {name: regression_metrics(z_test, p) for name, p in preds.items()}
