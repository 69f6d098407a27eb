"""Hostile inputs to data_preprocessing/prepare.py (issue 28): images whose resize or decode
would cost far more than their bytes, pixel data cut short behind a clean end, and captions
whose sentiment costs grow with the square of their words. Each test reproduces a finding
and fails on the code before the fix; the "still loads" tests guard real files."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from data_preprocessing.posts import PrepareConfig, prepare_post
from data_preprocessing.prepare import (MAX_ASPECT_RATIO, MAX_INPUT_CHARS, SENTIMENT_MAX_WORDS, ImageError,
                                        ImageHeader, ResizePolicy, clean_text, load_image, probe_image, sentiment)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(w: int, h: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _reason(source, **kw) -> str:
    with pytest.raises(ImageError) as e:
        load_image(source, **kw)
    return e.value.reason


@pytest.fixture
def no_decode(monkeypatch):
    """Makes any pixel decode fail the test: what is refused must be refused before it."""

    def decode(self, *a, **k):
        raise AssertionError("load_image decoded pixels it should have refused first")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)


# ---------------------------------------------------------------------------------------
# Finding 1: the pixels the model's resize makes, and the aspect ratio
# ---------------------------------------------------------------------------------------

WIDE = _encode(Image.new("RGB", (20_000, 2)), "PNG")  # ~200 bytes; the processor made 224 x 2,240,000
NEEDLE = _encode(Image.new("1", (40_000, 1)), "PNG")


def test_extreme_aspect_ratio_is_refused_from_the_header(no_decode):
    assert len(WIDE) < 300 and len(NEEDLE) < 300
    assert "extreme_aspect_ratio" in ImageError.REASONS
    assert _reason(WIDE) == "extreme_aspect_ratio"
    assert _reason(NEEDLE, min_edge=224) == "extreme_aspect_ratio"


def test_aspect_ratio_limit_is_1_to_20():
    ok = _encode(Image.new("RGB", (20 * 15, 15), (9, 9, 9)), "PNG")
    assert load_image(ok).size == (300, 15)
    assert _reason(_encode(Image.new("RGB", (15, 20 * 15 + 1)), "PNG")) == "extreme_aspect_ratio"
    assert MAX_ASPECT_RATIO == 20


def test_pixels_after_the_model_resize_are_capped(no_decode):
    # 10x200 is 2,000 pixels and 1:20, but the processor's shortest-edge resize to 224
    # makes 224 x 4480 = 1,003,520 pixels.
    tall = _encode(Image.new("RGB", (10, 200)), "PNG")
    assert _reason(tall, max_pixels=1_000_000, min_edge=224) == "too_many_pixels"
    with pytest.raises(ImageError) as e:
        prepare_post(tall, "hi", {}, PrepareConfig(ResizePolicy(shortest_edge=224), max_pixels=1_000_000))
    assert e.value.reason == "too_many_pixels" and "shortest edge of 224" in e.value.message


def test_prepare_post_refuses_the_wide_png_with_the_processor_edge():
    with pytest.raises(ImageError) as e:
        prepare_post(WIDE, "hi", {}, PrepareConfig())
    assert e.value.reason == "extreme_aspect_ratio"
    small = _encode(Image.new("RGB", (10, 200)), "PNG")  # within the default cap once resized
    assert prepare_post(small, "hi", {}, PrepareConfig()).image.size == (10, 200)


# ---------------------------------------------------------------------------------------
# probe_image: the header alone, for serving's decode admission
# ---------------------------------------------------------------------------------------


def test_probe_reads_the_header_only(no_decode):
    header = probe_image(_encode(Image.fromarray(_noise(64, 48)), "JPEG"))
    assert isinstance(header, ImageHeader)
    assert (header.width, header.height, header.format, header.mode) == (64, 48, "JPEG", "RGB")
    assert header.decode_bytes >= 64 * 48 * 8  # the decoded RGB image and its result, 4 B/px each
    sixteen = probe_image(_encode(Image.fromarray(np.zeros((30, 40), np.uint16)), "PNG"))
    assert (sixteen.mode, sixteen.format) == ("I;16", "PNG")
    with pytest.raises(Exception):
        header.width = 1  # frozen


def _liar_jpeg() -> bytes:
    """A 16x16 JPEG (~630 bytes) whose frame header says 6000x6600."""
    data = bytearray(_encode(Image.new("RGB", (16, 16), (200, 10, 10)), "JPEG", quality=50))
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, 6600, 6000)  # height, width
    return bytes(data)


@pytest.mark.parametrize("name,data,reason", [
    ("empty", b"", "empty_file"),
    ("text", b"not an image at all", "unsupported_format"),
    ("tiff", _encode(Image.new("RGB", (4, 4)), "TIFF"), "unsupported_format"),
    ("bomb", _encode(Image.new("1", (10_000, 10_000)), "PNG"), "too_many_pixels"),
    ("wide", WIDE, "extreme_aspect_ratio"),
    ("header_cut", _encode(Image.fromarray(_noise(64, 64)), "JPEG")[:100], "truncated"),
    ("liar_jpeg", _liar_jpeg(), "truncated"),
])
def test_probe_raises_what_load_image_raises(name, data, reason, no_decode):
    with pytest.raises(ImageError) as probed:
        probe_image(data)
    assert probed.value.reason == reason
    assert _reason(data) == reason


def _twelve_mp(kind: str, path: Path) -> None:
    """A 4000x3000 file of ``kind``, cheap to encode (gradients and flat colour)."""
    ramp = (np.arange(4000, dtype=np.uint32) * 65535 // 3999).astype(np.uint16)
    if kind == "16-bit PNG":
        Image.fromarray(np.broadcast_to(ramp, (3000, 4000)).copy()).save(path, "PNG")
    elif kind == "RGBA PNG":
        Image.new("RGBA", (4000, 3000), (10, 200, 30, 128)).save(path, "PNG")
    elif kind == "rotated JPEG":
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees: exif_transpose copies the image
        Image.new("RGB", (4000, 3000), (120, 130, 140)).save(path, "JPEG", exif=exif)
    else:
        Image.new("RGBA", (4000, 3000), (10, 200, 30, 128)).save(path, "WEBP", lossless=True)


# Peak RSS of load_image in a fresh process, from VmHWM (ru_maxrss would carry pytest's
# own peak over the fork and exec).
_PEAK_CHILD = """
import json, re, sys
from data_preprocessing.prepare import load_image, probe_image
def peak():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
data = open(sys.argv[1], "rb").read()
load_image(open(sys.argv[2], "rb").read())  # warm the code paths on a small image
before = peak()
im = load_image(data)
print(json.dumps({"grown": peak() - before, "estimate": probe_image(data).decode_bytes, "mode": im.mode}))
"""


@pytest.mark.parametrize("kind", ["16-bit PNG", "RGBA PNG", "rotated JPEG", "lossless WEBP"])
def test_decode_peak_stays_within_decode_bytes(kind, tmp_path):
    # decode_bytes is what serving admits decodes by, so it must bound the real peak. The
    # 16-bit path went through float64: a 12 MP 16-bit PNG grew the process by ~300 MB.
    path, small = tmp_path / "big", tmp_path / "small.png"
    _twelve_mp(kind, path)
    Image.new("RGB", (30, 40)).save(small)
    out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(path), str(small)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(out.stdout)
    print(f"12 MP {kind}: RSS +{got['grown'] / 2**20:.0f} MiB, decode_bytes {got['estimate'] / 2**20:.0f} MiB")
    assert got["mode"] == "RGB"
    assert got["grown"] < got["estimate"]


def test_sixteen_bit_scaling_is_round_v_over_257():
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    out = np.asarray(load_image(_encode(Image.fromarray(values), "PNG")))[..., 0]
    np.testing.assert_array_equal(out, np.rint(values / 257.0).astype(np.uint8))


def test_alpha_is_composited_on_white_as_alpha_composite_does():
    rgba = Image.fromarray(_noise(50, 40, seed=3, channels=4), "RGBA")
    expected = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    np.testing.assert_array_equal(np.asarray(load_image(_encode(rgba, "PNG"))), np.asarray(expected))


# ---------------------------------------------------------------------------------------
# Finding 4: pixel data that ends before the image does, whatever follows it
# ---------------------------------------------------------------------------------------


def _png(width: int, height: int, rows: int) -> bytes:
    """An RGB PNG whose zlib stream holds ``rows`` rows and then ends cleanly, IEND after it."""
    raw = b"".join(b"\x00" + _noise(width, 1, seed=r).tobytes() for r in range(rows))
    return _png_from_raw(width, height, raw, interlace=0)


def test_png_whose_data_stops_after_10_of_100_rows_is_truncated(no_decode):
    assert _reason(_png(100, 100, rows=10)) == "truncated"


def test_png_with_every_row_loads():
    assert load_image(_png(100, 100, rows=100)).size == (100, 100)


def test_interlaced_png_loads_and_its_truncation_is_caught():
    # Pillow writes no interlaced PNG: build one whose 7 passes hold every row, then cut it.
    im = Image.fromarray(_noise(37, 29, seed=5))
    passes = _adam7_raw(np.asarray(im))
    full = _png_from_raw(37, 29, passes, interlace=1)
    np.testing.assert_array_equal(np.asarray(load_image(full)), np.asarray(im))
    assert _reason(_png_from_raw(37, 29, passes[: len(passes) // 2], interlace=1)) == "truncated"


def _adam7_raw(arr: np.ndarray) -> bytes:
    out = b""
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
                           (0, 1, 1, 2)):
        sub = arr[y0::dy, x0::dx]
        if sub.size:
            out += b"".join(b"\x00" + row.tobytes() for row in sub)
    return out


def _png_from_raw(width: int, height: int, raw: bytes, interlace: int) -> bytes:
    """An RGB PNG of ``raw`` filtered rows (filter byte 0 each), compressed in one IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_cut_in_half_with_an_end_marker_is_truncated(progressive):
    data = _encode(Image.fromarray(_noise(200, 200)), "JPEG", quality=90, progressive=progressive)
    assert load_image(data).size == (200, 200)
    assert _reason(data[: len(data) // 2] + b"\xff\xd9") == "truncated"


def test_jpeg_declaring_6000x6600_in_633_bytes_is_refused_before_decoding(no_decode):
    liar = _liar_jpeg()
    assert len(liar) < 700
    with pytest.raises(ImageError) as e:
        load_image(liar)
    assert e.value.reason == "truncated" and "6000x6600" in e.value.message


def test_arithmetic_coded_jpeg_is_unsupported(no_decode):
    data = bytearray(_encode(Image.fromarray(_noise(16, 16)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 1] = 0xC9  # SOF9: arithmetic coding, where no bytes-per-block bound holds
    assert _reason(bytes(data)) == "unsupported_format"


REAL_FILES = {
    "baseline": lambda im: _encode(im, "JPEG", quality=90),
    "progressive": lambda im: _encode(im, "JPEG", quality=90, progressive=True),
    "optimized": lambda im: _encode(im, "JPEG", quality=95, optimize=True),  # its own Huffman tables
    "444": lambda im: _encode(im, "JPEG", quality=95, subsampling=0),
    "restart_markers": lambda im: _encode(im, "JPEG", quality=80, restart_marker_blocks=3),
    "grey": lambda im: _encode(im.convert("L"), "JPEG"),
    "markers_in_a_comment": lambda im: _encode(im, "JPEG", comment=b"\xff\xda\x00\x02\xff\xd9 not a scan"),
    "second_jpeg_after_eoi": lambda im: _encode(im, "JPEG") + _encode(Image.new("RGB", (8, 8)), "JPEG"),
}


@pytest.mark.parametrize("kind", sorted(REAL_FILES))
@pytest.mark.parametrize("size", [(1, 1), (7, 9), (333, 217)])
def test_real_jpegs_decode_as_pillow_decodes_them(kind, size):
    # Decoding a single-scan JPEG without its end marker (the truncation check) must not
    # change a pixel.
    im = Image.fromarray(_noise(*size, seed=size[0]))
    data = REAL_FILES[kind](im)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(load_image(data)), expected)


@pytest.mark.parametrize("fmt,kw", [("GIF", {}), ("WEBP", {"lossless": True}), ("WEBP", {"quality": 80}),
                                    ("BMP", {}), ("PNG", {})])
@pytest.mark.parametrize("size", [(1, 1), (45, 31)])
def test_other_formats_still_load(fmt, kw, size):
    data = _encode(Image.fromarray(_noise(*size, seed=7)), fmt, **kw)
    assert load_image(data).size == size


# ---------------------------------------------------------------------------------------
# Finding 2: the cost of a caption
# ---------------------------------------------------------------------------------------

CAT = "\U0001F638"  # VADER reads it as "grinning cat face with smiling eyes": 6 words


def _vader(text: str) -> dict:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    scores = SentimentIntensityAnalyzer().polarity_scores(text)
    return {k: scores[k] for k in ("compound", "pos", "neu", "neg")}


def test_sentiment_scores_at_most_the_word_cap():
    # 60 happy emoji expand to 360 words, then 300 "awful": uncapped VADER reads both
    # (9 s for 2,200 emoji); capped, it reads the first 256 words, all of them happy.
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    caption = CAT * 60 + " awful" * 300
    assert len(caption) <= 2_200
    expanded = " ".join([SentimentIntensityAnalyzer().emojis[CAT]] * 60).split()
    assert len(expanded) > SENTIMENT_MAX_WORDS
    assert sentiment(caption) == _vader(" ".join(expanded[:SENTIMENT_MAX_WORDS]))
    assert sentiment(caption)["compound"] > 0 > _vader(caption)["compound"]


def test_sentiment_and_cleaning_read_at_most_max_input_chars():
    tail = " awful awful hello"
    caption = "good " + "x" * (MAX_INPUT_CHARS - 5) + tail
    assert sentiment(caption) == sentiment(caption[:MAX_INPUT_CHARS])
    assert sentiment(caption)["compound"] > 0 > _vader(caption)["compound"]
    url = "see https://example.com/" + "a" * MAX_INPUT_CHARS + " hello"
    assert clean_text(url) == clean_text(url[:MAX_INPUT_CHARS]) == "see <url>"


@pytest.mark.parametrize("caption", [
    "I love this place so much, the view is GREAT!!! " * 10,  # ~500 characters of words
    "a b c d e f g h i j " * 25,  # 250 one-letter words in 500 characters
    ("so happy \U0001F60D with friends \U0001F389 " * 17)[:500],  # words and emoji
])
def test_ordinary_captions_score_as_vader_scores_them(caption):
    assert len(caption) <= 500
    assert sentiment(caption) == _vader(caption)
