"""Which split each post lands in: ``--split random | time:COL | group:COL``.

A random split tests on posts from the same weeks and the same accounts the model trained
on, so its test R² does not say what to expect next month or on a new account. The rules:

* ``random`` (the default): a shuffle of all row indices by
  ``numpy.random.default_rng(seed)``; the first ``round(test_frac * n)`` shuffled rows go to
  test, the next ``round(val_frac * n)`` to val, the rest to train. It depends only on the
  seed and the number of rows (the rule preprocessing has always used: same seed, same split).
* ``time:COL``: rows are ordered by the timestamp in COL (``features.parse_datetime``, with
  the run's ``--timezone`` and ``--datetime-format``), ties by row. The oldest go to train,
  the next ``round(val_frac * m)`` to val and the newest ``round(test_frac * m)`` to test,
  ``m`` being the rows with a time that the caller does not already reject (``skip``:
  e.g. posts whose labels are not final, so the newest *usable* posts form the test
  split). Rows that share a timestamp across a boundary all stay
  in the earlier split, so every test post is strictly newer than every train and val post
  (and every val post than every train post). A row whose cell is empty or not a time is
  rejected with ``invalid_datetime``.
* ``group:COL``: every row with the same COL value (an account) lands in the same split.
  The split of a value is a stable hash of it: ``u = blake2b(value, key=str(seed))`` read as
  a fraction in [0, 1); ``u < test_frac`` is test, ``u < test_frac + val_frac`` val, the rest
  train. A value's split depends on nothing else (not the row order, not the other rows, not
  the machine), so the fractions achieved vary with the number of groups: the summary
  reports them. Empty cells form one group of their own ("", unknown accounts kept together,
  since they may be one account).

Splits are decided up front, from the table alone, before any image is loaded.
``split_summary`` gives what ``meta.json``, ``metrics.json`` and the training log repeat.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Collection, Sequence

import numpy as np

from data_preprocessing.features import DATETIME_REASON, FeatureColumn, FeatureError, utc_datetime
from data_preprocessing.records import SPLITS

SPLIT_KINDS = ("random", "time", "group")
UNASSIGNED = -1  # split index of a row the rule rejects (time rule without a valid time)
_TRAIN, _VAL, _TEST = (SPLITS.index(s) for s in ("train", "val", "test"))


@dataclass(frozen=True)
class SplitRule:
    """A parsed ``--split`` value: its kind and, for time and group rules, the column."""

    kind: str = "random"
    column: str | None = None

    def __post_init__(self):
        if self.kind not in SPLIT_KINDS:
            raise ValueError(f"--split {self.kind!r}: use random, time:COLUMN or group:COLUMN")
        needs_column = self.kind != "random"
        if needs_column != bool(self.column):
            raise ValueError(f"--split {self}: random takes no column; time and group need one (time:posted_at)")

    @classmethod
    def parse(cls, text: str) -> "SplitRule":
        """``"random"``, ``"time:posted_at"`` or ``"group:account_id"`` -> a rule."""
        kind, _, column = text.strip().partition(":")
        return cls(kind.strip(), column.strip() or None)

    def __str__(self) -> str:
        return self.kind if self.column is None else f"{self.kind}:{self.column}"


@dataclass
class SplitPlan:
    """Every row's split. ``split[r]`` indexes ``records.SPLITS``, or is ``UNASSIGNED`` for a
    row in ``rejects`` (row -> detail; the reason is ``invalid_datetime``)."""

    rule: SplitRule
    split: np.ndarray  # (n_rows,) int8
    rejects: dict[int, str]
    times: np.ndarray | None = None  # time rule: (n_rows,) float64 Unix seconds, NaN where none
    groups: list[str] | None = None  # group rule: each row's group value


def assign_random(n_rows: int, val_frac: float, test_frac: float, seed: int) -> np.ndarray:
    """(n_rows,) int8 split index into ``SPLITS`` for every row, from a seeded shuffle."""
    perm = np.random.default_rng(seed).permutation(n_rows)
    n_test = int(round(test_frac * n_rows))
    n_val = int(round(val_frac * n_rows))
    split = np.zeros(n_rows, dtype=np.int8)  # 0 = train
    split[perm[:n_test]] = _TEST
    split[perm[n_test:n_test + n_val]] = _VAL
    return split


def assign_by_time(times: np.ndarray, val_frac: float, test_frac: float) -> np.ndarray:
    """(n_rows,) int8 split index: oldest to train, newest to test; ``UNASSIGNED`` where the
    time is NaN. Ties at a boundary stay in the earlier split (module docstring)."""
    split = np.full(len(times), UNASSIGNED, dtype=np.int8)
    rows = np.flatnonzero(~np.isnan(times))
    order = rows[np.lexsort((rows, times[rows]))]  # by time, then by row: deterministic
    t = times[order]
    m = len(order)
    n_test, n_val = int(round(test_frac * m)), int(round(val_frac * m))
    val_from = _past_ties(t, m - n_test - n_val)
    test_from = _past_ties(t, max(m - n_test, val_from))
    split[order[:val_from]] = _TRAIN
    split[order[val_from:test_from]] = _VAL
    split[order[test_from:]] = _TEST
    return split


def _past_ties(sorted_times: np.ndarray, boundary: int) -> int:
    """``boundary`` moved forward until the rows on either side have different times."""
    while 0 < boundary < len(sorted_times) and sorted_times[boundary] == sorted_times[boundary - 1]:
        boundary += 1
    return boundary


def group_key(cell) -> str:
    """A group cell as the string that is hashed: stripped; empty or missing is ""."""
    if cell is None or (isinstance(cell, float) and cell != cell):  # None or pandas' NaN
        return ""
    return str(cell).strip()


def group_fraction(key: str, seed: int) -> float:
    """A stable number in [0, 1) for a group value: 64 bits of a keyed blake2b."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def assign_by_group(keys: Sequence[str], val_frac: float, test_frac: float, seed: int) -> np.ndarray:
    """(n_rows,) int8 split index: each distinct key's hash fraction picks its split."""
    where = {}
    for k in dict.fromkeys(keys):  # each distinct value hashed once
        u = group_fraction(k, seed)
        where[k] = _TEST if u < test_frac else _VAL if u < test_frac + val_frac else _TRAIN
    return np.fromiter((where[k] for k in keys), dtype=np.int8, count=len(keys))


