"""Turn a posts table into train/val/test record files that training reads.

    python data_preprocessing/preprocess.py          # data/posts.csv -> data/processed/
    python data_preprocessing/preprocess.py --input runs/demo/posts/posts.csv --out runs/demo/data \
        --datetime-cols posted_at --timezone America/New_York --split time:posted_at

Run bare, it reads ``data/posts.csv`` and writes ``data/processed/``, relative to the
current directory (the layout of a classic script repo: run it from the repo root);
without that table it says where to put one.

Input: a ``.csv`` (header row; comma, semicolon or tab, sniffed) or ``.jsonl``/``.ndjson``
(one JSON object per line) table with an image, a caption and an engagement label per
post, read by ``data_preprocessing.table`` (dialect, encoding, columns, the cell cap). An
image cell is a path, absolute or relative to the folder that holds the input file, or an
``http(s)://`` URL, downloaded once into the ``--image-cache`` (``data_preprocessing.
download``: ``--download-workers``, ``--download-timeout``, ``--max-image-bytes``; a bar
shows downloads/s); ``--image-col`` may name several columns, and the first non-empty
cell wins. ``--label-col a+b`` sums count columns into the label.

Output, in ``--out DIR``:

* ``{train,val,test}.pkl`` + ``.idx``: one record per kept post, written by
  ``records.RecordWriter`` (a pickle stream plus an int64 offset index). A record is a
  ``posts.Record`` (the prepared post from ``posts.prepare_post``: RGB image, cleaned
  caption, VADER sentiment of the raw caption, parsed feature values; plus label and row),
  stored as the plain dict ``Record.to_dict`` writes.
* ``rejects.csv``: ``row,image_path,reason,detail`` for every row not kept, sorted by
  row. ``row`` is the 0-based index of the data row (the header and blank lines are
  not counted), the same number a record carries in ``"row"``; ``image_path`` is the
  value as written in the table. Cells a spreadsheet would run as formulas are escaped.
* ``fingerprints.npz``: per split, the uint64 fingerprint (``table.post_fingerprint``:
  image file bytes + raw caption) of each record, in record order. Training copies the
  train and val ones into the model, so the table scorer can mark posts it was fit on.
* ``meta.json``: counts, source file hash, the table schema (``table``: columns and
  dialect; training copies it into the model), cleaning version, the ``prepare`` config
  (resize policy, pixel cap, feature schema fitted on the train split), feature and label
  statistics, config, timing and git commit. It is written last, and any earlier
  outputs in DIR are removed when a run starts, so a DIR holding ``meta.json`` is always
  one complete, successful run.

Row policies. A row gets the first reason that applies, in this order
(``REJECT_REASONS``):

1. ``missing_path``: the image cell is empty.
2. Label: ``missing_label`` (empty/null), ``non_numeric_label`` ("12k", "1,234", true),
   ``non_finite_label`` (nan, inf) or ``negative_label`` (< 0); for ``a+b``, the first
   bad column's (the detail names it).
3. ``invalid_feature``: a cell of a ``--numeric-cols`` column that is text, a boolean,
   NaN, inf or outside the column's ``MIN:MAX`` bounds (the detail names the column);
   ``invalid_datetime``: a ``--datetime-cols`` cell that is no timestamp. An empty cell is
   a missing value, kept; so is an empty categorical cell.
4. ``label_not_final``: with ``--as-of``, a post younger than ``--min-label-age-days``
   at that time (by the first datetime column; ``leakage.MaturityRule``): its counts are
   still growing. A post without a time is kept (its age is unknown; the log counts them).
5. ``duplicate``: the same resolved image path (or URL) *and* the same raw caption as an
   earlier row that passed 1-4. The first copy is kept and later ones are rejected
   (whatever their labels), because copies could land in different splits and leak test
   posts into training. A missing caption and an empty one count as the same caption.
6. ``invalid_datetime``: ``--split time:COL`` and the row has no time in COL.
7. Download (``table.resolve_image_sources``): ``unsupported_url`` (a scheme other than
   http and https), ``download_failed`` (the detail gives the HTTP status or the network
   error), ``download_timeout``, ``too_large`` (over ``--max-image-bytes``).
8. Image: the ``prepare.ImageError`` codes (``not_found``, ``empty_file``,
   ``unsupported_format`` (an HTML error page, too), ``corrupt``, ``truncated``,
   ``too_many_pixels``), decided by ``prepare.load_image``.

An empty or missing caption is *kept*: text ``""``, sentiment 0. Image-only posts are
real posts and their engagement is a real signal.

Feature columns named like outcomes of the post (reach, views, likes, ...;
``leakage.check_outcome_columns``) are refused unless ``--allow-outcome-cols``; after
fitting, a numeric feature whose train correlation with the label is above 0.9 gets a
warning in the log and in ``meta.json``.

Splits (``data_preprocessing.splits``, ``--split``): ``random`` (default) fixes each row's
split up front from a seeded shuffle of all row indices, whatever else is rejected;
``time:COL`` sends the oldest usable posts to train and the newest to test; ``group:COL``
keeps all posts of one COL value (an account) in one split. ``meta.json["split"]``
records the rule, the fractions achieved and (time) each split's first and last time.
Preprocessing refuses (exit 1) when train, or a val or test split with a fraction above
0, would be empty (checked before any image is loaded, and again at the end), and warns
when val or test holds fewer than ``MIN_EVAL_POSTS`` posts: the interval is calibrated
on val.

Memory: images never accumulate. Workers load, clean, resize and pickle one post each
and return bytes; the parent only appends them to the split files, and at most a fixed
window of posts is in flight. Downloads stream to the cache on disk. What grows with the
table is the parent's copy of the columns it reads (about 1 KB a row).

Errors (missing input, missing columns, an undecodable file, a cell over
``--max-cell-chars``, empty table, an outcome column, an empty split, more than
``--max-reject-frac`` rejected) exit with status 1 and one ``error: ...`` line. ``main(argv)`` returns 0 on
success; ``meta.json["timing"]`` (posts/s, wall and CPU seconds) is what benchmarks read.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import pickle
import resource
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator, Mapping, NamedTuple

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from common.config import bar_disabled, config_dict, field, git_commit, parse_config, setup_logging, write_json_atomic
from data_preprocessing import download
from data_preprocessing.download import DownloadArgs
from data_preprocessing.features import (DATETIME_PARTS, DATETIME_REASON, DEFAULT_DATETIME_PARTS, DEFAULT_TIMEZONE,
                                         FEATURE_REASON, FeatureColumn, FeatureError, FeatureSchema, parse_column_specs,
                                         utc_datetime, zone)
from data_preprocessing.leakage import (LABEL_NOT_FINAL, MaturityRule, check_outcome_columns,
                                        label_correlation_warnings)
from data_preprocessing.posts import RECORD_FORMAT_VERSION, PrepareConfig, Record, prepare_post
from data_preprocessing.prepare import CLEANING_VERSION, MAX_PIXELS, ImageError, ResizePolicy
from data_preprocessing.records import META_NAME, SPLITS, RecordWriter, record_bytes
from data_preprocessing.splits import (SplitPlan, SplitRule, describe_split, plan_splits, split_summary,
                                       time_column)
from data_preprocessing.table import (FINGERPRINTS_NAME, LABEL_REASONS, REJECTS_NAME, ColumnMap, PostsTable,
                                      ReadOptions, TableError, encoding_field, file_fingerprint, image_source,
                                      max_cell_chars_field, read_table, resolve_image_sources, save_fingerprints,
                                      sep_field, split_names, write_rejects)

logger = logging.getLogger(__name__)

# Every reason rejects.csv can hold, in the order the checks run (module docstring).
REJECT_REASONS = ("missing_path", *LABEL_REASONS, FEATURE_REASON, DATETIME_REASON, LABEL_NOT_FINAL, "duplicate",
                  *download.REASONS[::-1],  # unsupported_url first: decided without a request
                  *(r for r in ImageError.REASONS if r != "missing_path"))
RECORD_FORMAT = "pickle stream + int64 offset index"
# The bare command's paths, relative to the current directory (a classic script repo's layout).
DEFAULT_INPUT, DEFAULT_OUT = "data/posts.csv", "data/processed"
OWN_DATA_DOCS = 'README.md, "On your own data"'
# The interval is calibrated on val, and test R² is measured on test: below this many
# posts either is a rough estimate, and the log says so.
MIN_EVAL_POSTS = 50


def _n_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects taskset/cgroup CPU limits
    except AttributeError:
        return os.cpu_count() or 1


@dataclass
class PreprocessConfig(DownloadArgs):
    """Preprocess a posts table (CSV/JSONL) into train/val/test record files."""

    # Relative paths are taken from the current directory, as in a classic script repo:
    # run bare from the repo root, it reads data/posts.csv and writes data/processed/.
    input: str = field(DEFAULT_INPUT, help="posts table: .csv, or .jsonl/.ndjson with one JSON object per line "
                                           "(relative to the current directory)")
    out: str = field(DEFAULT_OUT, help="output directory for {train,val,test}.pkl/.idx, rejects.csv and meta.json")
    image_col: str = field("image_path",
                           help="column with the image path (absolute, or relative to the input file's folder) or "
                                "http(s) URL; several, comma-separated, take the first non-empty cell "
                                "(thumbnail_url,media_url)")
    text_col: str = field("description", help="column with the raw caption")
    label_col: str = field("engagement", help="column with the engagement label (a count, >= 0), or count columns "
                                              "summed: like_count+comments_count")
    numeric_cols: str = field("", help="extra numeric feature columns, comma-separated; NAME or NAME:MIN:MAX "
                                       "(a bound may be empty), e.g. followers:0:")
    categorical_cols: str = field("", help="extra categorical feature columns, comma-separated, e.g. platform")
    datetime_cols: str = field("", help="timestamp feature columns, comma-separated, e.g. posted_at: ISO 8601, Unix "
                                        "seconds/milliseconds or --datetime-format; the head sees the local hour and "
                                        "weekday (cyclic) and a missing flag")
    timezone: str = field(DEFAULT_TIMEZONE, help="IANA zone of the audience (America/New_York): timestamps become "
                                                 "local time, daylight saving included, before hour and weekday; "
                                                 "cells without an offset are read in it")
    datetime_format: str = field("", help="strptime format of the timestamp cells, tried before ISO 8601 and Unix "
                                          "time, e.g. '%%m/%%d/%%Y %%H:%%M'")
    datetime_parts: str = field("", help=f"parts of each timestamp the head sees, comma-separated, from "
                                         f"{','.join(DATETIME_PARTS)}; empty = {','.join(DEFAULT_DATETIME_PARTS)} "
                                         "(time: days since the epoch, for drift)")
    allow_outcome_cols: bool = field(False, help="accept feature columns named like outcomes of the post (reach, "
                                                 "views, saves, likes, ...), which are refused by default")
    sep: str = sep_field()
    encoding: str = encoding_field()
    max_cell_chars: int = max_cell_chars_field()
    split: str = field("random", help="random (a seeded shuffle), time:COL (oldest posts to train, newest to "
                                      "test) or group:COL (all posts of one COL value, an account, in one split)")
    val_frac: float = field(0.1, help="fraction of rows assigned to the validation split")
    test_frac: float = field(0.1, help="fraction of rows assigned to the test split")
    seed: int = field(0, help="seed of the random split's shuffle (and of the group split's hash)")
    as_of: str | None = field(None, help="the export time of the table (read like a cell of the first "
                                         "--datetime-cols column): posts younger than --min-label-age-days then "
                                         "are rejected label_not_final; without it, no post is")
    min_label_age_days: float = field(0.0, help="with --as-of: days a post's counts take to be final")
    workers: int = field(help="worker processes (1 = run in this process)", default_factory=_n_cpus)
    chunksize: int = field(0, help="posts per task sent to a worker; 0 = automatic")
    max_reject_frac: float = field(0.2, help="fail (exit 1) when more than this fraction of rows is rejected")
    # The default is CLIPImageProcessor's default shortest edge; --clip-processor takes it
    # from the processor actually used instead.
    resize_shortest_edge: int = field(
        ResizePolicy.shortest_edge,
        help="pre-resize images so their shortest edge is this many pixels (bicubic, as CLIP); 0 = keep full size",
    )
    clip_processor: str | None = field(
        None, help="CLIP processor dir or name; if given, its size and resample replace --resize-shortest-edge"
    )
    max_pixels: int = field(MAX_PIXELS, help="reject images with more pixels than this (decompression-bomb guard)")
    progress: bool = field(True, help="show tqdm progress bars (downloads/s, posts/s)")

    def __post_init__(self):
        super().__post_init__()  # the download flags
        for name in ("val_frac", "test_frac"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if self.val_frac + self.test_frac >= 1.0:
            raise ValueError(f"--val-frac + --test-frac must be < 1 (got {self.val_frac + self.test_frac})")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.chunksize < 0:
            raise ValueError(f"--chunksize must be >= 0, got {self.chunksize}")
        if not 0.0 <= self.max_reject_frac <= 1.0:
            raise ValueError(f"--max-reject-frac must be in [0, 1], got {self.max_reject_frac}")
        if self.resize_shortest_edge < 0:
            raise ValueError(f"--resize-shortest-edge must be >= 0, got {self.resize_shortest_edge}")
        if self.max_pixels < 1:
            raise ValueError(f"--max-pixels must be >= 1, got {self.max_pixels}")
        if self.min_label_age_days and not self.as_of:
            raise ValueError("--min-label-age-days needs --as-of, the export time a post's age is measured at")
        # Malformed specs, zones, split rules and --as-of fail here, before any work.
        self.table_columns()
        self.time_column()
        self.maturity_rule()
        ReadOptions.of(self)

    def feature_columns(self) -> tuple[FeatureColumn, ...]:
        return parse_column_specs(self.numeric_cols, self.categorical_cols, self.datetime_cols, self.timezone,
                                  self.datetime_format or None, self.datetime_parts)

    def split_rule(self) -> SplitRule:
        return SplitRule.parse(self.split)

    def time_column(self) -> FeatureColumn | None:
        """The datetime column a time split orders by (None for other rules)."""
        return time_column(self.split_rule(), self.feature_columns(), self.timezone, self.datetime_format or None)

    def maturity_rule(self) -> MaturityRule | None:
        return MaturityRule.from_flags(self.as_of, self.min_label_age_days, self.feature_columns())

    def table_columns(self) -> ColumnMap:
        """The column mapping: raises ValueError for a column named for two roles."""
        rule = self.split_rule()
        return ColumnMap(split_names(self.image_col), self.text_col, self.label_col,
                         {c.name: f"--{c.kind}-cols" for c in self.feature_columns()},
                         extra={rule.column: "--split"} if rule.column else {})


# ---------------------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------------------


def _cpu_times() -> tuple[float, float]:
    """(this process, its reaped children) user+system CPU seconds."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# Per-post work (runs in worker processes)
