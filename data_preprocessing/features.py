"""The posts table's other columns (followers, platform, posting time): parsing and encoding.

A *feature column* is declared by the user (``preprocess.py --numeric-cols
followers:0:,posted_hour:0:23 --categorical-cols platform --datetime-cols posted_at``). Its
values go through two steps, both owned here so preprocessing, training and serving agree:

1. ``FeatureColumn.parse``: a raw cell -> a typed value, or ``FeatureError``.
   - numeric: a finite number inside the column's bounds, ``None`` when the cell is
     empty (missing). A spreadsheet's thousands separators are read without them
     (``"13,579"`` and ``"13 579"`` -> 13579; ``THOUSANDS_RE``). Text, booleans, NaN, inf
     or a value outside the bounds raise ``FeatureError("invalid_feature")``: a rejected
     row in preprocessing, a 422 in serving.
   - categorical: the value as a stripped string, ``None`` when empty.
   - datetime: Unix seconds (UTC) as a float, ``None`` when empty; a cell that is no
     timestamp raises ``FeatureError("invalid_datetime")`` (``parse_datetime``).
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
   - datetime: the time in the column's zone (``--timezone``, daylight saving included),
     as its parts (``DEFAULT_DATETIME_PARTS`` unless asked otherwise): ``hour`` of day and
     ``weekday``, each a cyclic (sin, cos) pair so that 23 h and 0 h are neighbours; then
     the missing indicator. A missing value gets the train mean of each cyclic input.
     The opt-in part ``time`` adds days since the epoch, standardised with the train mean
     and std (clipped to +-``CLIP_Z``; missing -> the train median), for a slow drift of
     engagement. It is not a default: it extrapolates linearly past the train period, which
     is exactly where a time split tests and where a served model predicts, and on the demo
     export (a linear drift of -0.3 a year) a features-only least-squares baseline gained
     +0.002 R² from it under 10-fold CV and lost 0.013 on the time split's test posts.

Timestamp cells (``parse_datetime``, also what splits and the label-age filter use):
ISO 8601 (``2025-03-05T23:30:00Z``, ``+0000``, ``+00:00``; without an offset the time is
read in the column's zone), Unix seconds or milliseconds, or the column's ``--datetime-
format`` (strptime, tried first). A number is Unix *seconds* below ``UNIX_MS_FROM`` and
milliseconds from it on; either way it must fall between ``PLAUSIBLE_YEARS`` (no posts
before 1990), so an hour-of-day or ``20250305`` column is never silently read as 1970.
A local time that a daylight-saving change skips or repeats is read with the offset in
force before the change (``zoneinfo``'s ``fold=0``).

The encoded width is derived from the schema (``FeatureSchema.width``), never hard-coded.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone as dt_timezone
from typing import Mapping, Sequence
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np

FEATURE_KINDS = ("numeric", "categorical", "datetime")
FEATURE_REASON = "invalid_feature"  # rejects.csv reason and serving's 422 reason
# rejects.csv reason of a bad timestamp cell; serving answers it as FEATURE_REASON (FeatureError.api_reason)
DATETIME_REASON = "invalid_datetime"
DEFAULT_TIMEZONE = "UTC"
DATETIME_PARTS = ("hour", "weekday", "time")  # the parts a datetime column can give the head
DEFAULT_DATETIME_PARTS = ("hour", "weekday")  # why not "time": the module docstring
UNIX_MS_FROM = 1e11  # a number >= this is Unix milliseconds (1e11 s would be the year 5138)
PLAUSIBLE_YEARS = (1990, 2100)  # a Unix time outside [1 Jan 1990, 1 Jan 2100) is not a post's time
SECONDS_PER_DAY = 86400.0
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

    @property
    def api_reason(self) -> str:
        """The reason an API client gets: a bad timestamp is a bad feature value like any other
        (``invalid_feature``), while preprocessing's rejects keep the finer ``invalid_datetime``."""
        return FEATURE_REASON if self.reason == DATETIME_REASON else self.reason


def _is_missing(raw) -> bool:
    if raw is None:
        return True
    if isinstance(raw, float) and math.isnan(raw):
        return True  # pandas' own missing marker, never a user's "nan" text
    return isinstance(raw, str) and raw.strip() == ""


# ---------------------------------------------------------------------------------------
# Timestamps
# ---------------------------------------------------------------------------------------

