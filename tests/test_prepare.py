"""Tests for data_preprocessing/prepare.py: the cleaning golden table, raw-text sentiment,
image loading on real files of every awkward kind, and pre-resize parity with CLIP."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageFile

from data_preprocessing.prepare import (
    CLEANING_VERSION,
    MAX_CHARS,
    MAX_PIXELS,
    ImageError,
    ResizePolicy,
    clean_text,
    load_image,
    pre_resize,
    sentiment,
)

# ---------------------------------------------------------------------------------------
# Caption cleaning: the golden table (CLEANING_VERSION "2"). A change here is a change of
# cleaning rules: bump CLEANING_VERSION in prepare.py together with this table.
# ---------------------------------------------------------------------------------------

FAMILY = "\U0001F468\u200d\U0001F469\u200d\U0001F467"  # man ZWJ woman ZWJ girl: one glyph
GOLDEN = [
    # emoji, including ZWJ sequences and skin-tone modifiers, survive untouched
    ("family " + FAMILY + " time \U0001F60D\U0001F525", "family " + FAMILY + " time \U0001F60D\U0001F525"),
    ("\U0001F44D\U0001F3FD thumbs", "\U0001F44D\U0001F3FD thumbs"),
    ("WOW \U0001F60D!!", "WOW \U0001F60D!!"),  # case and punctuation are kept
    # HTML entities, also when escaped twice (unescaped to a fixed point)
    ("Tom &amp; Jerry &lt;3 &quot;hi&quot; &#39;x&#39;", "Tom & Jerry <3 \"hi\" 'x'"),
    ("Tom &amp;amp; Jerry &amp;lt;3", "Tom & Jerry <3"),
    ("a&nbsp;b", "a b"),
    # mojibake (UTF-8 read as Latin-1/cp1252), once and twice
    ("cafÃ© crÃ¨me", "café crème"),
    ("cafÃƒÂ©", "café"),
    # URLs
    ("see https://x.co/a?b=1 now", "see <url> now"),
    ("visit www.Example.com/path.", "visit <url>"),
    ("http://a.b and HTTPS://C.D/e", "<url> and <url>"),
    # mentions become @user; e-mail addresses are not mentions
    ("thanks @Bob_99!", "thanks @user!"),
    ("mail me at bob@example.com", "mail me at bob@example.com"),
    ("&#64;bob", "@user"),  # an escaped mention is still a mention
    ("@#bob", "@user"),  # hashtag rule first, so one pass reaches the fixed point
    ("#@bob", "#@user"),
    # hashtags keep their word; C# and issue#5 are not hashtags
    ("#TravelGoals #1 #café", "TravelGoals 1 café"),
    ("C# and issue#5", "C# and issue#5"),
    # whitespace, Unicode normalisation and control characters
    ("a \n\t b\r\n  c  ", "a b c"),
    ("   ", ""),
    ("e\u0301", "\u00e9"),  # NFC
    ("a\x00b\x07c", "abc"),
    ("Ich liebe M\u00fcnchen", "Ich liebe M\u00fcnchen"),
    # missing captions
    (None, ""),
    (float("nan"), ""),
    ("", ""),
    (12, "12"),
    # already clean text is a fixed point
    ("@user <url>", "@user <url>"),
]


def test_cleaning_version_is_pinned():
    # The golden table above was written for this version; bump both together.
    assert CLEANING_VERSION == "2"


@pytest.mark.parametrize("raw,expected", GOLDEN, ids=[repr(r)[:30] for r, _ in GOLDEN])
def test_clean_text_golden(raw, expected):
    out = clean_text(raw)
    assert out == expected
    assert clean_text(out) == out  # idempotent: preprocessed text survives re-cleaning


def test_clean_text_length_cap_cuts_at_a_word():
    out = clean_text("word " * 200)
    assert len(out) <= MAX_CHARS
    assert out.endswith("word") and " wor " not in out + " "
    long_tail = clean_text("ab " * 170 + "averyveryverylongwordthatcrossesthelimit")
    assert len(long_tail) <= MAX_CHARS and long_tail.endswith("ab")  # the cut word is dropped whole
    assert len(clean_text("x" * 600)) == MAX_CHARS  # no space: a hard cut


# ---------------------------------------------------------------------------------------
# Sentiment reads the raw caption
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["GREAT!!!", "I LOVE this \U0001F60D!!", "Tom &amp; Jerry are the worst :(",
                                 "meh", ""])
def test_sentiment_equals_vader_on_raw_text(raw):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    expected = SentimentIntensityAnalyzer().polarity_scores(raw)
    got = sentiment(raw)
    assert set(got) == {"compound", "pos", "neu", "neg"}
    assert all(type(v) is float for v in got.values())
    for k in got:
        assert got[k] == pytest.approx(expected[k], abs=0)


def test_sentiment_differs_from_cleaned_lowercased_text():
    # VADER boosts a SHOUTED word among lower-case ones: cleaned/lower-cased text loses that.
    for raw in ["This is GREAT!!!", "I LOVE this #sunset"]:
        assert sentiment(raw)["compound"] > sentiment(clean_text(raw).lower())["compound"]
    # and "!!!" adds to the score, so stripping punctuation would lose signal too
    assert sentiment("GREAT!!!")["compound"] > sentiment("great")["compound"]


def test_sentiment_of_missing_caption_is_neutral():
    assert sentiment(None)["compound"] == 0.0
    assert sentiment(float("nan"))["compound"] == 0.0


# ---------------------------------------------------------------------------------------
# Image loading on real files
# ---------------------------------------------------------------------------------------


def _noise(w, h, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _reason(source, **kw) -> str:
    with pytest.raises(ImageError) as e:
        load_image(source, **kw)
    assert e.value.reason in ImageError.REASONS
    return e.value.reason


def test_truncated_jpeg(tmp_path):
    full = tmp_path / "full.jpg"
    _noise(200, 200).save(full, quality=90)
    data = full.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    assert load_image(full).size == (200, 200)  # the intact file is fine
    assert _reason(cut) == "truncated"


def test_jpeg_truncated_in_header(tmp_path):
    full = tmp_path / "full.jpg"
    _noise(64, 64).save(full, quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[:100])  # Image.open itself fails: "Truncated File Read"
    assert _reason(cut) == "truncated"


def test_png_bomb_rejected_from_the_header_without_decoding(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(bomb)  # 100 MP of zeros: PNG stores it in ~12 kB
    assert bomb.stat().st_size < 100_000
    assert 10_000 * 10_000 > MAX_PIXELS

    def no_decode(self, *a, **k):
        raise AssertionError("load_image decoded a bomb")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    assert _reason(bomb) == "too_many_pixels"
    assert _reason(bomb.read_bytes()) == "too_many_pixels"


def test_max_pixels_is_a_parameter(tmp_path):
    p = tmp_path / "a.png"
    Image.new("RGB", (100, 100)).save(p)
    assert _reason(p, max_pixels=9_999) == "too_many_pixels"
    assert load_image(p, max_pixels=10_000).size == (100, 100)


def test_cmyk_jpeg_to_rgb_keeps_colours(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(p)  # pure red in CMYK
    assert Image.open(p).mode == "CMYK"
    im = load_image(p)
    assert im.mode == "RGB"
    r, g, b = im.getpixel((16, 16))
    assert r > 200 and g < 60 and b < 60


def test_16bit_png_mid_grey_is_not_white(tmp_path):
    p = tmp_path / "grey16.png"
    Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)).save(p)
    assert Image.open(p).mode.startswith("I")
    im = load_image(p)
    assert im.mode == "RGB"
    assert all(abs(c - 128) <= 1 for c in im.getpixel((8, 8)))


def test_transparent_rgba_png_composites_on_white(tmp_path):
    p = tmp_path / "rgba.png"
    im = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    im.putpixel((0, 0), (255, 0, 0, 255))  # one opaque red pixel
    im.save(p)
    out = load_image(p)
    assert out.mode == "RGB"
    assert out.getpixel((4, 4)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (255, 0, 0)


def test_la_png(tmp_path):
    p = tmp_path / "la.png"
    im = Image.new("LA", (8, 8), (0, 0))  # transparent black
    im.putpixel((0, 0), (0, 255))  # opaque black
    im.save(p)
    out = load_image(p)
    assert out.getpixel((4, 4)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (0, 0, 0)


def test_palette_png_with_transparency(tmp_path):
    p = tmp_path / "p.png"
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 0, 255] + [0, 255, 0] * 255)  # index 0 blue (transparent), 1 green
    im.putpixel((0, 0), 1)
    im.save(p, transparency=0)
    out = load_image(p)
    assert out.mode == "RGB"
    assert out.getpixel((4, 4)) == (255, 255, 255)  # transparent blue -> white, not blue
    assert out.getpixel((0, 0)) == (0, 255, 0)


def test_animated_gif_takes_first_frame(tmp_path):
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(p).n_frames == 3
    out = load_image(p)
    assert out.mode == "RGB"
    assert out.getpixel((8, 8)) == (255, 0, 0)


def test_exif_orientation_is_applied(tmp_path):
    p = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.new("RGB", (40, 20), (0, 0, 255)).save(p, exif=exif)
    assert Image.open(p).size == (40, 20)
    assert load_image(p).size == (20, 40)


def test_bad_files_get_reason_codes(tmp_path):
    text = tmp_path / "text.jpg"
    text.write_text("this is not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    tiff = tmp_path / "x.tif"
    Image.new("RGB", (8, 8)).save(tiff)
    assert Image.open(tiff).format == "TIFF"  # a real image, just not an allowed format
    assert _reason(text) == "unsupported_format"
    assert _reason(empty) == "empty_file"
    assert _reason(tmp_path / "nope.jpg") == "not_found"
    assert _reason(tiff) == "unsupported_format"
    assert _reason("") == "missing_path"
    assert _reason(b"") == "empty_file"


def test_corrupt_png_data(tmp_path):
    buf = io.BytesIO()
    _noise(64, 64).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[100:300] = np.random.default_rng(1).integers(0, 256, 200, dtype=np.uint8).tobytes()
    assert _reason(bytes(data)) in ("corrupt", "truncated")


def test_load_from_bytes_and_file_object(tmp_path):
    p = tmp_path / "a.jpg"
    _noise(30, 20).save(p, quality=95)
    from_path = np.asarray(load_image(p))
    from_bytes = np.asarray(load_image(p.read_bytes()))
    with open(p, "rb") as fh:
        from_file = np.asarray(load_image(fh))
    assert from_path.shape == (20, 30, 3)
    assert np.array_equal(from_path, from_bytes) and np.array_equal(from_path, from_file)


# ---------------------------------------------------------------------------------------
# Pre-resize parity with the CLIP image processor
# ---------------------------------------------------------------------------------------

# Pre-resizing uses the processor's own output-size function and resample filter, so the
# processor's resize of the pre-resized image is an identity and its pixel_values match
# the full-size image's bit for bit. Measured max |diff| on these sizes: 0.0.
PARITY_TOL = 0.0
PARITY_SIZES = [(640, 480), (480, 640), (1000, 250), (250, 1000), (333, 999), (225, 300), (224, 224),
                (300, 224), (1920, 1080), (200, 150)]


@pytest.fixture(scope="module")
def clip_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor()  # library defaults, no hub


def test_policy_from_processor(clip_processor):
    policy = ResizePolicy.from_image_processor(clip_processor)
    assert policy.shortest_edge == clip_processor.size["shortest_edge"]
    assert policy.resample == int(clip_processor.resample)
    assert policy == ResizePolicy()  # our defaults are the processor's defaults
    assert ResizePolicy().as_dict()["resample_name"] == "BICUBIC"


def test_pre_resize_never_upsizes():
    policy = ResizePolicy(shortest_edge=64)
    small = _noise(50, 80)
    assert pre_resize(small, policy) is small
    assert pre_resize(_noise(300, 100), policy).size == (192, 64)
    assert pre_resize(_noise(300, 100), ResizePolicy(shortest_edge=0)).size == (300, 100)


@pytest.mark.parametrize("w,h", PARITY_SIZES)
def test_pre_resize_matches_processor_on_full_size(w, h, clip_processor):
    policy = ResizePolicy.from_image_processor(clip_processor)
    im = _noise(w, h, seed=w * 7 + h)  # noise: the worst case for any resampling difference
    small = pre_resize(im, policy)
    assert min(small.size) == min(policy.shortest_edge, w, h)
    full_px = clip_processor(images=im, return_tensors="np")["pixel_values"]
    pre_px = clip_processor(images=small, return_tensors="np")["pixel_values"]
    crop = clip_processor.crop_size
    assert full_px.shape == pre_px.shape == (1, 3, crop["height"], crop["width"])
    diff = float(np.abs(full_px - pre_px).max())
    print(f"pre-resize parity {w}x{h} -> {small.size[0]}x{small.size[1]}: max |diff| = {diff}")
    assert math.isfinite(diff) and diff <= PARITY_TOL
