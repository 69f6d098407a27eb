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
- ``features_without_time`` (only with a timestamp column): the same without the inputs of
  the timestamp columns, so a user sees what the posting time adds.

When one of them beats the kept model on test, ``beaten_message`` says so, plainly, at the
end of the training log (and metrics.json lists them: ``beaten_by``).
"""

from __future__ import annotations

import numpy as np

from common.metrics import regression_metrics

RIDGE_ALPHAS = np.logspace(-3, 4, 15)  # RidgeCV picks by efficient leave-one-out on train


def baseline_metrics(train: dict[str, np.ndarray], test: dict[str, np.ndarray],
                     time_inputs: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """``train``/``test`` hold ``img`` (N, D), ``txt`` (N, D), ``sentiment`` (N,), ``features``
    (N, F) and ``z`` (N,), the model-scale label; ``time_inputs`` (F,) marks the feature inputs of
    timestamp columns. Returns ``{name: regression_metrics}`` on test."""
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
    if time_inputs is not None and time_inputs.any() and not time_inputs.all():
        keep = ~time_inputs
        preds["features_without_time"] = RidgeCV(alphas=RIDGE_ALPHAS).fit(
            train["features"][:, keep], z_train).predict(test["features"][:, keep])
    return {name: regression_metrics(z_test, p) for name, p in preds.items()}


# What it means when a baseline beats the kept model on test, and what to try.
BEATEN_HINTS = {
    "mean": "the model predicts the test posts worse than the train mean does: it learned nothing that holds "
            "on them (too few posts, or a test split unlike train)",
    "sentiment_linear": "a linear model on caption sentiment (and the feature columns) does better: the image "
                        "and caption embeddings add nothing here",
    "frozen_clip_ridge": "a ridge regression on the frozen CLIP embeddings does better: fine-tuning hurt; try a "
                         "lower --clip-lr or fewer --finetune-epochs",
    "features_only": "the feature columns alone do better: the image and caption add nothing the model could "
                     "use on this data",
    "features_without_time": "the feature columns without the posting time do better: the image and caption "
                             "add nothing the model could use on this data",
}


def beaten_by(model_r2: float, baselines: dict[str, dict[str, float]]) -> list[str]:
    """Names of the baselines with a higher test R² than the kept model's, best first."""
    winners = [name for name, m in baselines.items() if m["r2"] > model_r2]  # NaN never wins
    return sorted(winners, key=lambda name: -baselines[name]["r2"])


def beaten_message(model_r2: float, baselines: dict[str, dict[str, float]]) -> str | None:
    """One plain paragraph for the end of the training log when a baseline beats the kept
    model on test (both R², model scale), or None when none does."""
    winners = beaten_by(model_r2, baselines)
    if not winners:
        return None
    best = winners[0]
    text = (f"baseline {best} beats the kept model on test: R² {baselines[best]['r2']:.4f} against the kept "
            f"model's {model_r2:.4f} (model scale).")
    hint = BEATEN_HINTS.get(best)
    if hint:
        text += f" {hint[0].upper()}{hint[1:]}."
    if len(winners) > 1:
        text += " Also ahead of it: " + ", ".join(f"{n} (R² {baselines[n]['r2']:.4f})" for n in winners[1:]) + "."
    return text