_NUMBER_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_PLAUSIBLE_S = tuple(datetime(y, 1, 1, tzinfo=dt_timezone.utc).timestamp() for y in PLAUSIBLE_YEARS)


def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name`` (``Europe/Berlin``); ``ValueError`` naming the flag if unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"--timezone {name!r} is not an IANA time zone name (e.g. UTC, Europe/Berlin, "
                         "America/New_York)") from None


def _from_unix(x: float) -> datetime | None:
    """Unix seconds or milliseconds (by magnitude) -> aware UTC datetime; None if implausible."""
    seconds = x / 1000.0 if abs(x) >= UNIX_MS_FROM else x
    if not _PLAUSIBLE_S[0] <= seconds < _PLAUSIBLE_S[1]:
        return None
    return datetime.fromtimestamp(seconds, tz=dt_timezone.utc)


def _from_text(s: str, tz: ZoneInfo, fmt: str | None) -> datetime | None:
    """A stripped text cell -> aware datetime (any offset), or None; see the module docstring."""
    candidates = []
    if fmt:
        candidates.append(lambda: datetime.strptime(s, fmt))
    if _NUMBER_RE.fullmatch(s):
        candidates.append(lambda: _from_unix(float(s)))
    candidates.append(lambda: datetime.fromisoformat(s))
    for attempt in candidates:
        try:
            t = attempt()
        except (ValueError, OverflowError, OSError):
            continue
        if t is not None:
            # No offset in the cell: the wall-clock time is the column's zone's.
            return t if t.tzinfo is not None else t.replace(tzinfo=tz)
    return None


def parse_datetime(raw, timezone: str = DEFAULT_TIMEZONE, fmt: str | None = None,
                   column: str = "datetime") -> datetime | None:
    """A timestamp cell -> an aware UTC datetime, ``None`` when the cell is empty.

    ``raw`` is a CSV string, a JSON number or string, or a ``datetime`` (naive = in
    ``timezone``). Anything else raises ``FeatureError(column, ..., "invalid_datetime")``
    whose message names the column and the value. The formats are in the module docstring.
    """
    if _is_missing(raw):
        return None
    tz = zone(timezone)
    t = None
    if isinstance(raw, datetime):
        t = raw if raw.tzinfo is not None else raw.replace(tzinfo=tz)
    elif isinstance(raw, (int, float)) and not isinstance(raw, bool):
        t = _from_unix(float(raw)) if math.isfinite(raw) else None
    elif isinstance(raw, str):
        t = _from_text(raw.strip(), tz, fmt)
    if t is None:
        accepted = "ISO 8601 such as 2025-03-05T23:30:00+00:00, Unix seconds or milliseconds from 1990 to 2100"
        raise FeatureError(column, f"{str(raw)[:50]!r} is not a timestamp ({accepted}"
                                   f"{f', or --datetime-format {fmt}' if fmt else ''})", reason=DATETIME_REASON)
    return t.astimezone(dt_timezone.utc)


def utc_datetime(value: float) -> datetime:
    """A parsed datetime feature value (Unix seconds) -> aware UTC datetime."""
    return datetime.fromtimestamp(value, tz=dt_timezone.utc)


def datetime_parts(value: float, timezone: str, parts: Sequence[str] = DEFAULT_DATETIME_PARTS) -> list[float]:
    """The raw (unstandardised) inputs of one timestamp: (sin, cos) of the local hour of day
    and of the local day of week, and days since the epoch, for the ``parts`` asked for."""
    local = datetime.fromtimestamp(value, tz=zone(timezone))
    hour = local.hour + local.minute / 60 + local.second / 3600  # a fraction: 23:59 is next to 0:00
    out: list[float] = []
    for part in parts:
        if part == "hour":
            out += [math.sin(2 * math.pi * hour / 24), math.cos(2 * math.pi * hour / 24)]
        elif part == "weekday":  # Monday = 0
            out += [math.sin(2 * math.pi * local.weekday() / 7), math.cos(2 * math.pi * local.weekday() / 7)]
        else:  # "time"
            out.append(value / SECONDS_PER_DAY)
    return out


def _part_inputs(part: str) -> list[str]:
    return {"hour": ["hour_sin", "hour_cos"], "weekday": ["weekday_sin", "weekday_cos"], "time": ["time"]}[part]


# ---------------------------------------------------------------------------------------
# Columns, their fitted encodings, and the schema
# ---------------------------------------------------------------------------------------

