"""Record files: how preprocessed posts are written and, safely, read back.

Format of one split, ``DIR/{split}.pkl``: a plain concatenation of pickles, one record
dict per ``pickle.dump``, so ``pickle.load`` called until ``EOFError`` yields every
record with standard tools. ``DIR/{split}.idx`` beside it holds the byte offset of each
record as little-endian int64, so training can seek to record ``i`` without reading the
others: memory stays flat whatever the dataset size.

A record is the plain dict ``posts.Record.to_dict`` writes (the keys are spelled there,
once); readers hand back ``posts.Record`` objects. ``meta.json["record_format"]["version"]``
says which version of that dict a directory holds (``check_record_format``).

Reading is only ever done through ``RecordReader``/``iter_records``, which use
``SafeUnpickler``: a pickle may name only the classes this module writes. Anything else
(``os.system``, ``subprocess.Popen``, ``builtins.eval``) is refused before it runs.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path
from typing import Iterator

import numpy as np

from data_preprocessing.posts import RECORD_FORMAT_VERSION, Record

SPLITS = ("train", "val", "test")
META_NAME = "meta.json"

# Exactly the globals that pickling an RGB PIL image inside a dict of str/float needs.
# PIL pickles images via Image.__reduce__ -> (Image.Image, (), state), state holding mode,
# size and raw bytes; nothing else is reachable from a record.
_ALLOWED_GLOBALS = {
    ("PIL.Image", "Image"),
}


class UnsafePickleError(pickle.UnpicklingError):
    """A record file names a global outside the allowlist; it was not written by us."""


class SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refusing to load global {module}.{name!s}: record files may only contain "
            f"{sorted('.'.join(g) for g in _ALLOWED_GLOBALS)}. This file was not written by "
            "data_preprocessing/preprocess.py; do not load untrusted pickles."
        )


def safe_loads(data: bytes):
    return SafeUnpickler(io.BytesIO(data)).load()


def record_bytes(record: Record) -> bytes:
    """One record as the bytes a record file holds (workers pickle; the parent only writes)."""
    return pickle.dumps(record.to_dict(), protocol=pickle.HIGHEST_PROTOCOL)


class RecordWriter:
    """Appends records to ``{split}.pkl`` and their offsets to ``{split}.idx`` as they come.

    Records are written atomically as a whole split: both files are built under a
    temporary name and renamed on ``close()``, so a crash never leaves a half split.
    """

    def __init__(self, out_dir: Path, split: str):
        self.path = Path(out_dir) / f"{split}.pkl"
        self.idx_path = Path(out_dir) / f"{split}.idx"
        self._tmp = self.path.with_suffix(".pkl.tmp")
        self._tmp_idx = self.idx_path.with_suffix(".idx.tmp")
        self._fh = open(self._tmp, "wb")
        self._idx = open(self._tmp_idx, "wb")
        self.count = 0

    def write_bytes(self, payload: bytes) -> None:
        """Append one already-pickled record (workers pickle; the parent only writes)."""
        self._idx.write(np.int64(self._fh.tell()).tobytes())
        self._fh.write(payload)
        self.count += 1

    def write(self, record: Record) -> None:
        self.write_bytes(record_bytes(record))

    def close(self) -> None:
        self._fh.close()
        self._idx.close()
        os.replace(self._tmp, self.path)
        os.replace(self._tmp_idx, self.idx_path)

    def abort(self) -> None:
        for fh, tmp in ((self._fh, self._tmp), (self._idx, self._tmp_idx)):
            fh.close()
            tmp.unlink(missing_ok=True)


class RecordReader:
    """Random access to one split's records through the offset index.

    Holds only the offsets (8 bytes per record) in memory. The file handle is opened
    lazily per process, so a reader survives being sent to DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        idx_path = self.path.with_suffix(".idx")
        if not self.path.is_file():
            raise FileNotFoundError(f"no record file {self.path}")
        if not idx_path.is_file():
            raise FileNotFoundError(f"no offset index {idx_path} beside {self.path}")
        self.offsets = np.fromfile(idx_path, dtype="<i8")
        self._ends = np.append(self.offsets[1:], self.path.stat().st_size)
        self._fh = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> Record:
        return Record.from_dict(self.read_raw(i))

    def read_raw(self, i: int) -> dict:
        """Record ``i`` as stored: the plain dict, unchecked (for validation)."""
        if self._fh is None or self._pid != os.getpid():
            self._fh = open(self.path, "rb")
            self._pid = os.getpid()
        i = range(len(self))[i]  # normalises negative indices, raises IndexError
        self._fh.seek(int(self.offsets[i]))
        return safe_loads(self._fh.read(int(self._ends[i] - self.offsets[i])))

    def __iter__(self) -> Iterator[Record]:
        for i in range(len(self)):
            yield self[i]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fh"] = None  # file handles do not cross process boundaries
        return state


def iter_pickles(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """Yield ``(start byte, object)`` for each pickle in a record file, in order.

    A fresh ``SafeUnpickler`` per pickle: one over the whole stream would keep every
    record in its memo, so memory would grow with the file.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        while fh.tell() < size:
            start = fh.tell()
            yield start, SafeUnpickler(fh).load()


def iter_records(path: str | os.PathLike) -> Iterator[Record]:
    """Stream the records of a ``.pkl`` file in order, without the index (safe unpickler)."""
    for _, obj in iter_pickles(path):
        # Files hold record dicts, or lists of them; both are accepted.
        for d in obj if isinstance(obj, list) else [obj]:
            yield Record.from_dict(d)


def load_meta(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {data_dir} the output of preprocess.py?")
    return json.loads(path.read_text())


def check_record_format(meta: dict, data_dir) -> None:
    """Refuse record files of a format version this code cannot read."""
    # Version 1 (before features) wrote no version; its records load as posts without features.
    found = (meta.get("record_format") or {}).get("version", 1)
    if found not in (1, RECORD_FORMAT_VERSION):
        raise ValueError(f"{data_dir} holds records of format version {found!r}; this code reads versions 1 "
                         f"and {RECORD_FORMAT_VERSION}. Re-run data_preprocessing/preprocess.py on the raw posts.")


def check_cleaning_version(meta: dict, data_dir) -> None:
    """Refuse data cleaned by a different ``clean_text`` than the code has now."""
    from data_preprocessing.prepare import CLEANING_VERSION

    found = str(meta.get("cleaning_version"))
    if found != CLEANING_VERSION:
        raise ValueError(
            f"{data_dir} was cleaned with cleaning version {found!r}, but this code cleans "
            f"with version {CLEANING_VERSION!r}. Captions would differ between training and "
            "serving; re-run data_preprocessing/preprocess.py on the raw posts."
        )
