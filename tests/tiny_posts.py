"""Shared test data: posts tables with their images, and a tiny preprocessed dataset.

Not a test module. ``write_posts`` is the one writer of the raw inputs that preprocessing,
the table scorer and pretraining read: a posts table (any delimiter and encoding, as a
spreadsheet saves it, or JSONL) beside its images; ``write_table`` and ``write_images``
are its two halves, for a test that needs only one. ``write_tiny_posts`` writes what ``data_preprocessing/
preprocess.py`` writes (records + meta.json) without decoding JPEGs, so a 48-post set
for ``test_train.py`` and ``test_train_ddp.py`` takes well under a second.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from data_preprocessing.features import FeatureColumn, FeatureSchema
from data_preprocessing.posts import RECORD_FORMAT_VERSION, PrepareConfig, Record
from data_preprocessing.prepare import CLEANING_VERSION, ResizePolicy
from data_preprocessing.records import RecordWriter

WORDS = "sunset beach dog pizza coffee city forest gym cat happy love new morning friends".split()


def write_images(folder: Path, n: int, size=(48, 36)) -> list[str]:
    """n small distinct JPEGs ``000.jpg``...: ``size`` (w, h), turned for every third one, so
    some are portrait and some landscape; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        rng = np.random.default_rng(i)
        w, h = size if i % 3 else size[::-1]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:03d}.jpg", quality=90)
        names.append(f"{i:03d}.jpg")
    return names


# A JSONL cell that leaves its key out of the object (None is written as null).
ABSENT = object()
POSTS_HEADER = ("image_path", "description", "engagement")


def write_table(path: Path, header: Sequence[str], rows: Sequence[Sequence], sep: str = ",",
                encoding: str = "utf-8") -> Path:
    """A posts table: ``.jsonl``/``.ndjson`` as one JSON object per row (``ABSENT`` cells left
    out), anything else as delimited text with ``sep`` in ``encoding`` (``utf-8-sig`` for
    Excel's BOM; None is an empty cell)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".jsonl", ".ndjson"):
        with open(path, "w", encoding=encoding) as fh:
            for row in rows:
                obj = {k: v for k, v in zip(header, row) if v is not ABSENT}
                fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
        return path
    with open(path, "w", newline="", encoding=encoding) as fh:
        w = csv.writer(fh, delimiter=sep)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_posts(root: Path, rows: Sequence[Sequence], header: Sequence[str] = POSTS_HEADER, *,
                image_cols: Sequence[str] = ("image_path",), images: Mapping[str, bytes | Image.Image] | None = None,
                size=(48, 36), name: str = "posts.csv", sep: str = ",", encoding: str = "utf-8") -> Path:
    """A posts table ``root/name`` (as ``write_table`` writes it) beside its images in ``root/images``.

    An int ``i`` in one of ``image_cols`` is the i-th of ``write_images``' JPEGs (``size``),
    written for the table and named in the cell as ``images/000.jpg``. ``images`` adds files
    of the test's own (JPEG/PNG bytes, or a PIL image saved in its suffix's format), which
    rows name as ``images/<name>``. Returns the table's path.
    """
    def drawn(c: int, v) -> bool:  # a JSON true in an image column stays a cell
        return c in cols and isinstance(v, int) and not isinstance(v, bool)

    cols = [header.index(c) for c in image_cols if c in header]
    n = max((v + 1 for row in rows for c, v in enumerate(row) if drawn(c, v)), default=0)
    names = write_images(root / "images", n, size) if n else []
    for file, content in (images or {}).items():
        (root / "images").mkdir(parents=True, exist_ok=True)
        if isinstance(content, Image.Image):
            content.save(root / "images" / file, quality=90)  # quality: JPEG only
        else:
            (root / "images" / file).write_bytes(content)
    cells = [[f"images/{names[v]}" if drawn(c, v) else v for c, v in enumerate(row)] for row in rows]
    return write_table(root / name, header, cells, sep=sep, encoding=encoding)


FEATURE_COLUMNS = (FeatureColumn("followers", "numeric", 0.0, None), FeatureColumn("platform", "categorical"))
PLATFORMS = ("instagram", "tiktok", "x")
# A timestamp column read in New York time; posts are a day apart in row order (each at a
# random time of day), so train is older than val and val older than test: a time split.
POSTED_AT = FeatureColumn("posted_at", "datetime", timezone="America/New_York")
POSTED_FROM = 1_735_689_600.0  # 2025-01-01T00:00:00Z


def local_hour(unix_seconds: float, column: FeatureColumn = POSTED_AT) -> float:
    """The hour of day (a fraction) of a time in the column's zone."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    t = datetime.fromtimestamp(unix_seconds, tz=ZoneInfo(column.timezone))
    return t.hour + t.minute / 60 + t.second / 3600


def write_tiny_posts(out_dir: Path, counts=(("train", 32), ("val", 8), ("test", 8)), seed: int = 0,
                     shortest_edge: int = 224, features: bool = False, posted_at: bool = False) -> Path:
    """Posts whose label depends on image colour and sentiment (so there is signal to learn).

    ``features=True`` adds ``followers`` (log-normal, the label's main driver, a few
    missing) and ``platform`` columns; ``posted_at=True`` a ``POSTED_AT`` timestamp (Unix
    seconds) whose local hour moves the label (posts at 20 h do best). Either way the
    schema is fitted on train and written to meta.json.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    columns = (FEATURE_COLUMNS if features else ()) + ((POSTED_AT,) if posted_at else ())
    row, train_values = 0, {c.name: [] for c in columns}
    for split, n in counts:
        writer = RecordWriter(out_dir, split)
        for _ in range(n):
            colour = rng.integers(0, 256, 3)
            # Already at the processor's resize size, as preprocess.py would leave it.
            pixels = np.clip(rng.normal(colour, 30, (shortest_edge, shortest_edge + 32, 3)), 0, 255)
            sentiment = float(rng.uniform(-1, 1))
            z = 3 + colour[0] / 100 + sentiment + rng.normal(0, 0.3)
            feats = {}
            if features:
                followers = float(np.round(np.exp(rng.normal(7, 1.5))))
                z += 1.5 * (np.log1p(followers) - 7)
                feats = {"followers": None if rng.random() < 0.1 else followers,
                         "platform": PLATFORMS[int(rng.integers(len(PLATFORMS)))]}
            if posted_at:  # drawn last, so the other columns are those of a set without it
                feats["posted_at"] = POSTED_FROM + row * 86_400 + float(rng.uniform(0, 86_400))
                z += 0.8 * np.cos(2 * np.pi * (local_hour(feats["posted_at"]) - 20) / 24)
            if split == "train":
                for k, v in feats.items():
                    train_values[k].append(v)
            writer.write(Record(image=Image.fromarray(pixels.astype(np.uint8)),
                                text=" ".join(rng.choice(WORDS, int(rng.integers(1, 12)))),
                                sentiment=sentiment, features=feats, label=float(np.round(np.expm1(max(z, 0)))),
                                row=row))
            row += 1
        writer.close()
    policy = ResizePolicy(shortest_edge)
    schema = FeatureSchema.fit(columns, train_values)
    meta = {"cleaning_version": CLEANING_VERSION, "counts": {"splits": dict(counts)},
            "image_size_policy": {"shortest_edge": shortest_edge, "resample": 3, "resample_name": "BICUBIC"},
            "prepare": PrepareConfig(policy, features=schema).to_dict(),
            "record_format": {"version": RECORD_FORMAT_VERSION}}
    (out_dir / "meta.json").write_text(json.dumps(meta))
    return out_dir