# ---------------------------------------------------------------------------------------


class Prepared(NamedTuple):
    """What a worker sends back for one post: its pickled record, or why it was rejected."""

    row: int
    payload: bytes | None  # the pickled record; None for a reject
    reason: str | None = None
    detail: str = ""
    fingerprint: int | None = None  # table.post_fingerprint of a kept post


def prepare_record(task: tuple, cfg: PrepareConfig) -> Prepared:
    """Prepare and pickle one post with ``posts.prepare_post``, the server's own function.

    ``task`` is ``(row, image path or bytes, raw caption, label, feature cells)``. A kept
    post's fingerprint hashes the image file's bytes and the raw caption (the file is read
    a second time: it is in the page cache, and the decoder wants the path).
    """
    row, path, raw_text, label, features = task
    try:
        post = prepare_post(path, raw_text, features, cfg)
        fingerprint = file_fingerprint(path, raw_text)
    except (ImageError, FeatureError) as e:
        return Prepared(row, None, e.reason, e.message)
    except Exception as e:  # noqa: BLE001 - a decoder failing on a damaged header is a bad image, not a crash
        return Prepared(row, None, "corrupt", f"could not open image: {type(e).__name__}: {e}")
    record = Record(image=post.image, text=post.text, sentiment=post.sentiment, features=post.features,
                    label=float(label), row=int(row))
    return Prepared(row, record_bytes(record), fingerprint=fingerprint)


