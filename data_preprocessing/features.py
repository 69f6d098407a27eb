"""The posts table's other columns (followers, platform, posting hour): parsing and encoding.

A *feature column* is declared by the user (``preprocess.py --numeric-cols
followers:0:,posted_hour:0:23 --categorical-cols platform``). Its values go through two
steps, both owned here so preprocessing, training and serving agree:

1. ``FeatureColumn.parse``: a raw cell -> a typed value, or ``FeatureError``.
   - numeric: a finite number inside the column's bounds, ``None`` when the cell is
     empty (missing). A spreadsheet's thousands separators are read without them
     (``"13,579"`` and ``"13 579"`` -> 13579; ``THOUSANDS_RE``). Text, booleans, NaN, inf
     or a value outside the bounds raise ``FeatureError("invalid_feature")``: a rejected
     row in preprocessing, a 422 in serving.
   - categorical: the value as a stripped string, ``None`` when empty.
   Parsing is idempotent (a parsed value parses to itself), so a value parsed once in
   preprocessing's parent process can be handed to ``prepare_post`` again unchanged.
2. ``FeatureSchema.encode``: typed values -> the head's input, with statistics fitted on
   the train split (``FeatureSchema.fit``) and saved in ``meta.json`` and the artifact.
   - numeric: ``log1p`` when the train values are non-negative and right-skewed
     (sample skewness > ``SKEW_FOR_LOG``: counts such as followers), otherwise as is;
     then standardised with the train mean and std and clipped to +-``CLIP_Z``. A
     missing value is imputed with the train median (on the transformed scale) and a
     second input, the missing indicator, is 1. Two inputs per numeric column.
   - categorical: one-hot over the train categories (at most ``MAX_CATEGORIES``, the
     most frequent) plus one "unknown" slot for missing or unseen values.

The encoded width is derived from the schema (``FeatureSchema.width``), never hard-coded.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np

FEATURE_KINDS = ("numeric", "categorical")
FEATURE_REASON = "invalid_feature"  # rejects.csv reason and serving's 422 reason
SKEW_FOR_LOG = 1.0  # sample skewness above which a non-negative column is log1p'd
CLIP_Z = 10.0  # standardised values are clipped here: one absurd input cannot swamp the head
MAX_CATEGORIES = 50  # more frequent categories get their own slot; the rest share "unknown"
# A number as spreadsheets format it: groups of three digits after a comma or a space
# ("13,579", "1 234 567.5"). Only this exact shape: "1,5" (a decimal comma) or "12,34"
# stay invalid rather than being guessed at.
THOUSANDS_RE = re.compile(r"^\d{1,3}([, ]\d{3})+(\.\d+)?$")

Value = float | str | None  # a parsed feature value; None = missing


class FeatureError(ValueError):
    """A feature cell that cannot be used; ``column`` names it, ``reason`` is a stable code."""

    def __init__(self, column: str, message: str, reason: str = FEATURE_REASON):
        super().__init__(f"{column}: {message}")
        self.column = column
        self.reason = reason
        self.message = f"{column}: {message}"


def _is_missing(raw) -> bool:
    if raw is None:
        return True
    if isinstance(raw, float) and math.isnan(raw):
        return True  # pandas' own missing marker, never a user's "nan" text
    return isinstance(raw, str) and raw.strip() == ""


@dataclass(frozen=True)
class FeatureColumn:
    """A declared column: its name, kind and (numeric) the bounds a value must lie in."""

    name: str
    kind: str
    min: float | None = None
    max: float | None = None

    def __post_init__(self):
        if self.kind not in FEATURE_KINDS:
            raise ValueError(f"feature {self.name!r}: kind must be one of {FEATURE_KINDS}, got {self.kind!r}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"feature {self.name!r}: min {self.min} > max {self.max}")

    def parse(self, raw) -> Value:
        """A raw cell (str from CSV, JSON value, or an already parsed value) -> typed value."""
        if _is_missing(raw):
            return None
        if self.kind == "categorical":
            return str(raw).strip()
        if isinstance(raw, bool):  # JSON true/false are ints in Python, but not numbers here
            raise FeatureError(self.name, f"{raw!r} is not a number")
        if isinstance(raw, str):
            raw = raw.strip()
            if THOUSANDS_RE.match(raw):
                raw = raw.replace(",", "").replace(" ", "")
        try:
            x = float(raw)
        except (TypeError, ValueError, OverflowError):
            raise FeatureError(self.name, f"{str(raw)[:50]!r} is not a number") from None
        if not math.isfinite(x):
            raise FeatureError(self.name, f"{raw!r} is not finite")
        if (self.min is not None and x < self.min) or (self.max is not None and x > self.max):
            raise FeatureError(self.name, f"{x:g} is outside the allowed range {self.bounds_text()}")
        return x

    def bounds_text(self) -> str:
        lo = "-inf" if self.min is None else f"{self.min:g}"
        hi = "inf" if self.max is None else f"{self.max:g}"
        return f"[{lo}, {hi}]"


def parse_column_specs(numeric: str, categorical: str) -> tuple[FeatureColumn, ...]:
    """``"followers:0:,posted_hour:0:23"`` and ``"platform"`` -> declared columns, in order.

    A numeric spec is ``name`` or ``name:min:max`` with either bound left empty.
    """
    cols: list[FeatureColumn] = []
    for spec in filter(None, (s.strip() for s in numeric.split(","))):
        name, *bounds = spec.split(":")
        if len(bounds) not in (0, 2):
            raise ValueError(f"numeric column spec {spec!r}: use NAME or NAME:MIN:MAX (a bound may be empty)")
        lo, hi = (None if b.strip() == "" else float(b) for b in bounds) if bounds else (None, None)
        cols.append(FeatureColumn(name.strip(), "numeric", lo, hi))
    cols += [FeatureColumn(s.strip(), "categorical") for s in categorical.split(",") if s.strip()]
    names = [c.name for c in cols]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes or "" in names:
        raise ValueError(f"feature columns must be named once each: {dupes or 'an empty name'}")
    return tuple(cols)


@dataclass(frozen=True)
class FeatureSpec:
    """A column plus what it learned on the train split: how to encode its values."""

    column: FeatureColumn
    transform: str = "none"  # numeric: "log1p" or "none"; categorical: "one_hot"
    mean: float = 0.0  # numeric, of the transformed train values
    std: float = 1.0
    impute: float = 0.0  # numeric: train median, transformed (the value a missing cell gets)
    categories: tuple[str, ...] = ()  # categorical: slots in this order, then "unknown"
    train_missing_frac: float = 0.0

    @property
    def name(self) -> str:
        return self.column.name

    @property
    def width(self) -> int:
        return 2 if self.column.kind == "numeric" else len(self.categories) + 1

    def input_names(self) -> list[str]:
        if self.column.kind == "numeric":
            return [self.name, f"{self.name}__missing"]
        return [f"{self.name}={c}" for c in self.categories] + [f"{self.name}=<unknown>"]

    @classmethod
    def fit(cls, column: FeatureColumn, values: Sequence[Value]) -> "FeatureSpec":
        present = [v for v in values if v is not None]
        missing_frac = round(1 - len(present) / len(values), 6) if values else 0.0
        if column.kind == "categorical":
            counts = Counter(present).most_common(MAX_CATEGORIES)
            # Frequency order, ties by name, so the slots are a pure function of the data.
            cats = tuple(c for c, _ in sorted(counts, key=lambda kv: (-kv[1], kv[0])))
            return cls(column, "one_hot", categories=cats, train_missing_frac=missing_frac)
        x = np.asarray(present, dtype=np.float64)
        if x.size == 0:
            return cls(column, "none", train_missing_frac=missing_frac)
        skew = float(((x - x.mean()) ** 3).mean() / x.std() ** 3) if x.std() > 0 else 0.0
        transform = "log1p" if x.min() >= 0 and skew > SKEW_FOR_LOG else "none"
        if transform == "log1p" and (column.min is None or column.min < 0):
            # The model log-transforms this column: a negative value can never be served.
            column = FeatureColumn(column.name, "numeric", 0.0, column.max)
        t = np.log1p(x) if transform == "log1p" else x
        std = float(t.std())
        return cls(column, transform, float(t.mean()), std if std > 1e-12 else 1.0, float(np.median(t)),
                   train_missing_frac=missing_frac)

    def encode(self, values: Sequence[Value]) -> np.ndarray:
        """(B, width) float32 inputs for one column's parsed values."""
        out = np.zeros((len(values), self.width), dtype=np.float32)
        if self.column.kind == "categorical":
            slot = {c: i for i, c in enumerate(self.categories)}
            for i, v in enumerate(values):
                out[i, slot.get(v, len(self.categories))] = 1.0  # missing/unseen -> unknown
            return out
        for i, v in enumerate(values):
            # max(v, 0): a val/test value below the train range must not crash log1p.
            t = self.impute if v is None else (math.log1p(max(v, 0.0)) if self.transform == "log1p" else float(v))
            out[i, 0] = np.clip((t - self.mean) / self.std, -CLIP_Z, CLIP_Z)
            out[i, 1] = float(v is None)
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["categories"] = list(self.categories)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "FeatureSpec":
        return cls(**{**d, "column": FeatureColumn(**d["column"]), "categories": tuple(d["categories"])})


