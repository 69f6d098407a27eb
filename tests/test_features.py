"""Feature columns end to end: parsing, fitting and encoding (features.py), and a posts
table with bad feature cells through preprocess.py, fully accounted for."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from data_preprocessing import preprocess
from data_preprocessing.features import (FeatureColumn, FeatureError, FeatureSchema, FeatureSpec,
                                         parse_column_specs)
from data_preprocessing.posts import PrepareConfig, Record, parse_features
from data_preprocessing.records import SPLITS, RecordReader
from tests.test_preprocess import read_rejects
from tests.tiny_posts import POSTS_HEADER, write_posts

FOLLOWERS = FeatureColumn("followers", "numeric", 0.0, None)
HOUR = FeatureColumn("posted_hour", "numeric", 0.0, 23.0)
PLATFORM = FeatureColumn("platform", "categorical")


@pytest.mark.parametrize("raw, expected", [
    ("12", 12.0), (" 1e3 ", 1000.0), (7, 7.0), (2.5, 2.5), ("", None), ("  ", None), (None, None),
    (float("nan"), None),  # pandas' own missing marker
    # a spreadsheet's thousands separators
    ("13,579", 13579.0), (" 1,234,567.25 ", 1234567.25), ("13 579", 13579.0), ("999,000", 999000.0),
])
def test_numeric_parse(raw, expected):
    assert FOLLOWERS.parse(raw) == expected
    assert FOLLOWERS.parse(FOLLOWERS.parse(raw)) == expected  # idempotent


@pytest.mark.parametrize("raw, why", [
    ("12k", "is not a number"), ("inf", "is not finite"), ("nan", "is not finite"), (True, "is not a number"),
    ("-1", "outside the allowed range [0, inf]"), (float("inf"), "is not finite"),
    # only groups of exactly three digits are thousands: a decimal comma is not guessed at
    ("1,5", "is not a number"), ("12,34", "is not a number"), ("1234,567", "is not a number"),
    ("13,579,", "is not a number"), ("1,234.5.6", "is not a number"), ("1, 234", "is not a number"),
])
def test_numeric_parse_rejects(raw, why):
    with pytest.raises(FeatureError) as e:
        FOLLOWERS.parse(raw)
    assert e.value.reason == "invalid_feature" and e.value.column == "followers"
    assert why in e.value.message and e.value.message.startswith("followers: ")


def test_hour_bounds_and_categorical_parse():
    assert HOUR.parse("23") == 23.0
    with pytest.raises(FeatureError, match=r"24 is outside the allowed range \[0, 23\]"):
        HOUR.parse("24")
    assert PLATFORM.parse(" tiktok ") == "tiktok" and PLATFORM.parse("") is None and PLATFORM.parse(3) == "3"


def test_column_specs():
    cols = parse_column_specs("followers:0:,posted_hour:0:23", "platform")
    assert cols == (FOLLOWERS, HOUR, PLATFORM)
    assert parse_column_specs("", "") == ()
    for bad in (("a:1", ""), ("a,a", ""), ("a", "a"), ("a:5:1", "")):
        with pytest.raises(ValueError):
            parse_column_specs(*bad)


def test_fit_picks_log1p_for_skewed_counts_only():
    rng = np.random.default_rng(0)
    followers = [float(round(x)) for x in np.exp(rng.normal(8, 1.3, 500))] + [None] * 20
    hours = [float(h) for h in rng.integers(0, 24, 500)]
    spec_f, spec_h = FeatureSpec.fit(FOLLOWERS, followers), FeatureSpec.fit(HOUR, hours)
    assert spec_f.transform == "log1p" and spec_h.transform == "none"
    present = np.log1p([v for v in followers if v is not None])
    assert spec_f.mean == pytest.approx(present.mean()) and spec_f.std == pytest.approx(present.std())
    assert spec_f.impute == pytest.approx(np.median(present))
    assert spec_f.train_missing_frac == pytest.approx(20 / 520, abs=1e-6)
    # a signed skewed column is not log-transformed
    signed = FeatureSpec.fit(FeatureColumn("delta", "numeric"), [-5.0] + [float(x) for x in np.exp(rng.normal(0, 2, 300))])
    assert signed.transform == "none"


def test_encode_numeric_standardises_imputes_and_flags_missing():
    spec = FeatureSpec(FOLLOWERS, "log1p", mean=8.0, std=2.0, impute=7.0)
    out = spec.encode([math.expm1(10.0), None, math.expm1(8.0)])
    np.testing.assert_allclose(out, [[1.0, 0.0], [-0.5, 1.0], [0.0, 0.0]], atol=1e-6)
    assert out.dtype == np.float32
    huge = spec.encode([1e300])  # clipped: one absurd value cannot swamp the head
    assert huge[0, 0] == pytest.approx(10.0)


def test_encode_categorical_one_hot_with_unknown_slot():
    spec = FeatureSpec.fit(PLATFORM, ["tiktok", "instagram", "tiktok", None, "x"])
    assert spec.categories == ("tiktok", "instagram", "x")  # by frequency, ties by name
    out = spec.encode(["x", None, "myspace", "tiktok"])
    np.testing.assert_array_equal(out, [[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 1], [1, 0, 0, 0]])


def test_schema_width_round_trip_and_order():
    schema = FeatureSchema.fit((FOLLOWERS, PLATFORM), {"followers": [1.0, 100.0, 10000.0, None],
                                                      "platform": ["a", "b", "a", "a"]})
    assert schema.width == 2 + 3 and schema.input_names() == [
        "followers", "followers__missing", "platform=a", "platform=b", "platform=<unknown>"]
    again = FeatureSchema.from_dict(json.loads(json.dumps(schema.to_dict())))
    assert again == schema
    rows = [{"followers": 50.0, "platform": "b"}, {"followers": None, "platform": None}]
    np.testing.assert_array_equal(again.encode(rows), schema.encode(rows))
    assert {k: (s.start, s.stop) for k, s in schema.slices().items()} == {"followers": (0, 2), "platform": (2, 5)}
    assert FeatureSchema().encode(rows).shape == (2, 0)


def test_parse_features_names_missing_and_unknown_fields():
    schema = PrepareConfig.for_columns(PrepareConfig().resize, 100, (FOLLOWERS, PLATFORM)).features
    assert parse_features({"followers": "5", "platform": ""}, schema) == {"followers": 5.0, "platform": None}
    with pytest.raises(FeatureError) as e:
        parse_features({"followers": "5"}, schema)
    assert (e.value.reason, e.value.column) == ("missing_feature", "platform")
    with pytest.raises(FeatureError) as e:
        parse_features({"followers": "5", "platform": "x", "folowers": "1"}, schema)
    assert (e.value.reason, e.value.column) == ("unknown_feature", "folowers")


def test_version_1_record_loads_without_features():
    from PIL import Image

    old = {"image": Image.new("RGB", (2, 2)), "text": "t", "sentiment": 0.5, "label": 3.0, "row": 7}
    rec = Record.from_dict(old)
    assert rec.features == {} and rec.row == 7 and rec.to_dict().keys() == old.keys()
    with pytest.raises(ValueError, match=r"keys \['row'\] missing"):
        Record.from_dict({k: v for k, v in old.items() if k != "row"})


def test_record_format_version_is_checked():
    from data_preprocessing.records import check_record_format

    check_record_format({}, "d")  # version 1 wrote no version
    check_record_format({"record_format": {"version": 2}}, "d")
    with pytest.raises(ValueError, match="format version 3"):
        check_record_format({"record_format": {"version": 3}}, "d")


# ---------------------------------------------------------------------------------------
# preprocess.py with feature columns
# ---------------------------------------------------------------------------------------

ROWS = [  # followers, posted_hour, platform, expected reason (None = kept)
    ("1200", "19", "instagram", None),
    ("", "8", "tiktok", None),  # empty numeric cell: kept, missing
    ("350", "", "", None),  # empty hour and platform: kept, missing
    ("lots", "3", "x", "invalid_feature"),
    ("inf", "3", "x", "invalid_feature"),
    ("-5", "3", "x", "invalid_feature"),  # followers:0: forbids negatives
    ("10", "25", "x", "invalid_feature"),  # posted_hour:0:23
    ("10", "nan", "x", "invalid_feature"),
    ("98000", "23", "facebook", None),
    ("40", "0", "tiktok", None),
]


@pytest.fixture(scope="module")
def featured(tmp_path_factory):
    root = tmp_path_factory.mktemp("featured")
    posts = write_posts(root, [[i, f"post {i}", str(10 * i), *r[:3]] for i, r in enumerate(ROWS)],
                        (*POSTS_HEADER, "followers", "posted_hour", "platform"))
    out = root / "out"
    assert preprocess.main(["--input", str(posts), "--out", str(out), "--workers", "1",
                            "--numeric-cols", "followers:0:,posted_hour:0:23", "--categorical-cols", "platform",
                            "--val-frac", "0", "--test-frac", "0", "--max-reject-frac", "0.9",
                            "--no-progress"]) == 0
    return out


def test_bad_feature_cells_are_accounted_for(featured):
    expected = {i: r[3] for i, r in enumerate(ROWS) if r[3]}
    assert read_rejects(featured) == expected
    with open(featured / "rejects.csv", newline="") as fh:
        details = {int(r["row"]): r["detail"] for r in csv.DictReader(fh)}
    assert details[3] == "followers: 'lots' is not a number"
    assert details[6] == "posted_hour: 25 is outside the allowed range [0, 23]"
    meta = json.loads((featured / "meta.json").read_text())
    assert meta["counts"]["kept"] + meta["counts"]["rejected"] == len(ROWS)
    assert meta["counts"]["rejects_by_reason"] == {"invalid_feature": len(expected)}


def test_records_carry_parsed_features_and_missing_values(featured):
    recs = {r.row: r for s in SPLITS for r in RecordReader(featured / f"{s}.pkl")}
    assert sorted(recs) == [i for i, r in enumerate(ROWS) if r[3] is None]
    assert recs[0].features == {"followers": 1200.0, "posted_hour": 19.0, "platform": "instagram"}
    assert recs[1].features["followers"] is None
    assert recs[2].features == {"followers": 350.0, "posted_hour": None, "platform": None}


def test_meta_holds_the_fitted_schema_and_statistics(featured):
    meta = json.loads((featured / "meta.json").read_text())
    assert meta["features"] == [
        {"name": "followers", "kind": "numeric", "min": 0.0, "max": None},
        {"name": "posted_hour", "kind": "numeric", "min": 0.0, "max": 23.0},
        {"name": "platform", "kind": "categorical", "min": None, "max": None}]
    schema = PrepareConfig.from_dict(meta["prepare"]).features
    followers = [1200.0, 350.0, 98000.0, 40.0]  # the kept train rows with a value
    spec = schema.features[0]
    assert spec.transform == "log1p" and spec.mean == pytest.approx(np.log1p(followers).mean())
    assert schema.features[2].categories == ("tiktok", "facebook", "instagram")
    assert meta["feature_stats"]["followers"]["missing"] == 1
    assert meta["feature_stats"]["followers"]["raw"]["max"] == 98000.0
    assert meta["feature_stats"]["platform"]["top_categories"] == {"tiktok": 2, "instagram": 1, "facebook": 1}


def test_validation_script_passes_featured_records(featured):
    import test_preprocessing

    # Every record passes; only the val and test splits, left out by --val-frac 0 --test-frac 0, fail.
    failures, _ = test_preprocessing.validate(featured)
    assert [f.split(":")[0] for f in failures] == ["val", "test"] and all("no records" in f for f in failures)


def test_thousands_separators_go_through_preprocessing(tmp_path):
    """A spreadsheet export: followers formatted "13,579" are numbers, not invalid_feature."""
    followers = ["13,579", "1 204 000", "950", "12,34"]
    posts = write_posts(tmp_path, [[i, f"post {i}", i, f] for i, f in enumerate(followers)],
                        (*POSTS_HEADER, "followers"))
    out = tmp_path / "out"
    assert preprocess.main(["--input", str(posts), "--out", str(out), "--workers", "1", "--numeric-cols",
                            "followers:0:", "--val-frac", "0", "--test-frac", "0", "--max-reject-frac", "0.5",
                            "--no-progress"]) == 0
    assert read_rejects(out) == {3: "invalid_feature"}
    recs = {r.row: r.features["followers"] for r in RecordReader(out / "train.pkl")}
    assert recs == {0: 13579.0, 1: 1204000.0, 2: 950.0}
