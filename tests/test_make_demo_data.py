"""Tests for data_preprocessing/make_demo_data.py on small generated sets (n = 50, and one
export of 400 posts for the statistical checks)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import unicodedata
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_preprocessing import make_demo_data as mdd
from data_preprocessing.features import FeatureColumn, FeatureSchema, parse_column_specs
from data_preprocessing.leakage import check_outcome_columns, label_correlation_warnings
from data_preprocessing.prepare import load_image, sentiment

REPO_ROOT = Path(__file__).resolve().parents[1]
N, SEED = 50, 3


def read_posts(root: Path) -> pd.DataFrame:
    # keep_default_na=False: an empty caption must read back as "", not NaN
    return pd.read_csv(root / "posts.csv", keep_default_na=False, dtype={"description": str})


def read_truth(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "truth.csv", keep_default_na=False, dtype={"caption_topic": str})


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


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """400 posts (40 accounts, ~3 posts in the last week): (dir, meta, posts, truth)."""
    d = tmp_path_factory.mktemp("export")
    meta = mdd.make_posts(d, n=400, seed=0, workers=1, progress=False)
    return d, meta, read_posts(d), read_truth(d)


def test_posts_csv_is_an_export(sets):
    root = sets["one"][0]
    df = read_posts(root)
    # the documented default format's three columns keep their names; no posted_hour
    assert list(df.columns) == ["post_id", "account_id", "posted_at", "image_path", "description", "engagement",
                                "likes", "comments", "followers", "platform", "reach"]
    assert len(df) == N and df["post_id"].is_unique
    assert all(re.fullmatch(r"images/\d{6}\.jpg", p) for p in df["image_path"])
    assert all((root / p).is_file() for p in df["image_path"])
    # Instagram Graph API timestamps, UTC
    assert all(re.fullmatch(r"20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d\+0000", t) for t in df["posted_at"])
    assert (df["engagement"] == df["likes"] + df["comments"]).all()


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
    independently of ``LabelLaw.terms``: a wrong term there cannot also be wrong here. The
    local time is derived here from posted_at, not read from truth.csv."""
    local = datetime.strptime(a["posted_at"], "%Y-%m-%dT%H:%M:%S%z").astimezone(ZoneInfo("America/New_York"))
    hour = local.hour + local.minute / 60 + local.second / 3600
    as_of = datetime.fromisoformat(c["as_of"])
    years = ((as_of - datetime.strptime(a["posted_at"], "%Y-%m-%dT%H:%M:%S%z")).total_seconds() / 86400
             - c["span_days"] / 2) / -365.25
    c = c["coefficients"]
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
            + c["platform"][a["platform"]] + a["account_effect"]
            + c["hour_amp"] * math.cos(2 * math.pi * (hour - c["hour_peak"]) / 24)
            + c["weekday_amp"] * math.cos(2 * math.pi * (local.weekday() - c["weekday_peak"]) / 7)
            + c["drift_per_year"] * years)


def test_accounts_are_consistent_and_heavy_tailed_with_empty_cells(export):
    _, meta, posts, truth = export
    assert meta["n_accounts"] == 40 and posts["account_id"].nunique() > 30
    followers = posts["followers"].astype(float)
    assert followers.max() / followers.median() > 10  # a heavy tail, as real follower counts have
    # an account has one follower count and one platform (where the cell is not empty)
    by_account = posts[posts["platform"] != ""].groupby("account_id")
    assert (by_account["followers"].nunique() == 1).all() and (by_account["platform"].nunique() == 1).all()
    empty = posts["platform"] == ""
    assert list(empty) == list(truth["platform_missing"])  # truth.csv records which cells are hidden
    assert 0 < empty.sum() < 0.15 * len(posts)
    # the other columns' terms carry a large share of the variance: ignoring them costs R²
    assert meta["r2_ceiling_observed"] - meta["r2_ceiling_without_features"] > 0.3
    # an account never seen costs its effect, and no more
    assert 0 < meta["r2_ceiling_observed"] - meta["r2_ceiling_new_accounts"] < 0.1


def test_posts_span_18_months_before_the_export(export):
    _, meta, posts, _ = export
    times = [datetime.strptime(t, "%Y-%m-%dT%H:%M:%S%z") for t in posts["posted_at"]]
    as_of = datetime.fromisoformat(meta["as_of"])
    assert as_of == datetime(2025, 6, 30, 12, tzinfo=timezone.utc) == mdd.AS_OF
    assert max(times) <= as_of and 500 < (as_of - min(times)).days <= mdd.SPAN_DAYS
    local_hours = {t.astimezone(ZoneInfo(meta["timezone"])).hour for t in times}
    assert local_hours == set(range(24))


