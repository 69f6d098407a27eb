"""The posts table: the one door through which a user's table comes in, and CSVs go out.

Preprocessing (``preprocess.py``), the table scorer (``serving/predict.py``) and the
offline CLIP's pretraining (``training/pretrain_clip.py --input``) read tables only
through ``read_table``. This module owns:

- **The file format and dialect.** ``.csv``/``.tsv``/``.txt`` are delimited text,
  ``.jsonl``/``.ndjson`` one JSON object per line.
  - The delimiter is sniffed from the header (comma, semicolon or tab: the one that
    finds the most of the wanted columns, then the most fields; ties go to the comma).
    ``--sep`` overrides it.
  - ``--encoding auto`` (the default) reads UTF-8 with or without a BOM (UTF-16 when
    the file starts with a UTF-16 BOM, as Excel's "Unicode Text" does). A file that is
    not UTF-8 is read as cp1252 (Excel's "CSV (Comma delimited)" on Windows), with a
    warning in the log. ``--encoding NAME`` forces one.
  - A file that still cannot be decoded gets one ``TableError`` line naming the file,
    the byte offset and the ``--encoding`` flag.
- **The column mapping** (``ColumnMap``): image, text, label, feature and carried-through
  columns. ``--image-col`` may name several columns; the first non-empty cell wins.
  Missing columns are named all at once, with the dialect used and (at most
  ``MAX_LISTED_COLUMNS`` of) the columns found.
- **A cap on one cell** (``--max-cell-chars``): a longer cell, or a line longer than
  ``LINE_CELLS`` such cells, stops reading with a message naming the row, before the
  rest of the line is read into memory.
- **Labels** (``parse_label``; ``--label-col a+b`` sums several count columns,
  ``label_expr.LabelExpr``, resolved against the header so a column literally named
  ``a+b`` is still one column) and **image sources** (``image_source``, and
  ``resolve_image_sources``, the seam where URL cells become cached local files:
  ``http(s)://`` cells are fetched once by ``download.download_all`` into the content
  cache, any other scheme is ``unsupported_url``).
- **Post fingerprints** (``post_fingerprint``): a 64-bit hash of the image bytes and
  the raw caption, so a scorer can tell which posts a model was trained on.
- **Writing CSVs** (``safe_csv_writer``), for every CSV the project writes: a string
  cell that a spreadsheet would run as a formula is escaped (OWASP's CSV-injection rule).
  ``rejects.csv`` (``write_rejects``) is one of them.

Rows are numbered from 0 over the data rows: the header and blank lines are not
counted. That number is the ``row`` of records, rejects and predictions.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import itertools
import json
import logging
import math
import os
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import IO, Iterable, Iterator, Mapping, Sequence

import numpy as np

from common.config import field
from data_preprocessing.download import DownloadConfig, DownloadError, download_all, is_url
from data_preprocessing.label_expr import LabelExpr

log = logging.getLogger(__name__)

DELIMITED_SUFFIXES = (".csv", ".tsv", ".txt")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
SNIFFED_SEPS = (",", ";", "\t")  # in order of preference on a tie
SEP_NAMES = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";"}
DEFAULT_MAX_CELL_CHARS = 100_000  # Instagram captions stop at 2,200, TikTok's at 4,000
LINE_CELLS = 8  # a physical line may hold this many cells of the maximum size
MAX_LISTED_COLUMNS = 30  # a missing-column message lists at most this many columns found
SAMPLE_CHARS = 60  # each listed column name is cut to this

LABEL_REASONS = ("missing_label", "non_numeric_label", "non_finite_label", "negative_label")
REJECTS_NAME = "rejects.csv"
REJECTS_HEADER = ("row", "image_path", "reason", "detail")
FINGERPRINTS_NAME = "fingerprints.npz"  # preprocessing's per-split post fingerprints, beside meta.json

# OWASP CSV injection: a cell starting with one of these is a formula to a spreadsheet.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class TableError(ValueError):
    """A table that cannot be read as asked; the message is one line for the user."""


# ---------------------------------------------------------------------------------------
# Options and columns
# ---------------------------------------------------------------------------------------


def sep_field():
    return field("auto", help="CSV delimiter: auto (sniffed from the header: comma, semicolon or tab), "
                              "or the character itself (';', ',', 'tab', '|')")


def encoding_field():
    return field("auto", help="text encoding of the table: auto (UTF-8 with or without a BOM, else cp1252 "
                              "with a warning), or a codec name such as utf-8, cp1252, latin-1, utf-16")


def max_cell_chars_field():
    return field(DEFAULT_MAX_CELL_CHARS, help=f"stop with an error naming the row when a cell holds more "
                                              f"characters than this (or a line more than {LINE_CELLS} times it)")


@dataclass(frozen=True)
class ReadOptions:
    """How to read the file: ``sep``/``encoding`` as the flags spell them, and the cell cap."""

    sep: str = "auto"
    encoding: str = "auto"
    max_cell_chars: int = DEFAULT_MAX_CELL_CHARS

    def __post_init__(self):
        sep = SEP_NAMES.get(self.sep.lower(), self.sep)
        if sep != "auto" and (len(sep) != 1 or sep in "\"\r\n"):
            raise ValueError(f"--sep must be auto or one character (or tab), got {self.sep!r}")
        if self.encoding != "auto":
            try:
                codecs.lookup(self.encoding)
            except LookupError:
                raise ValueError(f"--encoding {self.encoding!r} is not a known codec") from None
        if self.max_cell_chars < 1:
            raise ValueError(f"--max-cell-chars must be >= 1, got {self.max_cell_chars}")

    @classmethod
    def of(cls, cfg) -> "ReadOptions":
        """The options of a config that declares ``sep``, ``encoding`` and ``max_cell_chars``."""
        return cls(cfg.sep, cfg.encoding, cfg.max_cell_chars)

    @property
    def delimiter(self) -> str | None:
        """The forced delimiter, or None to sniff it."""
        sep = SEP_NAMES.get(self.sep.lower(), self.sep)
        return None if sep == "auto" else sep


def split_names(spec: str) -> tuple[str, ...]:
    """``"a, b"`` -> ``("a", "b")``: a comma-separated column list as flags take it."""
    return tuple(s.strip() for s in spec.split(",") if s.strip())


@dataclass(frozen=True)
class ColumnMap:
    """Which columns of the table mean what. ``features`` maps a feature column to the
    flag (or phrase) that named it, for messages; ``keep`` columns are carried through;
    ``extra`` columns are read for another purpose (the ``--split`` column), mapped to
    their flag. ``label`` is a column or a sum of columns (``likes+comments``)."""

    image: tuple[str, ...] = ("image_path",)
    text: str = "description"
    label: str | None = "engagement"  # None: no label is read (pretraining)
    features: Mapping[str, str] = dc_field(default_factory=dict)
    keep: tuple[str, ...] = ()
    label_optional: bool = False  # a table without the label column(s) is fine (scoring)
    extra: Mapping[str, str] = dc_field(default_factory=dict)

    def __post_init__(self):
        if not self.image or "" in self.image or not self.text:
            raise ValueError("--image-col and --text-col must name a column")
        roles = [*self.image, self.text, *self.label_columns(), *self.features]
        dupes = sorted({c for c in roles if roles.count(c) > 1})
        if dupes:
            raise ValueError(f"columns {dupes} are named for more than one role (image, text, label, feature)")

    def label_expr(self, header: Sequence[str] | None = None) -> LabelExpr | None:
        """The label expression, read against ``header`` when known (a column named ``a+b``)."""
        return None if self.label is None else LabelExpr.parse(self.label, header)

    def label_columns(self, header: Sequence[str] | None = None) -> tuple[str, ...]:
        expr = self.label_expr(header)
        return expr.columns if expr else ()

    def wanted(self, header: Sequence[str] | None = None) -> dict[str, str]:
        """Every column to read -> the flag that named it (first role wins for messages)."""
        out = {c: "--image-col" for c in self.image}
        out.setdefault(self.text, "--text-col")
        for c in self.label_columns(header):
            out.setdefault(c, "--label-col")
        for c, flag in [*self.features.items(), *((c, "--keep-cols") for c in self.keep), *self.extra.items()]:
            out.setdefault(c, flag)
        return out

    def keeps_cells(self, column: str) -> bool:
        """Whether a read column keeps its own cells: all but the image columns (merged into
        ``images``), unless they are also carried through or split by."""
        return column not in self.image or column in self.keep or column in self.extra

    def candidates(self) -> dict[str, str]:
        """``wanted`` before the header is known: a ``+`` label also as one literal column."""
        out = self.wanted()
        if self.label and "+" in self.label:
            out.setdefault(self.label.strip(), "--label-col")
        return out

    def schema(self, dialect: "Dialect") -> dict:
        """The table schema a model records (meta.json and the artifact's config ``table``)."""
        return {"columns": {"image": list(self.image), "text": self.text, "label": self.label,
                            "features": list(self.features)},
                "dialect": dialect.to_dict()}

    @classmethod
    def from_schema(cls, schema: Mapping) -> "ColumnMap":
        cols = schema["columns"]
        return cls(tuple(cols["image"]), cols["text"], cols.get("label"),
                   {c: "a feature column of the model" for c in cols.get("features", [])})


@dataclass(frozen=True)
class Dialect:
    """How a table was read: what meta.json and the artifact record."""

    format: str  # "csv" (delimited text) or "jsonl"
    encoding: str  # the codec actually used
    sep: str | None = None  # the delimiter (csv)
    sep_source: str | None = None  # "sniffed" or "--sep" (csv)

    def to_dict(self) -> dict:
        return {"format": self.format, "encoding": self.encoding, "sep": self.sep}

    def describe(self) -> str:
        if self.format == "jsonl":
            return f"read as JSONL, encoding {self.encoding}"
        how = "sniffed; --sep overrides" if self.sep_source == "sniffed" else "from --sep"
        return f"read with delimiter {self.sep!r} ({how}) and encoding {self.encoding}"


@dataclass
class PostsTable:
    """The wanted columns of a table, as raw cells (str from CSV; JSON values from JSONL).

    ``images`` holds, per row, the first non-empty cell of the image columns, stripped
    ("" when all are empty). Memory per row is a few short strings whatever else the
    table holds.
    """

    path: Path
    columns: ColumnMap
    dialect: Dialect
    header: list[str]  # every column found, in order
    images: list[str]
    cells: dict[str, list]  # text, label, feature, keep and extra columns -> one cell per row

    def __len__(self) -> int:
        return len(self.images)

    @property
    def captions(self) -> list:
        return self.cells[self.columns.text]

    @property
    def label_expr(self) -> LabelExpr | None:
        """The label expression as this table's header reads it; None without one (or, when
        the label is optional, when a column of it is absent)."""
        expr = self.columns.label_expr(self.header)
        return expr if expr is not None and all(c in self.cells for c in expr.columns) else None

    def label(self, row: int) -> tuple[float | None, str | None, str]:
        """Row ``row``'s label: ``(value, None, "")`` or ``(None, reason, detail)`` (``parse_label``
        of each column of the expression, summed). Only for a table with ``label_expr``."""
        expr = self.label_expr
        return expr.evaluate({c: self.cells[c][row] for c in expr.columns}, parse_label)

    def feature_cells(self, row: int) -> dict[str, object]:
        return {c: self.cells[c][row] for c in self.columns.features}

    def schema(self) -> dict:
        return self.columns.schema(self.dialect)


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------


def table_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in DELIMITED_SUFFIXES:
        return "csv"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    raise TableError(f"unsupported input type {suffix!r} for {path} (expected "
                     f"{', '.join(DELIMITED_SUFFIXES + JSONL_SUFFIXES)})")


def read_table(path: str | os.PathLike, columns: ColumnMap, opts: ReadOptions = ReadOptions()) -> PostsTable:
    """The table at ``path``, checked against ``columns``. Raises ``TableError`` (one line)."""
    path = Path(path)
    fmt = table_format(path)
    if not path.is_file():
        raise TableError(f"input file not found: {path}")
    encodings = _encodings_to_try(path, opts.encoding)
    for i, encoding in enumerate(encodings):
        try:
            return _read(path, fmt, encoding, columns, opts)
        except UnicodeError:
            offset = first_undecodable_byte(path, encoding)
            if i + 1 < len(encodings):
                log.warning("%s is not UTF-8 (byte %s is not valid UTF-8): reading it as %s; pass --encoding "
                            "NAME if that is wrong", path.name, offset, encodings[i + 1])
                continue
            where = f"byte {offset}" if offset is not None else "a byte"
            raise TableError(f"{path}: {where} cannot be decoded as {encoding}: pass --encoding NAME with the "
                             "file's encoding (for example --encoding latin-1)") from None
    raise AssertionError("unreachable")


def _encodings_to_try(path: Path, encoding: str) -> list[str]:
    if encoding != "auto":
        # A forced UTF-8 still drops a BOM, which would otherwise join the first column's name.
        return ["utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding]
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) and not head.startswith(codecs.BOM_UTF32_LE):
        return ["utf-16"]
    return ["utf-8-sig", "cp1252"]


def first_undecodable_byte(path: Path, encoding: str) -> int | None:
    """The file offset of the first byte ``encoding`` cannot decode (None if all decode)."""
    name = codecs.lookup(encoding).name
    start = 0
    if name == "utf-8-sig":  # scan as utf-8 past the BOM, so offsets count from the file's start
        name = "utf-8"
        with open(path, "rb") as fh:
            start = 3 if fh.read(3) == codecs.BOM_UTF8 else 0
    decoder = codecs.getincrementaldecoder(name)()
    pos = start
    with open(path, "rb") as fh:
        fh.seek(start)
        for chunk in itertools.chain(iter(lambda: fh.read(1 << 20), b""), [None]):
            pending = len(decoder.getstate()[0])  # bytes of an unfinished character held back
            try:
                decoder.decode(chunk or b"", final=chunk is None)
            except UnicodeDecodeError as e:
                return pos - pending + e.start
            pos += len(chunk or b"")
    return None


@dataclass
class _Cursor:
    """Where reading is, for messages: the physical line and the data row (-1: the header)."""

    line: int = 0
    row: int = -1

    def row_name(self) -> str:
        return "the header" if self.row < 0 else f"row {self.row}"


def _capped_lines(fh: IO[str], limit: int, at: _Cursor) -> Iterator[str]:
    """The file's lines, never reading more than ``limit`` characters of one into memory:
    a longer line raises ``_LineTooLong`` after reading only ``limit + 1`` characters of it."""
    while True:
        line = fh.readline(limit + 1)
        if not line:
            return
        at.line += 1
        if len(line) > limit and not line.endswith(("\n", "\r")):
            raise _LineTooLong()
        yield line


class _LineTooLong(Exception):
    pass


def _read(path: Path, fmt: str, encoding: str, columns: ColumnMap, opts: ReadOptions) -> PostsTable:
    line_limit = opts.max_cell_chars * LINE_CELLS
    at = _Cursor(row=-1 if fmt == "csv" else 0)  # JSONL has no header
    with open(path, newline="", encoding=encoding) as fh:
        lines = _capped_lines(fh, line_limit, at)
        reader = _read_csv if fmt == "csv" else _read_jsonl
        try:
            return reader(path, lines, encoding, columns, opts, at)
        except _LineTooLong:
            raise TableError(f"{path.name}: {at.row_name()} (line {at.line}) is longer than {line_limit:,} "
                             f"characters ({LINE_CELLS} x --max-cell-chars {opts.max_cell_chars:,}); is a quote "
                             "left open?") from None


def _read_csv(path: Path, lines: Iterator[str], encoding: str, columns: ColumnMap, opts: ReadOptions,
              at: _Cursor) -> PostsTable:
    first = next(lines, "")
    old_limit = csv.field_size_limit(opts.max_cell_chars)  # module-wide: restored below
    reader = None
    try:
        sep, source = ((opts.delimiter, "--sep") if opts.delimiter
                       else (sniff_delimiter(first, columns.candidates()), "sniffed"))
        dialect = Dialect("csv", encoding, sep, source)
        reader = csv.reader(itertools.chain([first], lines), delimiter=sep)
        header = next(reader, [])
        present = _check_columns(path, header, columns, dialect, first)
        at.row = 0
        where = {c: header.index(c) for c in columns.wanted(header) if c in present}
        image_at = [where[c] for c in columns.image]
        images, cells = [], {c: [] for c in where if columns.keeps_cells(c)}
        for values in reader:
            if not values:  # csv yields [] for a blank line; it is not a row
                continue
            n = len(values)
            images.append(next((v.strip() for i in image_at if i < n and (v := values[i]).strip()), ""))
            for c, col in cells.items():
                i = where[c]
                col.append(values[i] if i < n else None)  # a short row: missing
            at.row += 1
    except csv.Error as e:
        line = reader.line_num if reader is not None else 1
        if "field larger than field limit" in str(e):
            raise TableError(f"{path.name}: {at.row_name()} (line {line}) has a cell longer than "
                             f"--max-cell-chars {opts.max_cell_chars:,} characters") from None
        raise TableError(f"could not parse {path} as CSV (line {line}): {e}") from None
    finally:
        csv.field_size_limit(old_limit)
    return PostsTable(path, columns, dialect, header, images, cells)


def sniff_delimiter(header_line: str, wanted: Iterable[str]) -> str:
    """The candidate that finds the most wanted columns in the header, then the most fields."""
    wanted = set(wanted)

    def score(sep: str) -> tuple[int, int]:
        try:
            fields = next(csv.reader([header_line], delimiter=sep), [])
        except csv.Error:  # e.g. the whole line as one field past the cell cap: not this one
            return -1, -1
        return len(wanted & set(fields)), len(fields)

    return max(SNIFFED_SEPS, key=score)  # max keeps the first of equal scores: the comma


def _read_jsonl(path: Path, lines: Iterator[str], encoding: str, columns: ColumnMap, opts: ReadOptions,
                at: _Cursor) -> PostsTable:
    wanted = columns.candidates()  # the header is known only at the end
    seen: dict[str, None] = {}  # insertion-ordered union of keys, for the error message
    images, cells = [], {c: [] for c in wanted if columns.keeps_cells(c)}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TableError(f"{path} line {lineno} is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise TableError(f"{path} line {lineno} is not a JSON object")
        seen.update(dict.fromkeys(obj))
        for c in wanted:
            v = obj.get(c)
            if isinstance(v, str) and len(v) > opts.max_cell_chars:
                raise TableError(f"{path.name}: {at.row_name()} (line {lineno}) has a cell longer than "
                                 f"--max-cell-chars {opts.max_cell_chars:,} characters ({_short(c)})")
        images.append(next((s for c in columns.image if (s := _text(obj.get(c)).strip())), ""))
        for c, col in cells.items():
            col.append(obj.get(c))
        at.row += 1
    dialect = Dialect("jsonl", encoding)
    present = _check_columns(path, list(seen), columns, dialect)
    return PostsTable(path, columns, dialect, list(seen), images, {c: v for c, v in cells.items() if c in present})


def _text(value) -> str:
    return "" if value is None else str(value)


def _check_columns(path: Path, found: list[str], columns: ColumnMap, dialect: Dialect,
                   header_line: str = "") -> set[str]:
    """The wanted columns present; a ``TableError`` naming every missing one at once."""
    wanted = columns.wanted(found)
    optional = set(columns.label_columns(found)) if columns.label_optional else set()
    missing = [c for c in wanted if c not in found and c not in optional]
    if not missing:
        return {c for c in wanted if c in found}
    names = ", ".join(f"{_short(c)} ({wanted[c]})" for c in missing)
    listed = ", ".join(_short(c) for c in found[:MAX_LISTED_COLUMNS]) or "(none)"
    more = f" and {len(found) - MAX_LISTED_COLUMNS:,} more" if len(found) > MAX_LISTED_COLUMNS else ""
    hint = ""
    if dialect.sep_source == "--sep":
        better = [s for s in SNIFFED_SEPS if s != dialect.sep and s in header_line]
        hint = f"; the header holds {better[0]!r}: try --sep {'tab' if better[0] == chr(9) else better[0]!r}" \
            if better else ""
    raise TableError(f"{path.name}: {_count(len(missing), 'column')} not found: {names}. It was "
                     f"{dialect.describe()}; {_count(len(found), 'column')} found: {listed}{more}{hint}")


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _short(name: str) -> str:
    return repr(name if len(name) <= SAMPLE_CHARS else name[:SAMPLE_CHARS] + "...")


# ---------------------------------------------------------------------------------------
# Labels and image sources
# ---------------------------------------------------------------------------------------


def parse_label(value) -> tuple[float | None, str | None, str]:
    """``(label, None, "")`` for a usable label, else ``(None, reason, detail)``."""
    if value is None:
        return None, "missing_label", "no label"
    if isinstance(value, bool):  # JSON true/false: an int subclass, but not a count
        return None, "non_numeric_label", f"label {value!r} is not a number"
    if isinstance(value, (int, float)):
        try:
            x = float(value)
        except OverflowError:  # a JSON integer past float range
            return None, "non_finite_label", f"label {value!r} overflows a float"
    else:
        s = str(value).strip()
        if s == "":
            return None, "missing_label", "empty label"
        try:
            x = float(s)
        except ValueError:
            return None, "non_numeric_label", f"label {s[:50]!r} is not a number"
    if not math.isfinite(x):
        return None, "non_finite_label", f"label {value!r} is not finite"
    if x < 0:
        return None, "negative_label", f"label {value!r} is negative"
    return x, None, ""


def image_source(raw: str, base_dir: Path) -> str:
    """A non-empty image cell -> the URL as written, or the absolute, normalised local path
    (a relative path hangs off ``base_dir``, the table's folder)."""
    if is_url(raw):
        return raw
    p = Path(raw).expanduser()
    return os.path.normpath(p if p.is_absolute() else base_dir / p)


def resolve_image_sources(todo: Sequence[tuple[int, str]], download: DownloadConfig, progress: bool = True
                          ) -> tuple[list[tuple[int, str]], list[tuple[int, str, str]]]:
    """``(row, image_source)`` pairs -> ``(row, local path)`` for the rows whose image can be
    read from disk, and ``(row, reason, detail)`` for the rest, each in the order given.

    This is the download seam: URL cells become cached local files here, and nowhere
    else. Every distinct URL goes once through ``download.download_all`` (``download``:
    workers, timeouts, byte cap, cache), which fetches only what its cache lacks, and
    answers any scheme but http(s) with ``unsupported_url``; a failed URL gets its
    ``DownloadError`` reason and message. A table without URL cells fetches nothing (and
    starts no client).
    """
    results: dict[str, Path | DownloadError] = {}
    if any(is_url(source) for _, source in todo):
        urls = (source for _, source in todo if is_url(source))  # read lazily by the downloader
        results = dict(download_all(urls, download, progress=progress))
    local, rejects = [], []
    for row, source in todo:
        got = results.get(source) if is_url(source) else source
        if isinstance(got, DownloadError):
            rejects.append((row, got.reason, got.message))
        else:
            local.append((row, str(got)))
    return local, rejects


# ---------------------------------------------------------------------------------------
# Post fingerprints
# ---------------------------------------------------------------------------------------


def post_fingerprint(image: bytes, raw_caption) -> int:
    """A 64-bit hash of a post: its image file's bytes and its raw caption (None = "").

    The same file and caption give the same number in preprocessing and in scoring, so
    a model can say which posts of a table it was trained or calibrated on.
    """
    h = hashlib.blake2b(digest_size=8, person=b"post-fp-v1")
    h.update(len(image).to_bytes(8, "little"))  # the boundary between the two parts
    h.update(image)
    h.update(_text(raw_caption).encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest(), "little")


def file_fingerprint(image: str | os.PathLike | bytes, raw_caption) -> int:
    """``post_fingerprint`` of an image given as a path or as bytes."""
    data = image if isinstance(image, (bytes, bytearray)) else Path(image).read_bytes()
    return post_fingerprint(bytes(data), raw_caption)


def save_fingerprints(path: Path, by_split: Mapping[str, Sequence[int]]) -> None:
    """``fingerprints.npz``: one uint64 array per split, in record order (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **{s: np.asarray(v, dtype=np.uint64) for s, v in by_split.items()})
    os.replace(tmp, path)


def load_fingerprints(data_dir: str | os.PathLike, splits: Sequence[str]) -> np.ndarray | None:
    """The sorted, distinct fingerprints of ``splits`` in a preprocessed dir; None when it
    has none (data preprocessed before fingerprints existed)."""
    path = Path(data_dir) / FINGERPRINTS_NAME
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as f:
        return np.unique(np.concatenate([f[s].astype(np.uint64) for s in splits]))


# ---------------------------------------------------------------------------------------
# Writing CSVs
# ---------------------------------------------------------------------------------------


def safe_cell(value):
    """A string cell that a spreadsheet would run as a formula gets a leading ``'``.

    Only strings: a number (a negative prediction) stays a number. The rule is
    idempotent, since an escaped cell starts with ``'``.
    """
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


class SafeCsvWriter:
    """``csv.writer`` whose string cells go through ``safe_cell``."""

    def __init__(self, fh: IO[str], **kw):
        self._w = csv.writer(fh, **kw)

    def writerow(self, row: Iterable) -> None:
        self._w.writerow([safe_cell(v) for v in row])

    def writerows(self, rows: Iterable[Iterable]) -> None:
        for row in rows:
            self.writerow(row)


def safe_csv_writer(fh: IO[str], **kw) -> SafeCsvWriter:
    """The writer for every CSV the project writes."""
    return SafeCsvWriter(fh, **kw)


def write_rejects(path: Path, rejects: Iterable[tuple]) -> None:
    """``rejects.csv``: ``row,image_path,reason,detail`` sorted by row, via a temp file and rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = safe_csv_writer(fh)
        w.writerow(REJECTS_HEADER)
        w.writerows(sorted(rejects, key=lambda r: r[0]))
    os.replace(tmp, path)