def parse_times(cells: Sequence, column: FeatureColumn) -> tuple[np.ndarray, dict[int, str]]:
    """(n_rows,) Unix seconds of a datetime column's cells (NaN where none), and the rows
    without a time: row -> detail naming the column and the value."""
    times = np.full(len(cells), np.nan)
    bad: dict[int, str] = {}
    for row, cell in enumerate(cells):
        try:
            value = column.parse(cell)
        except FeatureError as e:
            bad[row] = e.message
            continue
        if value is None:
            bad[row] = f"{column.name}: empty; --split time:{column.name} needs a time in every row"
        else:
            times[row] = value
    return times, bad


def time_column(rule: SplitRule, columns: Sequence[FeatureColumn], timezone: str,
                datetime_format: str | None) -> FeatureColumn | None:
    """The column a time rule orders by: the declared datetime feature of that name, or (a
    column used only for splitting) one read with the run's --timezone and --datetime-format."""
    if rule.kind != "time":
        return None
    for c in columns:
        if c.name == rule.column:
            if c.kind != "datetime":
                raise ValueError(f"--split {rule}: {c.name!r} is a {c.kind} feature column, not a timestamp")
            return c
    return FeatureColumn(rule.column, "datetime", timezone=timezone, format=datetime_format or None)


def plan_splits(rule: SplitRule, n_rows: int, val_frac: float, test_frac: float, seed: int,
                cells: Sequence | None = None, time_column: FeatureColumn | None = None,
                skip: Collection[int] = ()) -> SplitPlan:
    """Every row's split under ``rule``. ``cells`` is the rule's column (time and group
    rules); ``time_column`` the datetime column that parses it (its zone and format).
    ``skip``: rows the caller rejects anyway; a time split leaves them out of its order and
    proportions (``UNASSIGNED``, no reject of its own). Random and group splits place every
    row, since a row's split there never depends on the other rows."""
    if rule.kind == "random":
        return SplitPlan(rule, assign_random(n_rows, val_frac, test_frac, seed), {})
    if cells is None or len(cells) != n_rows:
        raise ValueError(f"--split {rule} needs the {rule.column!r} cells of all {n_rows} rows")
    if rule.kind == "group":
        keys = [group_key(c) for c in cells]
        return SplitPlan(rule, assign_by_group(keys, val_frac, test_frac, seed), {}, groups=keys)
    if time_column is None or time_column.kind != "datetime":
        raise ValueError(f"--split {rule} needs a datetime column to parse {rule.column!r} with")
    times, bad = parse_times(cells, time_column)
    usable = times.copy()
    usable[list(skip)] = np.nan
    bad = {r: d for r, d in bad.items() if r not in set(skip)}
    return SplitPlan(rule, assign_by_time(usable, val_frac, test_frac), bad, times=times)