def test_recent_posts_carry_unfinished_counts(export):
    _, meta, posts, truth = export
    young = truth["age_days"] < mdd.LABEL_FINAL_DAYS
    assert meta["n_unfinished"] == young.sum() and 1 <= young.sum() <= 10  # a few, in the last week
    final = truth["engagement_final"]
    assert (posts.loc[~young, "engagement"] == final[~young]).all()
    assert (posts.loc[young, "engagement"] <= final[young]).all()
    # the export shows a share of the final counts, lower the younger the post (maturity)
    shown = posts.loc[young, "engagement"].sum() / final[young].sum()
    assert 0.3 < shown < 0.9 and shown == pytest.approx(
        np.average(truth.loc[young, "maturity"], weights=final[young]), abs=0.1)
    # the flags that drop them are written down for preprocess.py
    flags = meta["preprocess_flags"]
    assert flags[flags.index("--as-of") + 1] == meta["as_of"]
    assert flags[flags.index("--min-label-age-days") + 1] == str(mdd.LABEL_FINAL_DAYS)
    assert flags[flags.index("--split") + 1] == "time:posted_at"


def test_reach_is_an_outcome_the_rules_keep_out(export):
    _, meta, posts, truth = export
    final = truth["age_days"] >= mdd.LABEL_FINAL_DAYS
    warn = label_correlation_warnings({"reach": list(posts.loc[final, "reach"].astype(float))},
                                      list(posts.loc[final, "engagement"].astype(float)))
    assert [w["column"] for w in warn] == ["reach"]  # it tracks the label
    assert check_outcome_columns(meta["outcome_columns"], allow=True) == ["likes", "comments", "reach"]
    feature_names = [c for cols in meta["feature_columns"].values() for c in cols]
    assert check_outcome_columns(feature_names, allow=False) == []  # followers, platform, posted_at are inputs


def _cv_r2(posts: pd.DataFrame, y: np.ndarray, columns) -> float:
    """5-fold R² of a least-squares fit on the encoded feature columns (schema fitted per fold)."""
    values = {c.name: [c.parse(v) for v in posts[c.name]] for c in columns}
    rows = [{n: v[i] for n, v in values.items()} for i in range(len(y))]
    folds, pred = np.arange(len(y)) % 5, np.zeros(len(y))
    for k in range(5):
        tr, te = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        schema = FeatureSchema.fit(columns, {n: [v[i] for i in tr] for n, v in values.items()})
        x = np.c_[np.ones(len(y)), schema.encode(rows)]
        pred[te] = x[te] @ np.linalg.lstsq(x[tr], y[tr], rcond=None)[0]
    return float(1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2))


def test_the_timestamp_carries_signal_for_a_features_only_baseline(export):
    """A linear features-only baseline gains from the local hour and weekday (sin, cos)."""
    _, meta, posts, truth = export
    final = (truth["age_days"] >= mdd.LABEL_FINAL_DAYS).to_numpy()
    posts = posts[final].reset_index(drop=True)
    y = np.log1p(posts["engagement"].to_numpy(dtype=float))
    without = parse_column_specs("followers:0:", "platform")
    with_time = without + (FeatureColumn("posted_at", "datetime", timezone=meta["timezone"],
                                         parts=("hour", "weekday")),)
    r2_without, r2_with = _cv_r2(posts, y, without), _cv_r2(posts, y, with_time)
    assert r2_with - r2_without > 0.02, (r2_without, r2_with)


