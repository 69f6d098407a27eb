"""models/explain.py: conformal calibration and exact Shapley contributions over input groups."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from models.explain import Calibration, Reference, coverage, shapley


def test_conformal_quantile_has_the_finite_sample_correction():
    r = np.arange(1, 10, dtype=float)  # n = 9 residuals 1..9
    cal = Calibration.fit(-r, [0.8, 0.5, 0.95])  # signs do not matter
    # ceil((9 + 1) * 0.8) = 8th smallest; ceil(10 * 0.5) = 5th; ceil(10 * 0.95) = 10 > n: infinite
    assert cal.half_widths == {"0.8": 8.0, "0.5": 5.0, "0.95": math.inf} and cal.n == 9


def test_conformal_coverage_on_exchangeable_data():
    rng = np.random.default_rng(0)
    cal = Calibration.fit(rng.normal(0, 1, 2000), [0.8])
    y = rng.normal(0, 1, 20000)
    assert coverage(y, np.zeros_like(y), cal)["0.8"] == pytest.approx(0.8, abs=0.01)


class _Head:
    """A head with an interaction: shapley must handle non-additive models exactly."""

    @staticmethod
    def head_input(img, txt, sentiment, features):
        return torch.cat([img, txt, img * txt, sentiment.unsqueeze(-1), features], dim=-1)

    def __init__(self, d, f):
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(3 * d + 1 + f, generator=g)

    def head(self, x):
        return torch.tanh(x @ self.w) + (x[:, :2] ** 2).sum(-1)


def _brute_force(fn, k):
    """Shapley values from the definition, over permutations."""
    phi = np.zeros(k)
    perms = list(itertools.permutations(range(k)))
    for p in perms:
        on = set()
        for i in p:
            before = fn(frozenset(on))
            on.add(i)
            phi[i] += fn(frozenset(on)) - before
    return phi / len(perms)


def test_shapley_is_exact_and_sums_to_prediction_minus_reference():
    d, b = 4, 3
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    sentiment, features = torch.rand(b, generator=g), torch.randn(b, 5, generator=g)
    ref = Reference.mean_of(torch.randn(10, d, generator=g), torch.randn(10, d, generator=g),
                            torch.rand(10, generator=g), torch.randn(10, 5, generator=g))
    slices = {"followers": slice(0, 2), "platform": slice(2, 5)}
    model = _Head(d, 5)
    groups, phi, fx, fref = shapley(model, img, txt, sentiment, features, ref, slices)
    assert groups == ["image", "caption", "sentiment", "followers", "platform"]
    np.testing.assert_allclose(phi.sum(1).numpy(), (fx - fref).numpy(), atol=1e-5)
    np.testing.assert_allclose(fx.numpy(), model.head(model.head_input(img, txt, sentiment, features)).numpy(),
                               atol=1e-6)

    def value(post, on):  # the model with the groups in ``on`` from the post, the rest from ref
        f = features[post].clone()
        for j, s in enumerate(slices.values()):
            if 3 + j not in on:
                f[s] = ref.features[s]
        x = model.head_input((img[post] if 0 in on else ref.img)[None], (txt[post] if 1 in on else ref.txt)[None],
                             (sentiment[post] if 2 in on else ref.sentiment).reshape(1), f[None])
        return float(model.head(x))

    for post in range(b):
        np.testing.assert_allclose(phi[post].numpy(), _brute_force(lambda on: value(post, on), 5), atol=1e-5)
