"""Tests for data_preprocessing/records.py: the record file contract and its safe reader."""

from __future__ import annotations

import copyreg
import multiprocessing as mp
import operator
import os
import pickle
import uuid

import numpy as np
import pytest
from PIL import Image

from data_preprocessing.posts import Record
from data_preprocessing.records import (RecordError, RecordReader, RecordWriter, UnsafePickleError, iter_records,
                                        safe_loads)


def _record(i: int) -> Record:
    rng = np.random.default_rng(i)
    im = Image.fromarray(rng.integers(0, 256, (6 + i, 9, 3), dtype=np.uint8))  # sizes differ per record
    features = {"followers": float(10 ** i), "platform": None if i == 2 else "tiktok"} if i % 2 == 0 else {}
    return Record(image=im, text=f"caption {i} \U0001F60D", sentiment=0.1 * i - 0.2, features=features,
                  label=float(i * 3), row=i)


def _same(a: Record | dict, b: Record | dict) -> bool:
    """Equal records; a plain dict is the on-disk form (what pickle.load gives)."""
    a, b = (r.to_dict() if isinstance(r, Record) else r for r in (a, b))
    return (a.keys() == b.keys() and a["image"].mode == b["image"].mode and a["image"].size == b["image"].size
            and a["image"].tobytes() == b["image"].tobytes()
            and all(a[k] == b[k] for k in a if k != "image"))


@pytest.fixture
def split_file(tmp_path):
    """A 'train' split of 5 records, written with both writer entry points."""
    w = RecordWriter(tmp_path, "train")
    for i in range(5):
        if i % 2:
            w.write(_record(i))
        else:  # how preprocess.py writes: workers pickle, the parent appends bytes
            w.write_bytes(pickle.dumps(_record(i).to_dict(), protocol=pickle.HIGHEST_PROTOCOL))
    assert not (tmp_path / "train.pkl").exists()  # nothing visible before close()
    w.close()
    assert w.count == 5
    return tmp_path / "train.pkl"


def test_round_trip(split_file):
    reader = RecordReader(split_file)
    assert len(reader) == 5
    assert split_file.with_suffix(".idx").stat().st_size == 5 * 8  # int64 per record
    for i, rec in enumerate(reader):
        assert _same(rec, _record(i))
    streamed = list(iter_records(split_file))
    assert len(streamed) == 5 and all(_same(r, _record(i)) for i, r in enumerate(streamed))


def test_plain_pickle_load_until_eof_reads_the_file(split_file):
    # The user-facing contract: standard tools read a split without our code.
    records = []
    with open(split_file, "rb") as fh:
        while True:
            try:
                records.append(pickle.load(fh))
            except EOFError:
                break
    assert len(records) == 5
    assert all(_same(r, _record(i)) for i, r in enumerate(records))


def test_random_access_by_index(split_file):
    reader = RecordReader(split_file)
    for i in [3, 0, 4, 1]:  # out of order: each read seeks
        assert _same(reader[i], _record(i))
    assert _same(reader[-1], _record(4))
    with pytest.raises(IndexError):
        reader[5]


def test_abort_leaves_nothing(tmp_path):
    w = RecordWriter(tmp_path, "val")
    w.write(_record(0))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_missing_files_are_clear_errors(tmp_path, split_file):
    with pytest.raises(FileNotFoundError, match="no record file"):
        RecordReader(tmp_path / "nope.pkl")
    split_file.with_suffix(".idx").unlink()
    with pytest.raises(FileNotFoundError, match="offset index"):
        RecordReader(split_file)


def test_reader_pickles_across_processes(split_file):
    reader = RecordReader(split_file)
    reader[0]  # opens the file handle, which must not travel
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._fh is None and _same(clone[2], _record(2))
    # A real child process (as a DataLoader worker would be), given the reader by pickle.
    with mp.get_context("spawn").Pool(1) as pool:
        got = pool.starmap(operator.getitem, [(reader, 1), (reader, 4)])
    assert _same(got[0], _record(1)) and _same(got[1], _record(4))


