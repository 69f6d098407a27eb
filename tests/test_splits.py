"""Split rules (data_preprocessing/splits.py): random as it always was, time-ordered splits,
per-account splits, and the summary meta.json records."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from data_preprocessing.features import FeatureColumn
from data_preprocessing.records import SPLITS
from data_preprocessing.splits import (UNASSIGNED, SplitRule, assign_by_group, assign_by_time, assign_random,
                                       describe_split, group_fraction, plan_splits, split_rejects, split_summary,
                                       time_column)

TRAIN, VAL, TEST = 0, 1, 2
POSTED = FeatureColumn("posted_at", "datetime", timezone="Europe/Berlin")
T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def iso(days: float) -> str:
    return (T0 + timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%S+0000")


def test_rule_parse_and_text():
    assert SplitRule.parse("random") == SplitRule() and str(SplitRule()) == "random"
    assert SplitRule.parse(" time:posted_at ") == SplitRule("time", "posted_at")
    assert str(SplitRule.parse("group:account_id")) == "group:account_id"
    for bad in ("time", "group:", "random:x", "hash:account_id", ""):
        with pytest.raises(ValueError):
            SplitRule.parse(bad)


def test_random_is_the_split_preprocessing_always_made():
    # Pinned from preprocess.assign_splits before this module existed: the demo's figures
    # (n 2000, seed 0, 0.1/0.1) must not move when preprocessing switches to plan_splits.
    assert assign_random(20, 0.1, 0.2, seed=0).tolist() == [0, 0, 2, 0, 2, 0, 2, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0,
                                                            0, 2]
    demo = plan_splits(SplitRule(), 2000, 0.1, 0.1, seed=0).split
    assert demo.dtype == np.int8 and hashlib.sha256(demo.tobytes()).hexdigest() == (
        "edddc711243492246d6c5d6ac5334a295b9da5ea662460299af5ca322f9de9a8")
    assert not np.array_equal(demo, assign_random(2000, 0.1, 0.1, seed=1))


def test_time_split_newest_to_test_in_the_asked_proportions():
    rng = np.random.default_rng(0)
    days = rng.permutation(100).astype(float)  # rows in shuffled time order
    cells = [iso(d) for d in days]
    plan = plan_splits(SplitRule("time", "posted_at"), 100, 0.1, 0.2, 0, cells, POSTED)
    assert [int((plan.split == k).sum()) for k in (TRAIN, VAL, TEST)] == [70, 10, 20]
    t = plan.times
    assert t[plan.split == TEST].min() > t[plan.split == VAL].max() > t[plan.split == TRAIN].max()
    assert plan.rejects == {}
    # the oldest 70 days are train, whatever order the rows came in
    assert sorted(days[plan.split == TRAIN]) == list(range(70))


def test_time_split_ties_at_a_boundary_stay_in_the_earlier_split():
    # train would end after the 6th row, inside the run of 3s: both 3s stay in train
    times = np.array([1.0, 1, 2, 2, 2, 3, 3, 4, 5, 5])
    split = assign_by_time(times, 0.2, 0.2)
    assert split.tolist() == [TRAIN] * 7 + [VAL] + [TEST] * 2
    assert times[split == TEST].min() > times[split == VAL].max() > times[split == TRAIN].max()
    # test would start inside the last run of 8s: it stays empty rather than share a time with train
    # (preprocessing then refuses the empty split with a message)
    split = assign_by_time(np.array([1.0, 2, 3, 4, 5, 6, 7, 8, 8, 8]), 0.0, 0.2)
    assert split.tolist() == [TRAIN] * 10


def test_time_split_rejects_rows_without_a_valid_time():
    cells = [iso(d) for d in range(10)]
    cells[3], cells[7] = "", "last tuesday"
    plan = plan_splits(SplitRule("time", "posted_at"), 10, 0.25, 0.25, 0, cells, POSTED)
    assert plan.split[3] == plan.split[7] == UNASSIGNED
    assert [int((plan.split == k).sum()) for k in (TRAIN, VAL, TEST)] == [4, 2, 2]  # of the 8 with a time
    rejects = split_rejects(plan)
    assert [(r, why) for r, why, _ in rejects] == [(3, "invalid_datetime"), (7, "invalid_datetime")]
    assert "posted_at: empty" in rejects[0][2]
    assert rejects[1][2].startswith("posted_at: 'last tuesday' is not a timestamp")


def test_time_split_proportions_are_of_the_rows_not_rejected_anyway():
    cells = [iso(d) for d in range(12)]
    cells[5] = "bad"
    # the two newest posts are rejected before splitting (their labels are still growing)
    plan = plan_splits(SplitRule("time", "posted_at"), 12, 0.2, 0.2, 0, cells, POSTED, skip={10, 11, 5})
    # 9 usable rows: 2 to test (round(0.2 * 9)), 2 to val, the oldest 5 to train
    assert plan.split.tolist() == [TRAIN] * 5 + [UNASSIGNED] + [VAL, VAL, TEST, TEST, UNASSIGNED, UNASSIGNED]
    assert plan.rejects == {}  # row 5 is the caller's reject, not the split's
    # random and group splits never depend on other rows: skip changes nothing
    assert np.array_equal(plan_splits(SplitRule(), 12, 0.2, 0.2, 0, skip={1}).split, assign_random(12, 0.2, 0.2, 0))


def test_time_split_reads_naive_cells_in_the_zone():
    # 00:30 Berlin (UTC+1 in winter) on Jan 2 is 23:30 UTC on Jan 1: older than 23:45 UTC
    cells = ["2024-01-02T00:30:00", "2024-01-01T23:45:00+0000", "2024-01-01T23:00:00+0000"]
    plan = plan_splits(SplitRule("time", "posted_at"), 3, 0.0, 1 / 3, 0, cells, POSTED)
    assert plan.split.tolist() == [TRAIN, TEST, TRAIN]


def test_time_column_is_the_declared_datetime_feature_or_a_new_one():
    rule = SplitRule("time", "posted_at")
    assert time_column(rule, (POSTED,), "UTC", None) is POSTED
    made = time_column(SplitRule("time", "created"), (POSTED,), "Asia/Tokyo", "%d/%m/%Y")
    assert (made.name, made.kind, made.timezone, made.format) == ("created", "datetime", "Asia/Tokyo", "%d/%m/%Y")
    assert time_column(SplitRule(), (POSTED,), "UTC", None) is None
    with pytest.raises(ValueError, match="not a timestamp"):
        time_column(SplitRule("time", "followers"), (FeatureColumn("followers", "numeric"),), "UTC", None)


def test_group_split_keeps_each_account_in_one_split():
    rng = np.random.default_rng(1)
    accounts = [f"acct{int(k)}" for k in rng.integers(0, 300, 3000)]
    plan = plan_splits(SplitRule("group", "account_id"), 3000, 0.1, 0.2, seed=0, cells=accounts)
    where: dict[str, set] = {}
    for a, s in zip(accounts, plan.split):
        where.setdefault(a, set()).add(int(s))
    assert all(len(s) == 1 for s in where.values())
    summary = split_summary(plan, 0.1, 0.2)
    fr = summary["achieved_fracs"]
    assert abs(fr["test"] - 0.2) < 0.06 and abs(fr["val"] - 0.1) < 0.06  # hash of 300 accounts: near the target
    assert sum(summary["groups"].values()) == len(set(accounts))


def test_group_assignment_is_stable_whatever_the_other_rows():
    keys = ["alice", "bob", "carol", "dave", "erin"] * 3
    full = assign_by_group(keys, 0.2, 0.2, seed=0)
    alone = {k: int(assign_by_group([k], 0.2, 0.2, seed=0)[0]) for k in set(keys)}
    assert [alone[k] for k in keys] == full.tolist()
    # a value's fraction is a fixed number: pinned, so a changed hash (different splits on
    # another machine or version) fails here
    assert group_fraction("alice", 0) == pytest.approx(
        int.from_bytes(hashlib.blake2b(b"alice", digest_size=8, key=b"0").digest(), "big") / 2 ** 64)
    assert group_fraction("alice", 0) != group_fraction("alice", 1)
    # numbers and padded strings are the same account; empty cells share one group
    plan = plan_splits(SplitRule("group", "account_id"), 4, 0.3, 0.3, 0, cells=[17, " 17", None, ""])
    assert plan.groups == ["17", "17", "", ""] and plan.split[0] == plan.split[1] and plan.split[2] == plan.split[3]


def test_summary_of_a_time_split_records_first_and_last_timestamps():
    cells = [iso(d) for d in range(10)]
    plan = plan_splits(SplitRule("time", "posted_at"), 10, 0.2, 0.2, 0, cells, POSTED)
    kept = np.ones(10, dtype=bool)
    kept[9] = False  # the newest post lost its image: the test range ends a day earlier
    s = split_summary(plan, 0.2, 0.2, kept)
    assert s["rule"] == "time:posted_at" and s["column"] == "posted_at"
    assert s["counts"] == {"train": 6, "val": 2, "test": 1}
    assert s["achieved_fracs"] == {"train": round(6 / 9, 4), "val": round(2 / 9, 4), "test": round(1 / 9, 4)}
    assert s["target_fracs"] == {"train": 0.6, "val": 0.2, "test": 0.2}
    assert s["time_ranges"]["train"] == {"first": "2024-01-01T00:00:00+00:00", "last": "2024-01-06T00:00:00+00:00"}
    assert s["time_ranges"]["test"] == {"first": "2024-01-09T00:00:00+00:00", "last": "2024-01-09T00:00:00+00:00"}
    line = describe_split(s)
    assert line.startswith("split time:posted_at: train 66.7%, val 22.2%, test 11.1%")
    assert "test 2024-01-09T00:00:00+00:00" in line
    assert set(s) >= {"rule", "achieved_fracs", "time_ranges"} and "groups" not in s


def test_plan_needs_the_rule_column():
    with pytest.raises(ValueError, match="account_id"):
        plan_splits(SplitRule("group", "account_id"), 3, 0.1, 0.1, 0)
    with pytest.raises(ValueError, match="datetime column"):
        plan_splits(SplitRule("time", "posted_at"), 1, 0.1, 0.1, 0, cells=["x"])
    assert SPLITS == ("train", "val", "test")