@dataclass(frozen=True)
class FeatureSchema:
    """Every feature column of a dataset or model, in input order."""

    features: tuple[FeatureSpec, ...] = field(default_factory=tuple)

    @property
    def columns(self) -> tuple[FeatureColumn, ...]:
        return tuple(f.column for f in self.features)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def width(self) -> int:
        return sum(f.width for f in self.features)

    def input_names(self) -> list[str]:
        return [n for f in self.features for n in f.input_names()]

    def slices(self) -> dict[str, slice]:
        """Each column's span in the encoded vector (for attributions)."""
        out, start = {}, 0
        for f in self.features:
            out[f.name] = slice(start, start + f.width)
            start += f.width
        return out

    @classmethod
    def fit(cls, columns: Sequence[FeatureColumn], values: Mapping[str, Sequence[Value]]) -> "FeatureSchema":
        return cls(tuple(FeatureSpec.fit(c, values[c.name]) for c in columns))

    def encode(self, rows: Sequence[Mapping[str, Value]]) -> np.ndarray:
        """(B, width) float32 inputs for B posts' parsed feature dicts."""
        parts = [f.encode([r.get(f.name) for r in rows]) for f in self.features]
        return np.concatenate(parts, axis=1) if parts else np.zeros((len(rows), 0), dtype=np.float32)

    def to_dict(self) -> dict:
        return {"features": [f.to_dict() for f in self.features], "width": self.width,
                "inputs": self.input_names()}

    @classmethod
    def from_dict(cls, d: Mapping | None) -> "FeatureSchema":
        return cls(tuple(FeatureSpec.from_dict(f) for f in (d or {}).get("features", [])))
