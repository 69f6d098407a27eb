"""Tests for data_preprocessing/make_demo_data.py on small generated sets (n = 50)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_preprocessing import make_demo_data as mdd
from data_preprocessing.prepare import load_image, sentiment

REPO_ROOT = Path(__file__).resolve().parents[1]
N, SEED = 50, 3


def read_posts(root: Path) -> pd.DataFrame:
    # keep_default_na=False: an empty caption must read back as "", not NaN
    return pd.read_csv(root / "posts.csv", keep_default_na=False, dtype={"description": str})


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Same seed in-process and with 2 workers, plus another seed: {name: (dir, meta)}."""
    out = {}
    for name, seed, workers in [("one", SEED, 1), ("two", SEED, 2), ("other", SEED + 1, 1)]:
        d = tmp_path_factory.mktemp(name)
        out[name] = (d, mdd.make_posts(d, n=N, seed=seed, workers=workers, progress=False))
    return out


def test_same_seed_is_byte_identical_whatever_the_workers(sets):
    a, b = sets["one"][0], sets["two"][0]
    for name in ("posts.csv", "truth.csv", "meta.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    imgs = sorted(p.name for p in (a / "images").glob("*.jpg"))
    assert len(imgs) == N and imgs == sorted(p.name for p in (b / "images").glob("*.jpg"))
    for name in imgs:
        assert (a / "images" / name).read_bytes() == (b / "images" / name).read_bytes(), name


def test_another_seed_differs(sets):
    a, c = sets["one"][0], sets["other"][0]
    assert (a / "posts.csv").read_bytes() != (c / "posts.csv").read_bytes()
    same = sum((a / "images" / f"{i:06d}.jpg").read_bytes() == (c / "images" / f"{i:06d}.jpg").read_bytes()
               for i in range(10))
    assert same == 0


def test_posts_csv_columns_and_paths(sets):
    root = sets["one"][0]
    df = read_posts(root)
    assert list(df.columns) == ["image_path", "description", "engagement", "followers", "platform", "posted_hour"]
    assert len(df) == N
    assert all(re.fullmatch(r"images/\d{6}\.jpg", p) for p in df["image_path"])
    assert all((root / p).is_file() for p in df["image_path"])


def test_images_are_jpegs_of_varied_size_and_shape(sets):
    root = sets["one"][0]
    shapes = set()
    for p in read_posts(root)["image_path"]:
        with Image.open(root / p) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            w, h = im.size
        assert mdd.MIN_SIDE <= w <= mdd.MAX_SIDE and mdd.MIN_SIDE <= h <= mdd.MAX_SIDE
        shapes.add("square" if w == h else "landscape" if w > h else "portrait")
    assert shapes == {"square", "landscape", "portrait"}


def test_captions_look_like_real_posts(sets):
    caps = list(read_posts(sets["one"][0])["description"])
    joined = "\n".join(caps)
    assert re.search(r"(?<![\w#])#[A-Za-z]\w+", joined), "no hashtags"
    assert re.search(r"(?<![\w@])@\w+", joined), "no mentions"
    assert re.search(r"(https?://|www\.)\S+", joined), "no URLs"
    assert any(unicodedata.category(ch) == "So" for ch in joined), "no emoji"
    assert "&amp;" in joined
    assert any(c != c.lower() and c != c.upper() for c in caps), "no mixed case"
    assert "!" in joined
    # sentiment must vary in both directions, or VADER has nothing to learn from
    compounds = [sentiment(c)["compound"] for c in caps]
    assert min(compounds) < -0.3 and max(compounds) > 0.3


def test_labels_are_heavy_tailed_counts(sets):
    likes = read_posts(sets["one"][0])["engagement"]
    assert likes.dtype.kind == "i" and (likes >= 0).all()
    assert likes.mean() > likes.median()
    logs = np.log1p(likes.to_numpy())
    assert 0.0 <= logs.min() and logs.max() <= 12.0 and logs.std() > 0.8


def documented_f(a: dict, c: dict) -> float:
    """The label law written out from the module docstring and meta.json's coefficients,
    independently of ``LabelLaw.terms``: a wrong term there cannot also be wrong here."""
    cap = a["caption_topic"]
    agreement = 0.0 if cap == "" else (c["agree_bonus"] if cap == a["image_topic"] else -c["mismatch_penalty"])
    return (c["base"] + c["image_topic"][a["image_topic"]]
            + c["brightness_coef"] * (a["brightness"] - c["brightness_center"])
            + c["colourfulness_coef"] * (a["colourfulness"] - c["colourfulness_center"])
            + c["objects_coef"] * min(a["n_objects"], c["objects_cap"])
            + c["caption_topic"].get(cap, 0.0) + c["hashtags_coef"] * math.log1p(a["n_hashtags"])
            + c["cta_coef"] * a["cta"] + c["length_coef"] * min(a["n_words"], c["length_cap"]) / c["length_cap"]
            + c["sentiment_coef"] * a["sentiment"] + agreement
            + c["followers_coef"] * (math.log1p(a["followers"]) - c["followers_center"])
            + c["platform"][a["platform"]]
            + c["hour_amp"] * math.cos(2 * math.pi * (a["posted_hour"] - c["hour_peak"]) / 24))


def test_account_columns_are_heavy_tailed_with_empty_cells(tmp_path):
    meta = mdd.make_posts(tmp_path, n=400, seed=0, workers=1, progress=False)
    posts = read_posts(tmp_path)
    truth = pd.read_csv(tmp_path / "truth.csv", keep_default_na=False)
    followers = posts["followers"].astype(float)
    assert followers.max() / followers.median() > 20  # a heavy tail, as real follower counts have
    for col in ("platform", "posted_hour"):
        empty = posts[col].astype(str) == ""
        assert list(empty) == list(truth[f"{col}_missing"]), col  # truth.csv records which cells are hidden
        assert 0 < empty.sum() < 0.15 * len(posts), col
    hours = posts.loc[posts["posted_hour"] != "", "posted_hour"].astype(int)
    assert hours.min() >= 0 and hours.max() <= 23
    # the account terms carry a large share of the variance: ignoring them costs R²
    assert meta["r2_ceiling_observed"] - meta["r2_ceiling_without_features"] > 0.3


def test_truth_matches_the_documented_law(sets):
    """f in truth.csv is LAW.f of the saved attributes, and sentiment is that of the raw caption."""
    root, meta = sets["one"]
    truth = pd.read_csv(root / "truth.csv", keep_default_na=False, dtype={"caption_topic": str})
    posts = read_posts(root)
    assert list(truth["image_path"]) == list(posts["image_path"])
    assert list(truth["engagement"]) == list(posts["engagement"])
    for row, caption in zip(truth.to_dict("records"), posts["description"]):
        assert row["sentiment"] == pytest.approx(sentiment(caption)["compound"], abs=1e-6)
        assert row["f"] == pytest.approx(documented_f(row, meta["coefficients"]), abs=1e-5)
        assert row["engagement"] == max(0, round(math.expm1(row["y"])))
    assert meta["coefficients"]["sigma"] == meta["sigma"] == mdd.LAW.sigma
    assert meta["label_function_doc"] == mdd.label_function_doc()


def test_measured_visual_attributes_survive_jpeg(sets):
    """The label uses brightness/colourfulness measured before encoding; the JPEG must keep them."""
    root = sets["one"][0]
    truth = pd.read_csv(root / "truth.csv", keep_default_na=False)
    for row in truth.head(10).to_dict("records"):
        b, c = mdd.measure_image(load_image(root / row["image_path"]))
        assert b == pytest.approx(row["brightness"], abs=0.02)
        assert c == pytest.approx(row["colourfulness"], abs=0.03)
    assert truth["brightness"].max() - truth["brightness"].min() > 0.3


def test_meta_ceilings_match_a_recomputation(sets):
    root, meta = sets["one"]
    assert json.loads((root / "meta.json").read_text()) == meta
    assert (meta["n"], meta["seed"], meta["generator_version"]) == (N, SEED, mdd.GENERATOR_VERSION)
    truth = pd.read_csv(root / "truth.csv", keep_default_na=False)
    f = truth["f"].to_numpy()
    y = np.log1p(read_posts(root)["engagement"].to_numpy())
    theo = f.var() / (f.var() + meta["sigma"] ** 2)
    emp = 1 - np.sum((y - f) ** 2) / np.sum((y - y.mean()) ** 2)
    assert 0 < meta["r2_ceiling_theoretical"] < 1 and 0 < meta["r2_ceiling_empirical"] < 1
    assert meta["r2_ceiling_theoretical"] == pytest.approx(theo, abs=1e-4)
    assert meta["r2_ceiling_empirical"] == pytest.approx(emp, abs=1e-4)
    content = truth["f_content"].to_numpy()
    blind = content + (f - content).mean()
    assert meta["r2_ceiling_without_features"] == pytest.approx(
        1 - np.sum((y - blind) ** 2) / np.sum((y - y.mean()) ** 2), abs=1e-4)
    assert meta["label_stats"]["mean"] > meta["label_stats"]["median"]


def test_agreement_is_an_interaction():
    base = {"image_topic": "pets", "brightness": 0.4, "colourfulness": 0.3, "n_objects": 2,
            "n_hashtags": 3, "cta": 0, "n_words": 10, "sentiment": 0.0, "followers": 3000, "platform": "x",
            "posted_hour": 12}
    t = {cap: mdd.LAW.terms({**base, "caption_topic": cap})["agreement"] for cap in ("pets", "city", "")}
    assert t == {"pets": mdd.LAW.agree_bonus, "city": -mdd.LAW.mismatch_penalty, "": 0.0}
    # the same caption topic flips sign with the image topic: no additive term can do that
    other = mdd.LAW.terms({**base, "image_topic": "city", "caption_topic": "city"})["agreement"]
    assert other == mdd.LAW.agree_bonus


def test_refuses_to_mix_with_an_existing_set(sets):
    root = sets["one"][0]
    before = (root / "posts.csv").read_bytes()
    with pytest.raises(FileExistsError):
        mdd.make_posts(root, n=5, seed=0, workers=1, progress=False)
    assert (root / "posts.csv").read_bytes() == before


def test_config_rejects_bad_values():
    with pytest.raises(SystemExit):
        mdd.parse_config(mdd.DemoDataConfig, ["--out", "x", "--n", "0"])
    cfg = mdd.parse_config(mdd.DemoDataConfig, ["--out", "x"])
    assert (cfg.n, cfg.seed, cfg.workers) == (2000, 0, 0)


def test_cli_help_and_module_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": ""}
    helped = subprocess.run([sys.executable, "data_preprocessing/make_demo_data.py", "--help"], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr
    assert "--workers" in helped.stdout and "--seed" in helped.stdout
    out = tmp_path / "demo"
    ran = subprocess.run([sys.executable, "-m", "data_preprocessing.make_demo_data", "--out", str(out),
                          "--n", "20"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert "best achievable R^2" in ran.stdout
    assert len(read_posts(out)) == 20 and len(list((out / "images").glob("*.jpg"))) == 20
    assert json.loads((out / "meta.json").read_text())["n"] == 20
