"""Validate preprocessed records before training on them.

    python test_preprocessing.py                      # checks data/processed/
    python test_preprocessing.py --data runs/demo/data [--max-records 2000]

Checks the output of ``data_preprocessing/preprocess.py`` (a script for users, not a
pytest module; its tests are in tests/test_validation_script.py). Run bare, it checks
``data/processed/`` under the current directory, where a bare ``preprocess.py`` writes:

* ``meta.json`` exists, its counts add up, and its ``cleaning_version`` is the one the
  code cleans with now (otherwise captions would differ between training and serving);
* every split's ``.pkl`` and ``.idx`` exist, the index is well formed, its length equals
  the number of records in the stream and the split count in ``meta.json``, and it is not
  empty (training needs posts in train, val and test);
* every record passes ``posts.Record.problems`` (an RGB image within the pixel cap and
  the aspect-ratio limit, finite numbers, an int row), its caption is already clean
  (``clean_text(text) == text``), its sentiment is in [-1, 1], its label a non-negative
  float, and it holds exactly meta.json's feature columns, each holding an already parsed
  value (a float or None for numeric and datetime, a str or None for categorical).

Records are read only through ``records``' safe unpickler (``RecordReader`` for random
access, ``iter_pickles`` for the stream), which refuses anything but the classes a record
holds. By default every record is streamed and checked, and each record's start is
compared with its index offset; ``--max-records N`` instead checks N records per split,
spread evenly, by random access (for big sets).

Exit status 0 when every check passes; 1 with the failed checks listed otherwise.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

from common.config import field, parse_config
from data_preprocessing.prepare import CLEANING_VERSION, clean_text
from data_preprocessing.features import FeatureColumn, FeatureError
from data_preprocessing.posts import PrepareConfig, Record
from data_preprocessing.records import (SPLITS, RecordReader, check_cleaning_version, check_record_format,
                                        iter_pickles, load_meta)

N_SPOT_CHECKS = 5  # random-access reads compared with the stream when checking everything
DEFAULT_DATA = "data/processed"  # where a bare `python data_preprocessing/preprocess.py` writes


@dataclass
class ValidateConfig:
    """Validate the record files written by data_preprocessing/preprocess.py."""

    data: str = field(DEFAULT_DATA, help="output directory of preprocess.py (holds meta.json and "
                                         "{train,val,test}.pkl/.idx), relative to the current directory")
    max_records: int = field(0, help="check at most this many records per split, spread evenly (0 = all)")

    def __post_init__(self):
        if self.max_records < 0:
            raise ValueError(f"--max-records must be >= 0, got {self.max_records}")


def record_problems(raw, columns: Sequence[FeatureColumn] = ()) -> list[str]:
    """What is wrong with one stored record (an empty list when it is valid)."""
    # The record's own checks first: keys, an RGB image within the pixel cap, value types.
    problems = Record.problems(raw)
    if problems:
        return problems
    rec = Record.from_dict(raw)
    # Then what this data must also satisfy: cleaned text, sentiment in range, float labels.
    if clean_text(rec.text) != rec.text:
        problems.append(f"text is not clean (clean_text changes it; cleaning version {CLEANING_VERSION})")
    if not -1.0 <= rec.sentiment <= 1.0:
        problems.append("sentiment outside [-1, 1]")
    if not isinstance(rec.label, float):
        problems.append(f"label is a {type(rec.label).__name__}, not a float")
    elif rec.label < 0:
        problems.append("label is negative")
    return problems + feature_problems(rec.features, columns)


def feature_problems(features: dict, columns: Sequence[FeatureColumn]) -> list[str]:
    """A record's feature values must be exactly meta.json's columns, each already parsed."""
    names = [c.name for c in columns]
    if sorted(features) != sorted(names):
        return [f"features {sorted(features)} are not meta.json's feature columns {sorted(names)}"]
    problems = []
    for col in columns:
        v = features[col.name]
        try:
            # numeric and datetime (Unix seconds) values are floats, categorical ones str
            ok = col.parse(v) == v and (v is None or isinstance(v, str if col.kind == "categorical" else float))
        except FeatureError:
            ok = False
        if not ok:  # no value in the message: one line counts every record with the same problem
            problems.append(f"feature {col.name} holds a {type(v).__name__}, not a parsed {col.kind} value")
    return problems


def index_problems(reader: RecordReader) -> list[str]:
    """Structural checks of the offset index against its record file."""
    offsets, size = reader.offsets, reader.path.stat().st_size
    if len(offsets) == 0:
        return [] if size == 0 else [f"index is empty but {reader.path.name} holds {size} bytes"]
    problems = []
    if offsets[0] != 0:
        problems.append(f"index starts at byte {offsets[0]}, not 0")
    if np.any(np.diff(offsets) <= 0):
        problems.append("index offsets are not strictly increasing")
    if offsets[-1] >= size:
        problems.append(f"last index offset {offsets[-1]} is past the end of {reader.path.name} ({size} bytes)")
    return problems


def _row_of(raw) -> object:
    return None if Record.problems(raw) else Record.from_dict(raw).row


def _tally(bad: dict, problems: list[str], i: int) -> None:
    for p in problems:
        count, first = bad.get(p, (0, i))
        bad[p] = (count + 1, first)


def check_split(data_dir: Path, split: str, expected: int | None, max_records: int,
                columns: Sequence[FeatureColumn] = ()) -> tuple[list[str], str]:
    """(failures, one report line) for one split."""
    path = data_dir / f"{split}.pkl"
    try:
        reader = RecordReader(path)
    except FileNotFoundError as e:
        return [f"{split}: {e}"], f"{split}: missing"
    failures = [f"{split}: {p}" for p in index_problems(reader)]
    n_index = len(reader)
    if n_index == 0:
        failures.append(f"{split}: no records; training needs posts in every split (preprocess.py with more "
                        "posts or larger --val-frac/--test-frac)")
    if expected is not None and n_index != expected:
        failures.append(f"{split}: index holds {n_index} records but meta.json counts {expected}")
    bad: dict[str, tuple[int, int]] = {}  # problem -> (number of records, first record index)
    n_checked = 0
    try:
        if max_records and max_records < n_index:
            # Sample: random access spread evenly over the split.
            for i in np.unique(np.linspace(0, n_index - 1, max_records).round().astype(int)):
                _tally(bad, record_problems(reader.read_raw(int(i)), columns), int(i))
                n_checked += 1
        else:
            # Everything: stream the file as plain pickle.load would, one record at a time,
            # and check that each record starts exactly where the index says it does.
            stream_rows, misaligned = [], False
            for i, (start, rec) in enumerate(iter_pickles(path)):
                if i < n_index and start != reader.offsets[i]:
                    failures.append(f"{split}: record {i} starts at byte {start}, the index says "
                                    f"{reader.offsets[i]}")
                    misaligned = True
                    break
                _tally(bad, record_problems(rec, columns), i)
                stream_rows.append(_row_of(rec))
                n_checked += 1
            if not misaligned and n_checked != n_index:
                failures.append(f"{split}: the stream holds {n_checked} records but the index {n_index}")
            elif not misaligned:
                # Random access must return the same records as the stream.
                for i in sorted({0, n_index // 2, n_index - 1} | set(range(min(N_SPOT_CHECKS, n_index)))):
                    if 0 <= i < n_index and _row_of(reader.read_raw(i)) != stream_rows[i]:
                        failures.append(f"{split}: random access to record {i} does not return the {i}th record")
                        break
    except Exception as e:  # noqa: BLE001 - any unreadable record is a failed check, not a traceback
        failures.append(f"{split}: cannot read record {n_checked}: {type(e).__name__}: {e}")
    for problem, (count, first) in bad.items():
        failures.append(f"{split}: {count} record(s): {problem} (first: record {first})")
    status = "OK" if not failures else "FAIL"
    return failures, f"{split}: {n_index} records, {n_checked} checked: {status}"


def meta_problems(meta: dict, data_dir: Path) -> list[str]:
    problems = []
    for check in (check_record_format, check_cleaning_version):
        try:
            check(meta, data_dir)
        except ValueError as e:
            problems.append(f"meta.json: {e}")
    counts = meta.get("counts") or {}
    try:
        if counts["kept"] + counts["rejected"] != counts["rows_read"]:
            problems.append(f"meta.json: kept {counts['kept']} + rejected {counts['rejected']} != "
                            f"rows read {counts['rows_read']}")
        if sum(counts["splits"].values()) != counts["kept"]:
            problems.append(f"meta.json: split counts {counts['splits']} do not sum to kept {counts['kept']}")
    except (KeyError, TypeError, AttributeError) as e:
        problems.append(f"meta.json: counts are malformed ({type(e).__name__}: {e})")
    return problems


def validate(data_dir: Path, max_records: int = 0) -> tuple[list[str], list[str]]:
    """(failures, report lines) for a preprocess.py output directory."""
    try:
        meta = load_meta(data_dir)
    except (FileNotFoundError, ValueError) as e:  # JSONDecodeError is a ValueError
        return [f"meta.json: {e}"], []
    failures = meta_problems(meta, data_dir)
    columns = PrepareConfig.from_dict(meta["prepare"]).features.columns if "prepare" in meta else ()
    split_counts = (meta.get("counts") or {}).get("splits") or {}
    lines = [f"data: {data_dir} (cleaning version {meta.get('cleaning_version')}, "
             f"created {meta.get('created_at')})"]
    for split in SPLITS:
        expected = split_counts.get(split)
        if expected is None:
            failures.append(f"meta.json: no count for split {split}")
        split_failures, line = check_split(data_dir, split, expected, max_records, columns)
        failures += split_failures
        lines.append("  " + line)
    return failures, lines


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ValidateConfig, argv)
    if cfg.data == DEFAULT_DATA and not Path(cfg.data).is_dir():
        print(f"FAIL: no preprocessed data at {DEFAULT_DATA} (the default --data, under the current directory "
              f"{Path.cwd()}): run `python data_preprocessing/preprocess.py` first (it reads data/posts.csv), or "
              'pass --data DIR; see README.md, "On your own data"')
        return 1
    failures, lines = validate(Path(cfg.data), cfg.max_records)
    if lines:
        print("\n".join(lines))
    if failures:
        print(f"FAIL: {len(failures)} check(s) failed:")
        print("\n".join(f"  - {f}" for f in failures))
        return 1
    print("PASS: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