def warm_up(cfg: PrepareConfig) -> None:
    """Prepare one synthetic post in this process, before the workers are forked.

    Lazy imports and caches (PIL's JPEG plugin, the VADER lexicon, transformers' resize
    helper that ``pre_resize`` imports, about 1 s on its own) are then inherited by every
    worker instead of each paying for them on its first post.
    """
    side = cfg.resize.shortest_edge + 1 if cfg.resize.shortest_edge > 0 else 2  # big enough to be resized
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (128, 64, 32)).save(buf, "JPEG")
    features = dict.fromkeys(cfg.features.names)  # all missing: valid for every column
    done = prepare_record((-1, buf.getvalue(), "warm up \U0001F60D #tag @user", 0.0, features), cfg)
    assert done.payload is not None, f"warm-up post rejected: {done.reason}: {done.detail}"


class OrderedPool:
    """``imap`` of ``fn`` in task order, over worker processes (in-process if ``workers == 1``).

    At most a fixed window of tasks is in flight: ``Pool.imap`` alone would let results
    pile up in the parent whenever it fell behind, and memory would grow with the dataset.
    The workers start in ``__init__``, before any progress-bar thread exists to be forked.
    """

    def __init__(self, fn, workers: int, chunksize: int):
        self.fn, self.chunksize = fn, chunksize
        self.window = chunksize * workers * 4  # must be >= chunksize, or imap deadlocks
        self._pool = None
        if workers > 1:
            # Forked workers share the parent's pages until they write to them; the cyclic
            # GC writes to every tracked object it scans, so freeze the parent's objects
            # out of its reach first, and the row table is not copied into each worker.
            gc.freeze()
            try:
                self._pool = mp.Pool(workers)
            finally:
                gc.unfreeze()
        self._stop = threading.Event()

    def imap(self, tasks: Iterable) -> Iterator:
        if self._pool is None:
            yield from map(self.fn, tasks)
            return
        slots = threading.Semaphore(self.window)

        def gated():  # consumed by the pool's task-feeder thread
            for task in tasks:
                while not slots.acquire(timeout=0.1):
                    if self._stop.is_set():  # shutting down: let the feeder thread end
                        return
                yield task

        for result in self._pool.imap(self.fn, gated(), chunksize=self.chunksize):
            slots.release()
            yield result

    def __enter__(self) -> "OrderedPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._pool is not None:
            if exc_type is None:
                self._pool.close()
            else:
                self._pool.terminate()
            self._pool.join()