# Fields that only a datetime column uses: left out of a numeric or categorical column's
# dict, so meta.json and artifacts of those kinds read as they did before datetimes.
_DATETIME_FIELDS = ("timezone", "format", "parts")


@dataclass(frozen=True)
class FeatureColumn:
    """A declared column: its name, kind, (numeric) the bounds a value must lie in, and
    (datetime) the zone its local time is taken in, the strptime format of its cells if
    any, and the parts the head sees."""

    name: str
    kind: str
    min: float | None = None
    max: float | None = None
    timezone: str | None = None  # datetime: IANA name; None -> DEFAULT_TIMEZONE
    format: str | None = None  # datetime: strptime format tried before ISO 8601 and Unix time
    parts: tuple[str, ...] = ()  # datetime: a subset of DATETIME_PARTS; () -> DEFAULT_DATETIME_PARTS

    def __post_init__(self):
        if self.kind not in FEATURE_KINDS:
            raise ValueError(f"feature {self.name!r}: kind must be one of {FEATURE_KINDS}, got {self.kind!r}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"feature {self.name!r}: min {self.min} > max {self.max}")
        if self.kind != "datetime":
            if self.timezone is not None or self.format is not None or self.parts:
                raise ValueError(f"feature {self.name!r}: a zone, format or parts apply to datetime columns only")
            return
        # frozen: defaults are filled in through object.__setattr__, once, here
        object.__setattr__(self, "timezone", self.timezone or DEFAULT_TIMEZONE)
        object.__setattr__(self, "parts", tuple(self.parts) or DEFAULT_DATETIME_PARTS)
        zone(self.timezone)
        if not set(self.parts) <= set(DATETIME_PARTS) or len(set(self.parts)) != len(self.parts):
            raise ValueError(f"feature {self.name!r}: parts must be distinct names from {DATETIME_PARTS}, "
                             f"got {self.parts}")
        if self.format is not None and "%" not in self.format:
            raise ValueError(f"--datetime-format {self.format!r} has no strptime directive (e.g. %m/%d/%Y %H:%M)")

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.kind != "datetime":
            return {k: v for k, v in d.items() if k not in _DATETIME_FIELDS}
        return {**d, "parts": list(self.parts)}

    def describe(self) -> dict:
        """What a client must send for this column (``/metadata``, ``meta.json``)."""
        out: dict = {"name": self.name, "kind": self.kind}
        if self.kind == "numeric":
            out.update(min=self.min, max=self.max)
        elif self.kind == "datetime":
            out.update(timezone=self.timezone, format=self.format, parts=list(self.parts),
                       accepts="ISO 8601 (Z, +0000 or +00:00; without an offset the time is in timezone), "
                               "Unix seconds or milliseconds" + (", or format (strptime)" if self.format else ""))
        return out

    def parse(self, raw) -> Value:
        """A raw cell (str from CSV, JSON value, or an already parsed value) -> typed value."""
        if self.kind == "datetime":  # Unix seconds, so a parsed value parses to itself
            t = parse_datetime(raw, self.timezone, self.format, self.name)
            return None if t is None else t.timestamp()
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


def parse_column_specs(numeric: str, categorical: str, datetime_cols: str = "",
                       timezone: str = DEFAULT_TIMEZONE, datetime_format: str | None = None,
                       datetime_parts: str = "") -> tuple[FeatureColumn, ...]:
    """``"followers:0:,posted_hour:0:23"``, ``"platform"`` and ``"posted_at"`` -> declared
    columns, in that order (numeric, categorical, datetime).

    A numeric spec is ``name`` or ``name:min:max`` with either bound left empty. Every
    datetime column takes ``timezone``, ``datetime_format`` and ``datetime_parts``
    (``--timezone``, ``--datetime-format``, ``--datetime-parts hour,weekday,time``; empty =
    ``DEFAULT_DATETIME_PARTS``).
    """
    cols: list[FeatureColumn] = []
    for spec in filter(None, (s.strip() for s in numeric.split(","))):
        name, *bounds = spec.split(":")
        if len(bounds) not in (0, 2):
            raise ValueError(f"numeric column spec {spec!r}: use NAME or NAME:MIN:MAX (a bound may be empty)")
        lo, hi = (None if b.strip() == "" else float(b) for b in bounds) if bounds else (None, None)
        cols.append(FeatureColumn(name.strip(), "numeric", lo, hi))
    cols += [FeatureColumn(s.strip(), "categorical") for s in categorical.split(",") if s.strip()]
    parts = tuple(p.strip() for p in datetime_parts.split(",") if p.strip())
    cols += [FeatureColumn(s.strip(), "datetime", timezone=timezone, format=datetime_format or None, parts=parts)
             for s in datetime_cols.split(",") if s.strip()]
    names = [c.name for c in cols]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes or "" in names:
        raise ValueError(f"feature columns must be named once each: {dupes or 'an empty name'}")
    return tuple(cols)


@dataclass(frozen=True)
class FeatureSpec:
    """A column plus what it learned on the train split: how to encode its values."""

    column: FeatureColumn
    transform: str = "none"  # numeric: "log1p" or "none"; categorical: "one_hot"; datetime: "cyclic"
    mean: float = 0.0  # numeric, of the transformed train values; datetime: of the train days since the epoch
    std: float = 1.0
    impute: float = 0.0  # numeric: train median, transformed (the value a missing cell gets)
    categories: tuple[str, ...] = ()  # categorical: slots in this order, then "unknown"
    train_missing_frac: float = 0.0
    # datetime: the inputs (all but the missing flag) a missing value gets: the train mean of
    # each cyclic input, the standardised train median of "time"
    impute_inputs: tuple[float, ...] = ()

    @property
    def name(self) -> str:
        return self.column.name

    @property
    def width(self) -> int:
        return len(self.input_names())

    def input_names(self) -> list[str]:
        if self.column.kind == "numeric":
            return [self.name, f"{self.name}__missing"]
        if self.column.kind == "datetime":
            parts = [f"{self.name}__{n}" for p in self.column.parts for n in _part_inputs(p)]
            return parts + [f"{self.name}__missing"]
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
        if column.kind == "datetime":
            return cls._fit_datetime(column, present, missing_frac)
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

    @classmethod
    def _fit_datetime(cls, column: FeatureColumn, present: list, missing_frac: float) -> "FeatureSpec":
        if not present:
            return cls(column, "cyclic", impute_inputs=(0.0,) * (cls(column).width - 1),
                       train_missing_frac=missing_frac)
        days = np.asarray(present, dtype=np.float64) / SECONDS_PER_DAY
        std = float(days.std())
        spec = cls(column, "cyclic", float(days.mean()), std if std > 1e-12 else 1.0, float(np.median(days)),
                   train_missing_frac=missing_frac)
        impute = spec.encode(present)[:, :-1].mean(axis=0).astype(np.float64)
        if "time" in column.parts:  # the median day, not the mean: as a numeric column imputes
            impute[spec._time_input()] = (spec.impute - spec.mean) / spec.std
        return replace(spec, impute_inputs=tuple(float(v) for v in impute))

    def _time_input(self) -> int:
        return self.input_names().index(f"{self.name}__time")

    def _encode_datetime(self, values: Sequence[Value], out: np.ndarray) -> np.ndarray:
        t = self._time_input() if "time" in self.column.parts else None
        for i, v in enumerate(values):
            if v is None:
                out[i, :-1] = self.impute_inputs or 0.0
                out[i, -1] = 1.0
                continue
            row = datetime_parts(v, self.column.timezone, self.column.parts)
            if t is not None:
                row[t] = float(np.clip((row[t] - self.mean) / self.std, -CLIP_Z, CLIP_Z))
            out[i, :-1] = row
        return out

    def encode(self, values: Sequence[Value]) -> np.ndarray:
        """(B, width) float32 inputs for one column's parsed values."""
        out = np.zeros((len(values), self.width), dtype=np.float32)
        if self.column.kind == "datetime":
            return self._encode_datetime(values, out)
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
        d = {**asdict(self), "column": self.column.to_dict(), "categories": list(self.categories)}
        if self.column.kind != "datetime":  # as before datetime columns existed
            del d["impute_inputs"]
        else:
            d["impute_inputs"] = list(self.impute_inputs)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "FeatureSpec":
        return cls(**{**d, "column": FeatureColumn(**d["column"]), "categories": tuple(d["categories"]),
                      "impute_inputs": tuple(d.get("impute_inputs", ()))})


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

    def datetime_inputs(self) -> np.ndarray:
        """(width,) bool: which encoded inputs come from timestamp columns."""
        return np.array([f.column.kind == "datetime" for f in self.features for _ in range(f.width)], dtype=bool)

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
