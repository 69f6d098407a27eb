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

Every record read is checked, and one that fails is refused with a ``RecordError`` that
names its file and index:

1. before its pixels exist: the unpickler hands PIL's pickled state (mode, size, bytes)
   to ``check_image_state`` before PIL builds the image from it, so a 32 MB pickle that
   declares a 16000x16000 image is refused at 0 bytes, and so is a record whose bytes
   (the index says how many) exceed what an image within the cap could take;
2. after: ``posts.Record.from_dict`` checks the mode (RGB), the types and finiteness of
   the values (``posts.Record.problems``).
"""

from __future__ import annotations

import io
import json
import os
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from data_preprocessing.posts import RECORD_FORMAT_VERSION, Record
from data_preprocessing.prepare import MAX_PIXELS, ImageError, check_image_size

SPLITS = ("train", "val", "test")
META_NAME = "meta.json"
# A record is its RGB image's bytes (3 a pixel) plus a caption of at most 500 characters,
# a few numbers and feature values: this much room beyond the image is ample.
_RECORD_SLACK_BYTES = 1 << 20

# Exactly the globals that pickling an RGB PIL image inside a dict of str/float needs.
# PIL pickles images via Image.__reduce__ -> (Image.Image, (), state), state holding mode,
# size and raw bytes; nothing else is reachable from a record.
_ALLOWED_GLOBALS = {
    ("PIL.Image", "Image"),
}
# What unpickling a damaged or hostile record can raise once no global can run code.
_UNPICKLE_ERRORS = (pickle.UnpicklingError, ValueError, EOFError, TypeError, AttributeError, IndexError,
                    KeyError)


class UnsafePickleError(pickle.UnpicklingError):
    """A record file names a global outside the allowlist; it was not written by us."""


class RecordError(ValueError):
    """A record that fails its checks; the message names the file and the record index."""


def check_image_state(state: Any, max_pixels: int) -> None:
    """Refuse PIL's pickled image state (``[info, mode, size, palette, data]``) unless its
    size is within ``max_pixels`` and the aspect-ratio limit and its bytes fit its size.
    Runs before PIL allocates the image; the mode is checked by ``Record.problems``."""
    if not isinstance(state, list) or len(state) < 5:
        raise pickle.UnpicklingError("a pickled PIL image has an unexpected state")
    mode, size, data = state[1], state[2], state[4]
    if (not isinstance(mode, str) or not isinstance(size, tuple) or len(size) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in size)):
        raise pickle.UnpicklingError(f"a pickled PIL image has mode {mode!r} and size {size!r}")
    try:
        check_image_size(size[0], size[1], max_pixels)
    except ImageError as e:
        raise pickle.UnpicklingError(f"the record's image {e}") from None
    if not isinstance(data, bytes) or len(data) > 4 * size[0] * size[1]:
        raise pickle.UnpicklingError(f"a pickled {size[0]}x{size[1]} image holds more bytes than its size")


@lru_cache(maxsize=8)
def _checked_image_class(max_pixels: int) -> type:
    """PIL's ``Image`` as the unpickler builds it, with its state checked first.

    Pickle builds an object as ``cls.__new__(cls)`` then ``obj.__setstate__(state)``; this
    subclass checks the state, then becomes a plain ``PIL.Image.Image`` and lets PIL
    build the pixels. What a record holds is an ordinary image.
    """

    class CheckedImage(Image.Image):
        def __setstate__(self, state):
            check_image_state(state, max_pixels)
            self.__class__ = Image.Image
            Image.Image.__setstate__(self, state)

    return CheckedImage


class SafeUnpickler(pickle.Unpickler):
    """Unpickles only what a record holds, images checked by ``check_image_state``."""

    def __init__(self, file, max_pixels: int = MAX_PIXELS):
        super().__init__(file)
        self.max_pixels = max_pixels

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return _checked_image_class(self.max_pixels)
        raise UnsafePickleError(
            f"refusing to load global {module}.{name!s}: record files may only contain "
            f"{sorted('.'.join(g) for g in _ALLOWED_GLOBALS)}. This file was not written by "
            "data_preprocessing/preprocess.py; do not load untrusted pickles."
        )


def safe_loads(data: bytes, max_pixels: int = MAX_PIXELS):
    return SafeUnpickler(io.BytesIO(data), max_pixels).load()


def _refused(path: Path, i: int, e: Exception) -> Exception:
    """``e`` as raised by reading record ``i`` of ``path``, with both named in its message."""
    cls = UnsafePickleError if isinstance(e, UnsafePickleError) else RecordError
    return cls(f"{path}: record {i}: {e}")


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

    def __init__(self, path: str | os.PathLike, max_pixels: int = MAX_PIXELS):
        self.path = Path(path)
        self.max_pixels = max_pixels
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
        i = range(len(self))[i]  # normalises negative indices, raises IndexError
        raw = self.read_raw(i)
        try:
            return Record.from_dict(raw, self.max_pixels)
        except ValueError as e:
            raise _refused(self.path, i, e) from None

    def read_raw(self, i: int) -> dict:
        """Record ``i`` as stored: the plain dict, its types unchecked (for validation).

        Its image has passed ``check_image_state``; ``RecordError`` otherwise.
        """
        if self._fh is None or self._pid != os.getpid():
            self._fh = open(self.path, "rb")
            self._pid = os.getpid()
        i = range(len(self))[i]
        size = int(self._ends[i] - self.offsets[i])
        if not 0 < size <= 3 * self.max_pixels + _RECORD_SLACK_BYTES:
            raise RecordError(f"{self.path}: record {i}: the index gives it {size:,} bytes; a record with an "
                              f"image of at most {self.max_pixels:,} pixels takes 1 to "
                              f"{3 * self.max_pixels + _RECORD_SLACK_BYTES:,}")
        self._fh.seek(int(self.offsets[i]))
        try:
            return safe_loads(self._fh.read(size), self.max_pixels)
        except _UNPICKLE_ERRORS as e:
            raise _refused(self.path, i, e) from None

    def __iter__(self) -> Iterator[Record]:
        for i in range(len(self)):
            yield self[i]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fh"] = None  # file handles do not cross process boundaries
        return state


def iter_pickles(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Iterator[tuple[int, object]]:
    """Yield ``(start byte, object)`` for each pickle in a record file, in order.

    A fresh ``SafeUnpickler`` per pickle: one over the whole stream would keep every
    record in its memo, so memory would grow with the file.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        i = 0
        while fh.tell() < size:
            start = fh.tell()
            try:
                obj = SafeUnpickler(fh, max_pixels).load()
            except _UNPICKLE_ERRORS as e:
                raise _refused(path, i, e) from None
            yield start, obj
            i += 1


def iter_records(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Iterator[Record]:
    """Stream the checked records of a ``.pkl`` file in order, without the index."""
    i = 0
    for _, obj in iter_pickles(path, max_pixels):
        # Files hold record dicts, or lists of them; both are accepted.
        for d in obj if isinstance(obj, list) else [obj]:
            try:
                record = Record.from_dict(d, max_pixels)
            except ValueError as e:
                raise _refused(Path(path), i, e) from None
            yield record
            i += 1


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