# ---------------------------------------------------------------------------------------
# Summary statistics and outputs
# ---------------------------------------------------------------------------------------


def _stats(x: np.ndarray) -> dict | None:
    if x.size == 0:
        return None
    return {"count": int(x.size), "min": float(x.min()), "max": float(x.max()), "mean": float(x.mean()),
            "median": float(np.median(x)), "std": float(x.std())}


def label_statistics(labels: np.ndarray, split: np.ndarray, kept: np.ndarray) -> dict:
    """Label stats (raw and log1p) of the kept rows, overall and per split."""
    out = {}
    for name, mask in [("all", kept)] + [(s, kept & (split == i)) for i, s in enumerate(SPLITS)]:
        x = labels[mask]
        out[name] = {"raw": _stats(x), "log1p": _stats(np.log1p(x))}
    return out


def _clear_outputs(out_dir: Path) -> None:
    """Remove a previous run's outputs, meta.json first, so no stale meta survives a failure."""
    (out_dir / META_NAME).unlink(missing_ok=True)
    for split in SPLITS:
        (out_dir / f"{split}.pkl").unlink(missing_ok=True)
        (out_dir / f"{split}.idx").unlink(missing_ok=True)
    (out_dir / REJECTS_NAME).unlink(missing_ok=True)
    (out_dir / FINGERPRINTS_NAME).unlink(missing_ok=True)