def split_rejects(plan: SplitPlan) -> list[tuple[int, str, str]]:
    """(row, reason, detail) for the rows the rule could not place, by row."""
    return [(row, DATETIME_REASON, detail) for row, detail in sorted(plan.rejects.items())]


def split_summary(plan: SplitPlan, val_frac: float, test_frac: float, kept: np.ndarray | None = None) -> dict:
    """What a reader of the test R² must know about the split, for meta.json and metrics.json:
    the rule, the fractions asked for and achieved, and (time) each split's first and last
    timestamp or (group) how many distinct groups each split holds. ``kept`` (a bool mask)
    restricts the counts to the rows that became records."""
    mask = plan.split != UNASSIGNED if kept is None else (np.asarray(kept, dtype=bool) & (plan.split != UNASSIGNED))
    counts = {s: int(np.sum(mask & (plan.split == i))) for i, s in enumerate(SPLITS)}
    total = sum(counts.values())
    out: dict = {
        "rule": str(plan.rule), "kind": plan.rule.kind, "column": plan.rule.column,
        "target_fracs": {"train": round(1.0 - val_frac - test_frac, 6), "val": val_frac, "test": test_frac},
        "achieved_fracs": {s: round(n / total, 4) if total else 0.0 for s, n in counts.items()},
        "counts": counts,
    }
    if plan.times is not None:
        out["time_ranges"] = {}
        for i, s in enumerate(SPLITS):
            t = plan.times[mask & (plan.split == i)]
            out["time_ranges"][s] = ({"first": utc_datetime(float(t.min())).isoformat(),
                                      "last": utc_datetime(float(t.max())).isoformat()} if t.size else None)
    if plan.groups is not None:
        out["groups"] = {s: len({plan.groups[r] for r in np.flatnonzero(mask & (plan.split == i))})
                         for i, s in enumerate(SPLITS)}
    return out


def describe_split(summary: dict) -> str:
    """One line for the end of the logs: what the test figures are a test of."""
    fr = summary["achieved_fracs"]
    line = f"split {summary['rule']}: train {fr['train']:.1%}, val {fr['val']:.1%}, test {fr['test']:.1%}"
    if summary.get("time_ranges"):
        r = summary["time_ranges"]
        if r["train"] and r["test"]:
            line += f"; train {r['train']['first']} .. {r['train']['last']}, test {r['test']['first']} .. " \
                    f"{r['test']['last']} (test posts are newer than every train post)"
    if summary.get("groups"):
        g = summary["groups"]
        line += f"; {g['train']}/{g['val']}/{g['test']} distinct {summary['column']} values (none in two splits)"
    return line
