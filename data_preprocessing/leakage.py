"""What makes a test R² look better than the model is: labels still growing, and inputs
that are outcomes of the post.

* **Labels still growing** (``MaturityRule``, ``--as-of TIME --min-label-age-days N``): an
  export counts likes "so far", and a post keeps collecting them for days. A post younger
  than N days at the export time (or posted after it) is rejected with ``label_not_final``.
  The age is read from the first ``--datetime-cols`` column. A post whose time cell is empty
  has no known age and is kept (there is nothing to say it is young); ``count_unknown_age``
  counts them for the log.
* **Outcome columns** (``check_outcome_columns``): reach, impressions, views, saves and
  shares are counted after posting, like the label. As inputs they make the model look
  excellent and useless. A feature column is refused when its name, lower-cased with ``_``,
  ``-`` and spaces removed, contains one of ``OUTCOME_WORDS``, or a singular one of
  ``OUTCOME_COUNT_STEMS`` followed by ``count`` (the platforms' APIs say ``like_count``,
  ``comment_count``, ``view_count``), unless ``--allow-outcome-cols``. ``followers`` is known
  before posting and matches none of them.
* **A feature that is the label in disguise** (``label_correlation_warnings``): after fitting,
  a numeric feature whose train correlation with the label is above 0.9 (Pearson on the raw
  values, or Spearman on their ranks, whichever is larger in size, so a count and its log
  give the same verdict) gets a warning record for the log and ``meta.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Mapping, Sequence

import numpy as np

from data_preprocessing.features import FeatureColumn, SECONDS_PER_DAY, parse_datetime, utc_datetime

LABEL_NOT_FINAL = "label_not_final"  # rejects.csv reason
OUTCOME_WORDS = ("reach", "impressions", "views", "plays", "saves", "saved", "shares", "comments", "likes",
                 "reactions", "engagement", "clicks")
OUTCOME_COUNT_STEMS = ("like", "comment", "share", "view", "play", "save", "click", "reaction", "impression")
CORRELATION_WARN = 0.9


# ---------------------------------------------------------------------------------------
# Labels still growing
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaturityRule:
    """Reject posts younger than ``min_age_days`` at ``as_of`` (the export time)."""

    as_of: datetime  # aware, UTC
    min_age_days: float
    column: str  # the datetime column the age is read from

    def __post_init__(self):
        if self.as_of.tzinfo is None:
            raise ValueError("as_of must be an aware datetime")
        if not self.min_age_days >= 0:
            raise ValueError(f"--min-label-age-days must be >= 0, got {self.min_age_days}")

    @classmethod
    def from_flags(cls, as_of: str | None, min_age_days: float,
                   columns: Sequence[FeatureColumn]) -> "MaturityRule | None":
        """``--as-of`` (read like a cell of the first datetime column: its zone and format)
        and ``--min-label-age-days`` -> a rule, or None without ``--as-of`` (nothing changes)."""
        if as_of is None or str(as_of).strip() == "":
            return None
        first = next((c for c in columns if c.kind == "datetime"), None)
        if first is None:
            raise ValueError("--as-of needs a timestamp column to measure a post's age: add --datetime-cols")
        t = parse_datetime(as_of, first.timezone, first.format, column="--as-of")
        return cls(t, float(min_age_days), first.name)

    def age_days(self, value: float) -> float:
        """A post's age at the export time, in days, from its parsed time (Unix seconds)."""
        return (self.as_of.timestamp() - value) / SECONDS_PER_DAY

    def check(self, value: float | None) -> str | None:
        """The ``label_not_final`` detail for a post too young, else None (also for no time)."""
        if value is None:
            return None
        age = self.age_days(value)
        if age < 0:
            return (f"{self.column}: {utc_datetime(value).isoformat()} is after --as-of "
                    f"{self.as_of.isoformat()}; its counts cannot be final")
        if age < self.min_age_days:
            return (f"{self.column}: posted {age:.1f} days before --as-of {self.as_of.isoformat()}; its counts "
                    f"still grow (--min-label-age-days {self.min_age_days:g})")
        return None

    def count_unknown_age(self, values: Sequence[float | None]) -> int:
        return sum(v is None for v in values)

    def to_dict(self) -> dict:
        return {"as_of": self.as_of.isoformat(), "min_label_age_days": self.min_age_days, "column": self.column,
                "reason": LABEL_NOT_FINAL}


# ---------------------------------------------------------------------------------------
# Outcome columns
# ---------------------------------------------------------------------------------------


def outcome_word(name: str) -> str | None:
    """The outcome word a column name contains (module docstring), or None."""
    key = "".join(ch for ch in name.lower() if ch not in "_- ")
    for word in OUTCOME_WORDS:
        if word in key:
            return word
    for stem in OUTCOME_COUNT_STEMS:
        if f"{stem}count" in key:
            return f"{stem} count"
    return None


def check_outcome_columns(names: Sequence[str], allow: bool) -> list[str]:
    """The feature columns that look like outcomes. Unless ``allow``, a non-empty list is a
    ``ValueError`` whose message says why and how to override; with ``allow`` the caller
    logs the returned names as a warning."""
    found = [(n, w) for n in names if (w := outcome_word(n)) is not None]
    if found and not allow:
        listed = ", ".join(f"{n!r} ({w})" for n, w in found)
        raise ValueError(
            f"feature column(s) {listed} look like outcomes of the post: they are counted after posting, like "
            "the label, so as inputs they leak the answer (the test R² looks excellent, and no prediction can be "
            "made before posting). Remove them, or pass --allow-outcome-cols if they are known before posting.")
    return [n for n, _ in found]


# ---------------------------------------------------------------------------------------
# A feature that is the label in disguise
# ---------------------------------------------------------------------------------------


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x)  # ties get their mean rank


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def label_correlation_warnings(features: Mapping[str, Sequence[float | None]], labels: Sequence[float],
                               threshold: float = CORRELATION_WARN) -> list[dict]:
    """Warning records for the numeric columns in ``features`` (train values, parallel to
    ``labels``; None = missing, left out) whose correlation with the label exceeds
    ``threshold`` in size. Needs 3 rows with a value; a constant column correlates with nothing."""
    y_all = np.asarray(labels, dtype=np.float64)
    out = []
    for name, values in features.items():
        present = np.array([v is not None for v in values], dtype=bool)
        if present.sum() < 3:
            continue
        x = np.asarray([v for v in values if v is not None], dtype=np.float64)
        y = y_all[present]
        pearson, spearman = _corr(x, y), _corr(_ranks(x), _ranks(y))
        strongest = max(abs(pearson), abs(spearman))
        if strongest > threshold:
            out.append({
                "column": name, "pearson": round(pearson, 4), "spearman": round(spearman, 4), "n": int(present.sum()),
                "threshold": threshold,
                "message": f"feature {name!r} correlates {strongest:.3f} with the label on the train split "
                           f"(> {threshold:g}): an outcome of the post, or the label itself, would leak the answer",
            })
    return out
