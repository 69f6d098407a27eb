"""Unfinished labels, outcome columns and label look-alikes (data_preprocessing/leakage.py),
and labels made of several counts (data_preprocessing/label_expr.py)."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pytest

from data_preprocessing.features import FeatureColumn, FeatureError, parse_column_specs
from data_preprocessing.label_expr import LabelExpr
from data_preprocessing.leakage import (MaturityRule, check_outcome_columns, label_correlation_warnings,
                                        outcome_word)
# The table owner's label check.
from data_preprocessing.table import parse_label

POSTED = FeatureColumn("posted_at", "datetime", timezone="America/New_York")


# --- labels still growing --------------------------------------------------------------------


def test_maturity_rejects_posts_younger_than_the_window():
    rule = MaturityRule.from_flags("2025-06-30T00:00:00+0000", 7, (FeatureColumn("followers", "numeric"), POSTED))
    assert rule.column == "posted_at" and rule.as_of == datetime(2025, 6, 30, tzinfo=timezone.utc)
    day = 86400.0
    as_of = rule.as_of.timestamp()
    assert rule.check(as_of - 30 * day) is None
    assert rule.check(as_of - 7 * day) is None  # exactly 7 days old: final
    young = rule.check(as_of - 2.5 * day)
    assert young.startswith("posted_at: posted 2.5 days before --as-of 2025-06-30T00:00:00+00:00")
    assert "--min-label-age-days 7" in young
    assert "is after --as-of" in rule.check(as_of + day)  # posted after the export: not final either
    assert rule.check(None) is None and rule.count_unknown_age([None, 1.0, None]) == 2
    assert rule.to_dict() == {"as_of": "2025-06-30T00:00:00+00:00", "min_label_age_days": 7.0,
                              "column": "posted_at", "reason": "label_not_final"}


def test_maturity_reads_as_of_in_the_first_datetime_column_zone_and_needs_one():
    cols = parse_column_specs("", "", "posted_at,edited_at", timezone="America/New_York")
    rule = MaturityRule.from_flags("2025-06-30 20:00", 0, cols)  # 20:00 EDT = 00:00 UTC next day
    assert rule.as_of == datetime(2025, 7, 1, tzinfo=timezone.utc)
    assert MaturityRule.from_flags(None, 7, cols) is None and MaturityRule.from_flags("", 7, cols) is None
    with pytest.raises(ValueError, match="--datetime-cols"):
        MaturityRule.from_flags("2025-06-30", 7, (FeatureColumn("followers", "numeric"),))
    with pytest.raises(ValueError, match=">= 0"):
        MaturityRule.from_flags("2025-06-30", -1, cols)
    with pytest.raises(FeatureError, match="--as-of: 'next week' is not a timestamp"):
        MaturityRule.from_flags("next week", 7, cols)


# --- outcome columns ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, word", [
    ("reach", "reach"), ("Impressions", "impressions"), ("video_views", "views"), ("plays", "plays"),
    ("saves", "saves"), ("saved", "saved"), ("shares", "shares"), ("comments_count", "comments"),
    ("likes", "likes"), ("REACTIONS", "reactions"), ("engagement_rate", "engagement"), ("link-clicks", "clicks"),
    ("Total Reach", "reach"), ("l_i_k_e_s", "likes"), ("post-impressions", "impressions"),
    # the platforms' API names, singular + count
    ("like_count", "like count"), ("comment_count", "comment count"), ("share_count", "share count"),
    ("view_count", "view count"), ("play count", "play count"), ("impression_count", "impression count"),
])
def test_outcome_names_match(name, word):
    assert outcome_word(name) == word


@pytest.mark.parametrize("name", [
    "followers", "Followers", "follower_count", "followers_count", "following", "Follower Count",
    "posted_at", "platform", "account_id", "post_id", "media_type", "caption_length", "hashtag_count",
    "display_name", "is_video", "hour", "allow_comment", "shareholder_id", "playlist",
])
def test_inputs_known_before_posting_do_not_match(name):
    assert outcome_word(name) is None


def test_outcome_columns_are_refused_unless_allowed():
    with pytest.raises(ValueError) as e:
        check_outcome_columns(["followers", "reach", "platform", "like_count"], allow=False)
    msg = str(e.value)
    assert "'reach' (reach)" in msg and "'like_count' (like count)" in msg and "followers" not in msg
    assert "after posting" in msg and "--allow-outcome-cols" in msg
    assert check_outcome_columns(["followers", "reach"], allow=True) == ["reach"]
    assert check_outcome_columns(["followers", "platform"], allow=False) == []


# --- a feature that is the label in disguise ---------------------------------------------------


def test_correlation_warning_for_a_label_look_alike_only():
    rng = np.random.default_rng(0)
    y = np.expm1(rng.normal(5, 1.2, 400))
    reach = y * rng.uniform(8, 12, 400)  # an outcome: tracks the label
    followers = np.expm1(rng.normal(8, 1.3, 400))  # unrelated
    noisy = np.log1p(y) + rng.normal(0, 2.0, 400)  # related, not a copy
    features = {"reach": list(reach[:-10]) + [None] * 10, "followers": list(followers),
                "noisy": list(noisy), "constant": [3.0] * 400}
    warnings = label_correlation_warnings(features, list(y))
    assert [w["column"] for w in warnings] == ["reach"]
    w = warnings[0]
    assert w["n"] == 390 and w["spearman"] > 0.9 and w["threshold"] == 0.9
    assert "'reach' correlates" in w["message"]
    # rank correlation: the log of a label look-alike warns too, and so does a negative one
    assert [x["column"] for x in label_correlation_warnings({"log_reach": list(np.log1p(reach))}, list(y))] == [
        "log_reach"]
    assert len(label_correlation_warnings({"minus": list(-reach)}, list(y))) == 1


# --- labels made of several counts ---------------------------------------------------------------


def test_label_expression_sums_counts():
    expr = LabelExpr.parse("like_count + comments_count")
    assert expr.columns == ("like_count", "comments_count") and str(expr) == "like_count+comments_count"
    assert expr.evaluate({"like_count": "120", "comments_count": 7}, parse_label) == (127.0, None, "")
    assert expr.to_dict() == {"expression": "like_count+comments_count", "columns": ["like_count", "comments_count"],
                              "combine": "sum",
                              "description": "the sum of the post's 'like_count' + 'comments_count' counts"}


@pytest.mark.parametrize("comments, reason", [
    ("", "missing_label"), (None, "missing_label"), ("12k", "non_numeric_label"), ("-1", "negative_label"),
    ("inf", "non_finite_label"),
])
def test_a_bad_count_in_any_column_rejects_the_row_as_today(comments, reason):
    expr = LabelExpr.parse("like_count+comments_count")
    label, why, detail = expr.evaluate({"like_count": "120", "comments_count": comments}, parse_label)
    assert label is None and why == reason
    assert detail == "comments_count: " + parse_label(comments)[2]


def test_single_column_label_reads_as_before():
    expr = LabelExpr.parse("engagement")
    assert not expr.is_sum and expr.describe() == "the post's 'engagement' count"
    assert expr.evaluate({"engagement": "-3"}, parse_label) == parse_label("-3")
    assert LabelExpr.parse("a+b", header=["a+b", "a", "b"]).columns == ("a+b",)  # a column named a+b
    for bad in ("a+", "+", "a+a", ""):
        with pytest.raises(ValueError):
            LabelExpr.parse(bad)