def test_truth_matches_the_documented_law(sets):
    """f in truth.csv is LAW.f of the saved attributes, and sentiment is that of the raw caption."""
    root, meta = sets["one"]
    truth = read_truth(root)
    posts = read_posts(root)
    for col in ("post_id", "account_id", "posted_at", "image_path", "engagement"):
        assert list(truth[col]) == list(posts[col]), col
    for row, caption in zip(truth.to_dict("records"), posts["description"]):
        assert row["sentiment"] == pytest.approx(sentiment(caption)["compound"], abs=1e-6)
        assert row["f"] == pytest.approx(documented_f(row, meta), abs=1e-5)
        assert row["engagement_final"] == max(0, round(math.expm1(row["y"])))
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
    truth = read_truth(root)
    final = (truth["age_days"] >= mdd.LABEL_FINAL_DAYS).to_numpy()
    assert meta["ceiling_rows"] == f"the {final.sum()} posts at least 7 days old at as_of"
    y_all = np.log1p(read_posts(root)["engagement"].to_numpy())
    assert meta["r2_ceiling_all_rows"] == pytest.approx(
        1 - np.sum((y_all - truth["f"]) ** 2) / np.sum((y_all - y_all.mean()) ** 2), abs=1e-4)
    truth = truth[final]
    f = truth["f"].to_numpy()
    y = y_all[final]
    theo = f.var() / (f.var() + meta["sigma"] ** 2)
    emp = 1 - np.sum((y - f) ** 2) / np.sum((y - y.mean()) ** 2)
    assert 0 < meta["r2_ceiling_theoretical"] < 1 and 0 < meta["r2_ceiling_empirical"] < 1
    assert meta["r2_ceiling_theoretical"] == pytest.approx(theo, abs=1e-4)
    assert meta["r2_ceiling_empirical"] == pytest.approx(emp, abs=1e-4)
    content = truth["f_content"].to_numpy()
    blind = content + (f - content).mean()
    assert meta["r2_ceiling_without_features"] == pytest.approx(
        1 - np.sum((y - blind) ** 2) / np.sum((y - y.mean()) ** 2), abs=1e-4)
    # an unseen account: an empty platform cell's term and the account's effect become their means
    c = meta["coefficients"]
    platform_mean = sum(p * c["platform"][name] for p, name in zip(mdd.PLATFORM_PROBS, c["platform"]))
    hidden = truth["platform_missing"].to_numpy(dtype=bool)
    unseen = f - truth["account_effect"].to_numpy()
    unseen[hidden] += platform_mean - truth.loc[hidden, "platform"].map(c["platform"]).to_numpy()
    assert meta["r2_ceiling_new_accounts"] == pytest.approx(
        1 - np.sum((y - unseen) ** 2) / np.sum((y - y.mean()) ** 2), abs=1e-4)
    assert meta["label_stats"]["mean"] > meta["label_stats"]["median"]


def test_agreement_is_an_interaction():
    base = {"image_topic": "pets", "brightness": 0.4, "colourfulness": 0.3, "n_objects": 2,
            "n_hashtags": 3, "cta": 0, "n_words": 10, "sentiment": 0.0, "followers": 3000, "platform": "x",
            "account_effect": 0.1, "local_hour": 12.5, "weekday": 2, "years": 0.3}
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


# ---------------------------------------------------------------------------------------
# make demo's data steps: the export is preprocessed with the flags it records
# ---------------------------------------------------------------------------------------


def makefile_variable(name: str) -> list[str]:
    """A ``NAME ?= ...`` variable of the Makefile (with its continuation lines), split into words."""
    text = (REPO_ROOT / "Makefile").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith(f"{name} ?="))
    return line.split("?=", 1)[1].split()


def test_make_demo_preprocesses_with_the_flags_the_demo_records(sets):
    assert makefile_variable("DEMO_PREPROCESS") == mdd.preprocess_flags() == sets["one"][1]["preprocess_flags"]


def test_the_demo_export_preprocesses_with_its_flags_and_no_column_flags(export, tmp_path):
    """Default image_path/description/engagement columns; only the young posts are rejected;
    the test split holds the newest posts."""
    from data_preprocessing import preprocess
    from data_preprocessing.records import SPLITS, RecordReader

    root, meta, posts, truth = export
    out = tmp_path / "data"
    assert preprocess.main(["--input", str(root / "posts.csv"), "--out", str(out), *meta["preprocess_flags"],
                            "--workers", "1", "--no-progress"]) == 0
    with open(out / "rejects.csv", newline="") as fh:
        rejects = {int(r["row"]): r["reason"] for r in csv.DictReader(fh)}
    young = np.flatnonzero(truth["age_days"] < mdd.LABEL_FINAL_DAYS).tolist()
    assert rejects == dict.fromkeys(young, "label_not_final")
    times = {s: [r.features["posted_at"] for r in RecordReader(out / f"{s}.pkl")] for s in SPLITS}
    assert max(times["train"] + times["val"]) < min(times["test"])
    processed = json.loads((out / "meta.json").read_text())
    assert [f["name"] for f in processed["features"]] == ["followers", "platform", "posted_at"]
    assert processed["split"]["rule"] == "time:posted_at" and processed["label_correlation_warnings"] == []