class _Evil:
    """Unpickling this runs a shell command: what a malicious 'record file' would hold."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_a_real_payload(split_file, tmp_path):
    # The payload is real: plain pickle runs the command.
    armed = tmp_path / f"pwned_{uuid.uuid4().hex}"
    pickle.loads(pickle.dumps(_Evil(str(armed))))
    assert armed.exists()

    marker = tmp_path / f"pwned_{uuid.uuid4().hex}"
    payload = pickle.dumps(_Evil(str(marker)))
    size = split_file.stat().st_size
    with open(split_file, "ab") as fh:  # append it as a 6th record, index included
        fh.write(payload)
    with open(split_file.with_suffix(".idx"), "ab") as fh:
        fh.write(np.int64(size).tobytes())

    reader = RecordReader(split_file)
    assert len(reader) == 6 and _same(reader[0], _record(0))  # honest records still load
    with pytest.raises(UnsafePickleError, match="posix.system|os.system"):
        reader[5]
    with pytest.raises(UnsafePickleError):
        list(iter_records(split_file))
    with pytest.raises(UnsafePickleError):
        safe_loads(payload)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------
# Records are checked on read (issue 28, finding 8)
# ---------------------------------------------------------------------------------------


class _DeclaredImage:
    """Pickles exactly as a PIL image with this state would (``PIL.Image.Image`` rebuilt
    from ``[info, mode, size, palette, data]``), without building the image here."""

    def __init__(self, mode: str, size: tuple[int, int], data: bytes):
        self.state = [{}, mode, size, None, data]

    @property
    def __class__(self):  # what pickle checks __newobj__'s class against
        return Image.Image

    def __reduce_ex__(self, protocol):
        return copyreg.__newobj__, (Image.Image,), self.state


def _split_of(tmp_path, dicts) -> os.PathLike:
    w = RecordWriter(tmp_path, "train")
    for d in dicts:
        w.write_bytes(pickle.dumps(d, protocol=pickle.HIGHEST_PROTOCOL))
    w.close()
    return tmp_path / "train.pkl"


def test_huge_mode_1_record_is_refused_before_its_pixels_exist(tmp_path, monkeypatch):
    # 16000^2 mode "1": 32 MB pickled, 256 MB as a PIL image, 1 GB once converted to RGB.
    small = pickle.loads(pickle.dumps(_DeclaredImage("1", (16, 16), bytes(32))))
    assert type(small) is Image.Image and (small.mode, small.size) == ("1", (16, 16))  # a real PIL pickle
    bomb = _DeclaredImage("1", (16_000, 16_000), bytes(16_000 * 16_000 // 8))
    path = _split_of(tmp_path, [_record(0).to_dict(), {**_record(1).to_dict(), "image": bomb}])
    assert path.stat().st_size > 32_000_000

    built = []
    original = Image.Image.__setstate__
    monkeypatch.setattr(Image.Image, "__setstate__",
                        lambda self, state: built.append(state[2]) or original(self, state))
    reader = RecordReader(path)
    assert _same(reader[0], _record(0))
    with pytest.raises(RecordError, match=rf"{path}: record 1: .*too_many_pixels"):
        reader[1]
    with pytest.raises(RecordError, match=rf"{path}: record 1: .*too_many_pixels"):
        list(iter_records(path))
    assert (16_000, 16_000) not in built  # PIL never allocated it


@pytest.mark.parametrize("change,problem", [
    ({"image": Image.new("1", (8, 8))}, "image mode is 1, not RGB"),
    ({"image": Image.new("RGB", (2, 60))}, "extreme_aspect_ratio"),
    ({"image": "not an image"}, "image is a str"),
    ({"text": 12}, "text is a int, not a str"),
    ({"sentiment": "0.5"}, "sentiment is a str, not a number"),
    ({"label": float("nan")}, "label is not finite"),
    ({"label": True}, "label is a bool, not a number"),
    ({"row": 1.5}, "row is a float, not an int"),
    ({"features": ["followers", 3.0]}, "features is a list, not a dict"),
    ({"features": {"followers": [1.0]}}, "features hold values that are not float, str or None"),
])
def test_a_record_of_the_wrong_kind_is_refused_with_its_file_and_index(tmp_path, change, problem):
    path = _split_of(tmp_path, [_record(i).to_dict() for i in range(2)] + [{**_record(2).to_dict(), **change}])
    reader = RecordReader(path)
    assert _same(reader[1], _record(1))
    with pytest.raises(RecordError, match=rf"{path}: record 2: .*{problem}"):
        reader[2]
    with pytest.raises(RecordError, match=rf"{path}: record 2: .*{problem}"):
        list(iter_records(path))


def test_an_int_is_a_number(tmp_path):
    rec = RecordReader(_split_of(tmp_path, [{**_record(1).to_dict(), "sentiment": 0, "label": 4}]))[0]
    assert (rec.sentiment, rec.label, rec.row) == (0, 4, 1)


def test_an_index_past_the_end_is_refused(split_file):
    with open(split_file.with_suffix(".idx"), "ab") as fh:
        fh.write(np.int64(split_file.stat().st_size + 10).tobytes())
    reader = RecordReader(split_file)
    with pytest.raises(RecordError, match=r"record 5: the index gives it -10 bytes"):
        reader[5]
