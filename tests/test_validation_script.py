"""Tests for the top-level test_preprocessing.py: the check users run on preprocessed data."""

from __future__ import annotations

import importlib.util
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_preprocessing import preprocess
from data_preprocessing.records import RecordWriter
from tests.tiny_posts import POSTS_HEADER, write_posts

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "test_preprocessing.py"


def _load_script():
    # Imported by path: the script sits at the repo root, outside any package.
    spec = importlib.util.spec_from_file_location("validate_preprocessing", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


validate = _load_script()


@pytest.fixture(scope="module")
def good_data(tmp_path_factory) -> Path:
    """preprocess.py output for a small clean table."""
    root = tmp_path_factory.mktemp("posts")
    posts = write_posts(root, [[i, f"Post {i} LOVE it &amp; more #tag @bob \U0001F60D" if i % 4 else "", i]
                               for i in range(20)], size=(40, 30))
    out = root / "out"
    assert preprocess.main(["--input", str(posts), "--out", str(out), "--workers", "1",
                            "--resize-shortest-edge", "0", "--no-progress"]) == 0
    return out


@pytest.fixture
def data(good_data, tmp_path) -> Path:
    """A private copy of the good output, for a test to damage."""
    return Path(shutil.copytree(good_data, tmp_path / "data"))


def _edit_meta(data: Path, edit) -> None:
    meta = json.loads((data / "meta.json").read_text())
    edit(meta)
    (data / "meta.json").write_text(json.dumps(meta))


def _fails(data: Path, capsys, *extra) -> str:
    assert validate.main(["--data", str(data), *extra]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out
    return out


def test_passes_on_good_output(good_data, capsys):
    assert validate.main(["--data", str(good_data)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "train: 16 records, 16 checked: OK" in out
    assert validate.main(["--data", str(good_data), "--max-records", "3"]) == 0
    assert "train: 16 records, 3 checked: OK" in capsys.readouterr().out


def test_fails_when_split_count_is_tampered(data, capsys):
    def bump(meta):
        meta["counts"]["splits"]["train"] += 1
        meta["counts"]["kept"] += 1
        meta["counts"]["rows_read"] += 1
    _edit_meta(data, bump)
    out = _fails(data, capsys)
    assert "train: index holds 16 records but meta.json counts 17" in out


def test_fails_when_counts_do_not_add_up(data, capsys):
    _edit_meta(data, lambda m: m["counts"].update(rejected=m["counts"]["rejected"] + 2))
    assert "!= rows read" in _fails(data, capsys)


def test_fails_on_other_cleaning_version(data, capsys):
    _edit_meta(data, lambda m: m.update(cleaning_version="0"))
    out = _fails(data, capsys)
    assert "cleaned with cleaning version '0'" in out


def test_fails_on_bad_records(data, capsys):
    # A val split whose records break each rule once, behind a well-formed index.
    good_im = Image.new("RGB", (4, 4))
    bad = [
        {"image": good_im, "text": "  not   clean &amp; ", "sentiment": 0.0, "label": 1.0, "row": 0},
        {"image": Image.new("L", (4, 4)), "text": "ok", "sentiment": 0.0, "label": 1.0, "row": 1},
        {"image": good_im, "text": "ok", "sentiment": 1.5, "label": 1.0, "row": 2},
        {"image": good_im, "text": "ok", "sentiment": 0.0, "label": float("inf"), "row": 3},
        {"image": good_im, "text": "ok", "sentiment": 0.0, "label": 3, "row": 4},  # int, not float
        {"image": good_im, "text": "ok", "sentiment": 0.0, "row": 5},
        {"image": good_im, "text": "ok", "sentiment": 0.0, "label": 1.0, "row": 6, "features": {"x": 1.0}},
    ]
    w = RecordWriter(data, "val")
    for rec in bad:  # on-disk dicts, as a broken writer would leave them
        w.write_bytes(pickle.dumps(rec))
    w.close()
    _edit_meta(data, lambda m: m["counts"]["splits"].update(val=len(bad)))
    out = _fails(data, capsys)
    for reason in ["text is not clean", "image mode is L", "sentiment outside [-1, 1]", "label is not finite",
                   "label is a int, not a float", "record lacks keys ['label']",
                   "features ['x'] are not meta.json's feature columns []"]:
        assert reason in out, reason


def test_fails_when_index_and_stream_disagree(data, capsys):
    # One more record in the stream than the index knows about.
    with open(data / "test.pkl", "ab") as fh:
        pickle.dump({"image": Image.new("RGB", (2, 2)), "text": "x", "sentiment": 0.0, "label": 0.0}, fh)
    assert "the stream holds 3 records but the index 2" in _fails(data, capsys)


def test_fails_when_an_index_offset_is_wrong(data, capsys):
    offsets = np.fromfile(data / "train.idx", dtype="<i8")
    offsets[3] += 1  # still increasing, so only the stream comparison can catch it
    offsets.astype("<i8").tofile(data / "train.idx")
    assert f"train: record 3 starts at byte {offsets[3] - 1}, the index says {offsets[3]}" in _fails(data, capsys)


def test_fails_on_missing_files(data, capsys):
    (data / "train.idx").unlink()
    assert "offset index" in _fails(data, capsys)
    (data / "meta.json").unlink()
    assert "meta.json not found" in _fails(data, capsys)


def test_runs_as_a_script(good_data, data):
    ok = subprocess.run([sys.executable, str(SCRIPT), "--data", str(good_data)], cwd=data,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    _edit_meta(data, lambda m: m.update(cleaning_version="0"))
    bad = subprocess.run([sys.executable, str(SCRIPT), "--data", str(data)], cwd=data,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "cleaning version" in bad.stdout and "Traceback" not in bad.stderr


def test_fails_an_empty_split(data, capsys):
    """What preprocess.py now refuses to write, made by hand: training cannot use it."""
    for ext in ("pkl", "idx"):
        (data / f"val.{ext}").unlink()
    RecordWriter(data, "val").close()
    _edit_meta(data, lambda m: m["counts"].update(kept=m["counts"]["kept"] - m["counts"]["splits"]["val"],
                                                   rejected=m["counts"]["rejected"] + m["counts"]["splits"]["val"],
                                                   splits={**m["counts"]["splits"], "val": 0}))
    out = _fails(data, capsys)
    assert "val: no records; training needs posts in every split" in out
    assert "train: 16 records, 16 checked: OK" in out  # the other splits still pass


def test_passes_records_with_a_timestamp_feature(tmp_path, capsys):
    """A datetime feature's parsed value is a float (Unix seconds), like a numeric one."""
    posts = write_posts(tmp_path, [[i, f"post {i}", i, "" if i == 3 else f"2025-03-{i + 1:02d}T23:30:00+0000"]
                                   for i in range(20)], (*POSTS_HEADER, "posted_at"), size=(20, 16))
    assert preprocess.main(["--input", str(posts), "--out", str(tmp_path / "out"), "--workers", "1",
                            "--datetime-cols", "posted_at", "--timezone", "Europe/Berlin", "--no-progress"]) == 0
    assert validate.main(["--data", str(tmp_path / "out")]) == 0, capsys.readouterr().out


def test_the_bare_commands_run_in_order_on_data_posts_csv(tmp_path):
    """`preprocess.py` then `test_preprocessing.py`, with no arguments, from the folder that
    holds data/posts.csv; without it, each says where the table goes."""
    def bare(script: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO_ROOT / script)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)

    missing = bare("data_preprocessing/preprocess.py")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    last = missing.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no posts table at data/posts.csv") and "--input" in last
    assert 'README.md, "On your own data"' in last
    unchecked = bare("test_preprocessing.py")
    assert unchecked.returncode == 1 and "no preprocessed data at data/processed" in unchecked.stdout

    data = tmp_path / "data"
    write_posts(data, [[i, f"post {i}", i] for i in range(20)], size=(24, 20))
    made = bare("data_preprocessing/preprocess.py")
    assert made.returncode == 0, made.stderr
    assert (data / "processed" / "meta.json").is_file()
    checked = bare("test_preprocessing.py")
    assert checked.returncode == 0 and "PASS" in checked.stdout, checked.stdout