def format_summary(counts: dict) -> str:
    lines = [f"rows read {counts['rows_read']}: kept {counts['kept']}, rejected {counts['rejected']}",
             "  splits:  " + ", ".join(f"{s} {n}" for s, n in counts["splits"].items())]
    if counts["rejects_by_reason"]:
        lines.append("  rejects: " + ", ".join(f"{r} {n}" for r, n in counts["rejects_by_reason"].items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def resolve_policy(cfg: PreprocessConfig) -> tuple[ResizePolicy, str]:
    """The resize policy and where it came from."""
    if cfg.clip_processor:
        from transformers import CLIPImageProcessor

        from common.hub import resolve_pretrained

        try:
            processor = CLIPImageProcessor.from_pretrained(resolve_pretrained(cfg.clip_processor))
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: could not load CLIP processor {cfg.clip_processor!r}: {e}") from None
        return ResizePolicy.from_image_processor(processor), f"clip_processor:{cfg.clip_processor}"
    return ResizePolicy(shortest_edge=cfg.resize_shortest_edge), "--resize-shortest-edge"


@dataclass
class Screened:
    """The outcome of the checks that need no image (step 2 of ``preprocess``)."""

    plan: SplitPlan  # every row's split, and the rule's own rejects
    labels: np.ndarray  # (n_rows,) float64, NaN where rejected
    features: dict[str, list]  # column -> (n_rows,) parsed values (None = missing or rejected row)
    todo: list[tuple[int, str]]  # (row, local image path) for the rows the workers load
    rejects: list[tuple[int, str, str, str]]  # (row, raw image path, reason, detail)
    unknown_age: int = 0  # rows kept without a time to tell their label's age by

    @property
    def split(self) -> np.ndarray:
        """(n_rows,) int8 index into ``SPLITS`` (``splits.UNASSIGNED`` for rows the rule rejected)."""
        return self.plan.split

    def reject(self, row: int, raw_path: str, reason: str, detail: str) -> None:
        self.rejects.append((row, raw_path, reason, detail))
        self.labels[row] = np.nan


def check_row(table: PostsTable, row: int, columns: tuple[FeatureColumn, ...],
              maturity: MaturityRule | None) -> tuple[float | None, dict, str | None, str]:
    """Checks 1-4 of the module docstring for one row: ``(label, parsed features, None, "")``,
    or ``(None, {}, reason, detail)``."""
    if table.images[row] == "":
        return None, {}, "missing_path", "no image path given"
    label, reason, detail = table.label(row)
    if reason is not None:
        return None, {}, reason, detail
    try:
        values = {c.name: c.parse(table.cells[c.name][row]) for c in columns}
    except FeatureError as e:  # invalid_feature, or invalid_datetime for a timestamp
        return None, {}, e.reason, e.message
    young = maturity.check(values[maturity.column]) if maturity is not None else None
    if young is not None:
        return None, {}, LABEL_NOT_FINAL, young
    return label, values, None, ""


def screen_rows(table: PostsTable, cfg: PreprocessConfig, columns: tuple[FeatureColumn, ...]) -> Screened:
    """Reject the rows whose path, label, features, age, caption, split column or image
    source rule them out (in the order of the module docstring), and split the rest."""
    n_rows, maturity = len(table), cfg.maturity_rule()
    labels, features = np.full(n_rows, np.nan), {c.name: [None] * n_rows for c in columns}
    rejects: list[tuple[int, str, str, str]] = []
    first_seen: dict[tuple[str, str], int] = {}
    sources = []  # (row, image source) of the rows that pass checks 1-5
    for row in range(n_rows):
        raw_path, caption = table.images[row], table.captions[row]
        label, values, reason, detail = check_row(table, row, columns, maturity)
        if reason is None:
            source = image_source(raw_path, table.path.parent)
            key = (source, "" if caption is None else str(caption))
            if key in first_seen:
                reason, detail = "duplicate", f"same image and caption as row {first_seen[key]}"
            else:
                first_seen[key] = row
        if reason is not None:
            rejects.append((row, raw_path, reason, detail))
            continue
        labels[row] = label
        for name, v in values.items():
            features[name][row] = v
        sources.append((row, source))
    # The split of every row; a time split orders only the rows still in (its skip).
    rule = cfg.split_rule()
    plan = plan_splits(rule, n_rows, cfg.val_frac, cfg.test_frac, cfg.seed,
                       table.cells[rule.column] if rule.column else None, cfg.time_column(),
                       skip={r[0] for r in rejects})
    out = Screened(plan, labels, features, [], rejects)
    for row, _ in sources:
        if row in plan.rejects:  # a time split's row without a time
            out.reject(row, table.images[row], DATETIME_REASON, plan.rejects[row])
    sources = [(r, src) for r, src in sources if r not in plan.rejects]
    if maturity is not None:
        out.unknown_age = maturity.count_unknown_age([features[maturity.column][r] for r, _ in sources])
    problem = split_size_problem(Counter(SPLITS[plan.split[r]] for r, _ in sources), cfg, "before loading images")
    if problem is not None:  # refused before any image is downloaded or decoded
        raise SplitsTooSmall(problem, out.rejects)
    # URL cells become cached local files here (the download seam), or rejects.
    out.todo, unresolved = resolve_image_sources(sources, cfg.download_config(), cfg.progress)
    for row, reason, detail in unresolved:
        out.reject(row, table.images[row], reason, detail)
    return out


def split_size_problem(counts: Mapping[str, int], cfg: PreprocessConfig, when: str) -> str | None:
    """Why the splits cannot be trained on, or None: the train split is empty, or a val or
    test split whose fraction is above 0 is (training calibrates its interval on val and
    reports test). An explicit ``--val-frac 0`` is the user's choice (``warn_small_splits``)."""
    asked = {"train": True, "val": cfg.val_frac > 0, "test": cfg.test_frac > 0}
    empty = [s for s in SPLITS if asked[s] and counts.get(s, 0) == 0]
    if not empty:
        return None
    sizes = ", ".join(f"{s} {counts.get(s, 0)}" for s in SPLITS)
    return (f"the {' and '.join(empty)} split{'s' if len(empty) > 1 else ''} would be empty ({sizes} posts "
            f"{when}, --split {cfg.split}, --val-frac {cfg.val_frac:g}, --test-frac {cfg.test_frac:g}): training "
            "needs posts in train, val (the prediction interval is calibrated there) and test; add posts or raise "
            "the fractions")


class SplitsTooSmall(Exception):
    """A split that training needs would be empty: the message says which and why;
    ``rejects`` are the rows rejected so far (written to rejects.csv before exiting)."""

    def __init__(self, message: str, rejects: list):
        super().__init__(message)
        self.rejects = rejects


def warn_small_splits(counts: Mapping[str, int], cfg: PreprocessConfig) -> None:
    """Log what a small (or deliberately absent) val or test split means for the figures."""
    for s, frac in (("val", cfg.val_frac), ("test", cfg.test_frac)):
        n = counts[s]
        if frac == 0:
            logger.warning("--%s-frac 0: no %s split; training refuses data without one", s, s)
        elif n < MIN_EVAL_POSTS:
            why = ("the prediction interval is calibrated on val, so its coverage" if s == "val"
                   else "test R² and coverage are measured on test, so they")
            logger.warning("the %s split holds only %d posts (< %d): %s will be a rough estimate; more posts or a "
                           "larger --%s-frac help", s, n, MIN_EVAL_POSTS, why, s)


def write_splits(screened: Screened, table: PostsTable, cfg: PreprocessConfig, prep: PrepareConfig,
                 out_dir: Path) -> tuple[dict[str, RecordWriter], np.ndarray, dict[str, list[int]], dict]:
    """Load, clean, resize and pickle the screened rows in workers; the parent appends bytes.

    Returns the (still open) writers, the (n_rows,) kept mask, each split's record
    fingerprints in record order and the timing of this step. Image rejects are appended
    to ``screened.rejects``.
    """
    from tqdm.auto import tqdm

    todo, images, captions = screened.todo, table.images, table.captions
    warm_up(prep)
    workers = min(cfg.workers, max(len(todo), 1))  # no idle workers for a tiny table
    # ~32 tasks per worker keeps the last, uneven stretch short; 16 posts per task is
    # already few enough messages that the parent's per-task cost does not show.
    chunksize = cfg.chunksize or max(1, min(16, len(todo) // (workers * 32)))
    tasks = ((row, path, captions[row], screened.labels[row], {n: v[row] for n, v in screened.features.items()})
             for row, path in todo)
    writers = {s: RecordWriter(out_dir, s) for s in SPLITS}
    fingerprints: dict[str, list[int]] = {s: [] for s in SPLITS}
    kept = np.zeros(len(images), dtype=bool)
    record_bytes_total = 0
    t_proc = time.perf_counter()
    cpu_parent0, cpu_children0 = _cpu_times()
    try:
        with OrderedPool(partial(prepare_record, cfg=prep), workers, chunksize) as pool:
            for done in tqdm(pool.imap(tasks), total=len(todo), desc="preprocess", unit="post",
                             disable=bar_disabled(cfg.progress), dynamic_ncols=True):
                if done.payload is None:
                    screened.rejects.append((done.row, images[done.row], done.reason, done.detail))
                    screened.labels[done.row] = np.nan
                    continue
                split = SPLITS[screened.split[done.row]]
                writers[split].write_bytes(done.payload)
                fingerprints[split].append(done.fingerprint)
                record_bytes_total += len(done.payload)
                kept[done.row] = True
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    process_s = time.perf_counter() - t_proc
    cpu_parent1, cpu_children1 = _cpu_times()  # after the pool's join, so workers are counted
    cpu_parent, cpu_workers = cpu_parent1 - cpu_parent0, cpu_children1 - cpu_children0
    timing = {
        "process_s": round(process_s, 3),  # pool start to last record written
        "posts_per_s": round(len(todo) / process_s, 2) if process_s > 0 else None,
        # CPU seconds of the same phase: unlike wall time, these do not depend on what
        # else runs on the machine, so they show the parent's share of the work.
        "cpu_parent_s": round(cpu_parent, 3),
        "cpu_workers_s": round(cpu_workers, 3),
        # cores this run actually got: well under --workers means other load, not this code
        "cores_busy": round((cpu_parent + cpu_workers) / process_s, 2) if process_s > 0 else None,
        "workers": workers, "chunksize": chunksize, "record_bytes": record_bytes_total,
    }
    return writers, kept, fingerprints, timing


def account(screened: Screened, kept: np.ndarray, writers: dict[str, RecordWriter]) -> dict:
    """Counts of every row: kept + rejected == rows read, checked."""
    n_rows, rejects = len(kept), screened.rejects
    reason_counts = Counter(r[2] for r in rejects)
    counts = {
        "rows_read": n_rows,
        "kept": int(kept.sum()),
        "rejected": len(rejects),
        "splits": {s: writers[s].count for s in SPLITS},
        # Known reasons in check order, then any other (a code this list does not name yet).
        "rejects_by_reason": {**{r: reason_counts[r] for r in REJECT_REASONS if reason_counts[r]},
                              **{r: n for r, n in reason_counts.items() if r not in REJECT_REASONS}},
    }
    assert counts["kept"] + counts["rejected"] == n_rows, counts
    assert sum(counts["splits"].values()) == counts["kept"], counts
    assert len({r[0] for r in rejects}) == len(rejects), "a row was rejected twice"
    return counts


def train_rows(screened: Screened, kept: np.ndarray) -> np.ndarray:
    """Row indices of the kept train posts: what every fitted statistic is computed on."""
    return np.flatnonzero(kept & (screened.split == SPLITS.index("train")))


def fit_features(columns: tuple[FeatureColumn, ...], screened: Screened, kept: np.ndarray) -> FeatureSchema:
    """The feature schema with statistics of the kept train rows (never val or test)."""
    train = train_rows(screened, kept)
    return FeatureSchema.fit(columns, {c.name: [screened.features[c.name][i] for i in train] for c in columns})


def feature_statistics(schema: FeatureSchema, screened: Screened, kept: np.ndarray) -> dict:
    """Raw statistics of each feature column on the kept train rows, for meta.json."""
    train = train_rows(screened, kept)
    out = {}
    for col in schema.columns:
        vals = [screened.features[col.name][i] for i in train]
        present = [v for v in vals if v is not None]
        stats: dict = {"kind": col.kind, "count": len(vals), "missing": len(vals) - len(present)}
        if col.kind == "numeric":
            stats["raw"] = _stats(np.asarray(present, dtype=np.float64))
        elif col.kind == "datetime":
            stats.update(datetime_statistics(col, present))
        else:
            stats["top_categories"] = dict(Counter(present).most_common(20))
            stats["distinct"] = len(set(present))
        out[col.name] = stats
    return out


def datetime_statistics(col: FeatureColumn, values: list[float]) -> dict:
    """A timestamp column's train range (UTC) and its posts per local hour and weekday: a
    wrong --timezone shows as posts at 4 a.m."""
    if not values:
        return {"timezone": col.timezone, "first": None, "last": None}
    hours, weekdays = Counter(), Counter()
    tz = zone(col.timezone)
    for v in values:
        local = utc_datetime(v).astimezone(tz)
        hours[local.hour] += 1
        weekdays[local.weekday()] += 1
    return {"timezone": col.timezone, "first": utc_datetime(min(values)).isoformat(),
            "last": utc_datetime(max(values)).isoformat(),
            "local_hour_counts": [hours[h] for h in range(24)],
            "local_weekday_counts": [weekdays[d] for d in range(7)]}  # Monday first


def correlation_warnings(columns: tuple[FeatureColumn, ...], screened: Screened, kept: np.ndarray) -> list[dict]:
    """leakage.label_correlation_warnings on the numeric features' train values, logged."""
    train = train_rows(screened, kept)
    numeric = {c.name: [screened.features[c.name][i] for i in train] for c in columns if c.kind == "numeric"}
    warnings = label_correlation_warnings(numeric, screened.labels[train]) if numeric else []
    for w in warnings:
        logger.warning("%s. Remove the column unless it is known before posting.", w["message"])
    return warnings


def outcome_columns(cfg: PreprocessConfig, columns: tuple[FeatureColumn, ...]) -> list[str]:
    """The feature columns named like outcomes of the post: refused (one ``error:`` line)
    unless --allow-outcome-cols, then logged as a warning."""
    try:
        allowed = check_outcome_columns([c.name for c in columns], cfg.allow_outcome_cols)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if allowed:
        logger.warning("feature columns %s look like outcomes of the post; kept because of --allow-outcome-cols",
                       allowed)
    return allowed


def read_input(cfg: PreprocessConfig) -> PostsTable:
    """The table with its columns checked; a missing default input says where a table goes."""
    input_path = Path(cfg.input).expanduser().resolve()
    if cfg.input == DEFAULT_INPUT and not input_path.exists():
        raise SystemExit(f"error: no posts table at {DEFAULT_INPUT} (the default --input, under the current "
                         f"directory {Path.cwd()}): put your table there (columns image_path, description, "
                         f"engagement; image paths relative to its folder, or URLs), or pass --input PATH; see "
                         f"{OWN_DATA_DOCS}")
    try:
        table = read_table(input_path, cfg.table_columns(), ReadOptions.of(cfg))
    except TableError as e:
        raise SystemExit(f"error: {e}") from None
    if len(table) == 0:
        raise SystemExit(f"error: {input_path} has no data rows")
    return table


def preprocess(cfg: PreprocessConfig) -> dict:
    """Run preprocessing for ``cfg``; returns the meta dict written to ``meta.json``."""
    t_start = time.perf_counter()
    out_dir = Path(cfg.out).expanduser().resolve()
    columns = cfg.feature_columns()
    allowed_outcomes = outcome_columns(cfg, columns)

    # 1. Read the table and check its columns before touching the output dir.
    table = read_input(cfg)
    n_rows = len(table)
    policy, policy_source = resolve_policy(cfg)
    logger.info("read %d rows from %s (%s); resize policy %s (%s); feature columns %s; split %s", n_rows,
                table.path, table.dialect.describe(), policy.as_dict(), policy_source,
                [f"{c.name} ({c.kind})" for c in columns] or "none", cfg.split)

    # 2. Prepare the output dir: a previous run's outputs go, meta.json first.
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_outputs(out_dir)

    # 3. Decide every row's split, and the rejects that need no image decoded, up front
    # (image URLs are downloaded here); refuse a split training needs that is empty.
    try:
        screened = screen_rows(table, cfg, columns)
    except SplitsTooSmall as e:
        write_rejects(out_dir / REJECTS_NAME, e.rejects)
        raise SystemExit(f"error: {e}; rejected rows: {out_dir / REJECTS_NAME}") from None
    if screened.unknown_age:
        logger.warning("%d posts have no %s, so their label's age is unknown; kept", screened.unknown_age,
                       cfg.maturity_rule().column)

    # 4. Prepare every post with posts.prepare_post in workers; the parent appends bytes.
    n_screen_rejects = len(screened.rejects)
    writers, kept, fingerprints, timing = write_splits(screened, table, cfg, PrepareConfig.for_columns(
        policy, cfg.max_pixels, columns), out_dir)

    # 5. Account for every row, write rejects.csv, and fail loudly on a bad table.
    counts = account(screened, kept, writers)
    logger.info("%d rows rejected before loading images, %d while loading", n_screen_rejects,
                len(screened.rejects) - n_screen_rejects)
    write_rejects(out_dir / REJECTS_NAME, screened.rejects)
    print(format_summary(counts))
    refuse_bad_outcome(counts, cfg, writers, out_dir)
    for w in writers.values():
        w.close()
    save_fingerprints(out_dir / FINGERPRINTS_NAME, fingerprints)
    warn_small_splits(counts["splits"], cfg)

    # 6. meta.json last: its presence means the run completed.
    schema = fit_features(columns, screened, kept)
    prep = PrepareConfig(policy, cfg.max_pixels, schema)
    meta = build_meta(cfg, table, counts, prep, policy_source, screened, kept, timing,
                      time.perf_counter() - t_start)
    meta["feature_stats"] = feature_statistics(schema, screened, kept)
    meta["label_correlation_warnings"] = correlation_warnings(columns, screened, kept)
    meta["outcome_columns_allowed"] = allowed_outcomes
    write_json_atomic(out_dir / META_NAME, meta)
    logger.info("%s", describe_split(meta["split"]))
    logger.info("wrote %s (%.1f posts/s over %d workers, %.1f s total)", out_dir,
                meta["timing"]["posts_per_s"] or 0.0, timing["workers"], meta["timing"]["elapsed_s"])
    return meta


def refuse_bad_outcome(counts: dict, cfg: PreprocessConfig, writers: dict[str, RecordWriter], out_dir: Path) -> None:
    """Exit 1 (the split files removed, rejects.csv kept) when too many rows were rejected,
    none was kept, or a split training needs ended up empty."""
    n_rows = counts["rows_read"]
    reject_frac = counts["rejected"] / n_rows
    why = None
    if reject_frac > cfg.max_reject_frac or counts["kept"] == 0:
        why = (f"{counts['rejected']} of {n_rows} rows rejected ("
               + (f"{reject_frac:.1%} > --max-reject-frac {cfg.max_reject_frac:.1%}" if counts["kept"]
                  else "no rows kept") + f"); see {out_dir / REJECTS_NAME}")
    elif (problem := split_size_problem(counts["splits"], cfg, "kept")) is not None:
        why = f"{problem}; rejected rows: {out_dir / REJECTS_NAME}"
    if why is not None:
        for w in writers.values():
            w.abort()
        raise SystemExit(f"error: {why}")


def build_meta(cfg: PreprocessConfig, table: PostsTable, counts: dict, prep: PrepareConfig, policy_source: str,
               screened: Screened, kept: np.ndarray, timing: dict, elapsed_s: float) -> dict:
    """meta.json: what was read, what was kept, how posts were prepared and split, and timing."""
    timing = dict(timing)
    workers, chunksize, n_bytes = timing.pop("workers"), timing.pop("chunksize"), timing.pop("record_bytes")
    maturity = cfg.maturity_rule()
    return {
        "counts": counts,
        "source": {"path": str(table.path), "sha256": sha256_file(table.path), "format": table.dialect.format},
        # The columns and dialect it was read with; training copies this into the model, so
        # serving/predict.py scores a table of the same shape with no column flags.
        "table": table.schema(),
        "label": table.label_expr.to_dict(),  # what the label is: one column or a sum of counts
        "fingerprints_file": FINGERPRINTS_NAME,
        "cleaning_version": CLEANING_VERSION,
        "image_size_policy": {**prep.resize.as_dict(), "source": policy_source, "max_pixels": cfg.max_pixels},
        # How a raw post becomes a record; training copies it into the model artifact.
        "prepare": prep.to_dict(),
        "features": [{"name": c.name, "kind": c.kind, "min": c.min, "max": c.max} for c in prep.features.columns],
        "label_stats": label_statistics(screened.labels, screened.split, kept),
        # How the posts were split: what the test figures are a test of (training repeats it).
        "split": split_summary(screened.plan, cfg.val_frac, cfg.test_frac, kept),
        "maturity": None if maturity is None else {**maturity.to_dict(), "unknown_age": screened.unknown_age},
        "seed": cfg.seed,
        "fracs": {"train": round(1.0 - cfg.val_frac - cfg.test_frac, 6), "val": cfg.val_frac,
                  "test": cfg.test_frac},
        "config": {**config_dict(cfg), "workers": workers, "chunksize": chunksize},
        "record_format": {
            "version": RECORD_FORMAT_VERSION,
            "description": RECORD_FORMAT,
            "files": {s: [f"{s}.pkl", f"{s}.idx"] for s in SPLITS},
            "pickle_protocol": pickle.HIGHEST_PROTOCOL,
            "bytes": n_bytes,
        },
        "rejects_file": REJECTS_NAME,
        "timing": {"elapsed_s": round(elapsed_s, 3), **timing},  # elapsed: whole run, imports included
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
    }


def main(argv: list[str] | None = None) -> int:
    # 1. parse args and log the resolved config
    cfg = parse_config(PreprocessConfig, argv)
    setup_logging()
    logger.info("config: %s", json.dumps(dataclasses.asdict(cfg)))
    # 2. run; errors surface as `SystemExit("error: ...")`, one line and exit status 1
    preprocess(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
