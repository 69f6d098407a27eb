"""The one owner of post preparation: caption cleaning, sentiment and image loading.

Preprocessing, the training Dataset and the server all import these functions, so a
caption or an image is prepared the same way at every stage. Nothing else in the repo
may re-implement a regex, a colour conversion or a resize.

Caption cleaning rules (``clean_text``), applied in this order. Bump
``CLEANING_VERSION`` whenever a rule changes: it is written into every artifact, and
training refuses data cleaned by another version.

| # | rule                         | example in               | example out        |
|---|------------------------------|--------------------------|--------------------|
| 0 | read ``MAX_INPUT_CHARS``     | 5,000 chars              | first 2,000 read   |
| 1 | repair mojibake (ftfy)       | ``cafÃ©``                | ``café``           |
| 2 | unescape HTML (fixed point)  | ``Tom &amp;amp; Jerry``  | ``Tom & Jerry``    |
| 3 | Unicode NFC, drop controls   | ``e\\u0301``, ``\\x00``  | ``é``, (removed)   |
| 4 | URLs -> ``URL_TOKEN``        | ``see https://x.co/a``   | ``see <url>``      |
| 5 | hashtags -> their word       | ``#TravelGoals``         | ``TravelGoals``    |
| 6 | @mentions -> ``@user``       | ``thanks @Bob_99!``      | ``thanks @user!``  |
| 7 | emoji, case, punctuation kept| ``WOW 😍!!``             | ``WOW 😍!!``       |
| 8 | collapse whitespace, strip   | ``a \\n\\t b``           | ``a b``            |
| 9 | cap at ``MAX_CHARS`` (word)  | 600 chars                | <= 500 chars       |

Case and emoji are kept because CLIP's tokenizer lower-cases by itself and has emoji
in its byte-level vocabulary; punctuation is kept because "!!!" carries signal.

A caption's cost is bounded, in preprocessing and serving alike (both call these):

| limit                   | value        | what it bounds                                   |
|-------------------------|--------------|--------------------------------------------------|
| ``MAX_INPUT_CHARS``     | 2,000 chars  | what ``clean_text`` and ``sentiment`` read       |
| ``SENTIMENT_MAX_WORDS`` | 256 words    | what VADER scores, after it expands each emoji   |

VADER's cost grows with words x sentiment words, and each emoji expands to several
words: ``sentiment("\U0001F638" * 2200)`` took 9 s. With both caps the worst caption
within the server's 2,200 characters found (2,200 of those emoji) prepares in about
13 ms; a caption of under 500 characters of words scores as it always did.

Images (``load_image``; ``probe_image`` runs the header checks alone):

| check, in this order                    | limit                                  | reason                 |
|-----------------------------------------|----------------------------------------|------------------------|
| pixels in the file (header)             | ``max_pixels`` (``MAX_PIXELS``, 40 MP) | ``too_many_pixels``    |
| long side / short side (header)         | ``MAX_ASPECT_RATIO`` (20)              | ``extreme_aspect_ratio``|
| pixels after the model's resize (header)| shortest edge ``min_edge`` -> cap      | ``too_many_pixels``    |
| JPEG coding (header)                    | Huffman; arithmetic coding refused     | ``unsupported_format`` |
| JPEG data for its size                  | >= 1 bit per 8x8 block of every plane  | ``truncated``          |
| PNG pixel data                          | inflates to every row of every pass    | ``truncated``          |
| JPEG pixel data                         | see below                              | ``truncated``          |

The processor enlarges a short side to its shortest edge, so a 208-byte 20000x2 PNG
once became a 224 x 2,240,000 image (5 GB); both header rules refuse it in well under a
millisecond. Pillow itself cannot tell a short image from a complete one once a stream
*ends cleanly*: its PNG decoder stops without error at the end of a zlib stream that
holds 10 of 100 rows, and libjpeg, on meeting a marker inside the entropy-coded data,
fills the rest with grey and only warns (Pillow drops libjpeg's warnings). So:

- PNG: the IDAT stream is inflated once in 1 MiB steps, counting bytes, before Pillow
  decodes: it must give every row (with its filter byte) of every Adam7 pass.
- JPEG, from the header: every 8x8 block of every component codes at least one Huffman
  bit (the DC difference of a baseline or progressive DC scan), so a JPEG with fewer
  entropy-coded bits than blocks cannot hold its image: a 633-byte file declaring
  6000x6600 is refused without decoding (it cost a 240 MB grey fill). Arithmetic-coded
  JPEGs (no such bound; browsers do not show them either) are ``unsupported_format``.
- JPEG with one scan (baseline, the usual case): decoded with everything after its
  scan data replaced by 64 zero bytes, no marker. A complete scan decodes exactly as
  before (Pillow finishes once every row is out); a scan cut short runs out of data
  and Pillow reports it truncated, whatever marker had followed the cut.
- JPEG with several scans (progressive): the scan headers must bring every coefficient
  of every component to full precision, as complete progressive files do; a file cut
  and closed with an end marker lacks its last scans. A cut inside the final scan is
  not detected: every block then has its coefficients at all but the final bit.

16-bit images (``I;16*``, ``I``, ``F``) become 8-bit as ``round(v / 257)`` in integer
arithmetic on strips of a million pixels: a 40 MP 16-bit PNG costs its image, not the
gigabyte its float64 copy took. Transparency is composited on white by one paste.
"""

from __future__ import annotations

import html
import io
import os
import re
import struct
import unicodedata
import warnings
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Union

import ftfy
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from data_preprocessing.image_formats import JpegLayout, jpeg_layout, png_inflated_bytes, png_layout

# ---------------------------------------------------------------------------------------
# Caption cleaning
# ---------------------------------------------------------------------------------------

CLEANING_VERSION = "2"  # 2: captions are read up to MAX_INPUT_CHARS, VADER up to SENTIMENT_MAX_WORDS
MAX_CHARS = 500  # captions past this are cut at a word boundary; CLIP sees 77 tokens anyway
# clean_text and sentiment read at most this many characters of a caption (rule 0): 4x the
# cleaned length, so a caption shortened by cleaning (URLs, entities) still fills it.
MAX_INPUT_CHARS = 2_000
# VADER scores at most this many words, counted after it expands each emoji to its
# description ("\U0001F638" -> 5 words). Its cost grows with words x sentiment words (its
# negation, idiom and "but" checks re-read the word list), so an unbounded caption of
# 2,200 emoji took 9 s; 256 words take under 10 ms, and 500 characters of words are at
# most 250 words, so such captions score as they always did.
SENTIMENT_MAX_WORDS = 256
URL_TOKEN = "<url>"
MENTION_TOKEN = "@user"

_URL_RE = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
# A mention is @ plus a handle, not preceded by a word char (so e-mail addresses stay).
_MENTION_RE = re.compile(r"(?<![\w@])@\w+")
# A hashtag is # plus a word; "#1" style numbers are kept as "1" too. Public: the demo
# generator counts hashtags with the very same rule.
HASHTAG_RE = re.compile(r"(?<![\w#])#(\w+)")
_WS_RE = re.compile(r"\s+")


def clean_text(text: object) -> str:
    """Clean a raw caption by the rules in the module docstring. ``None``/NaN give ``""``."""
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return ""
    s = str(text)[:MAX_INPUT_CHARS]  # rule 0
    s = ftfy.fix_text(s, unescape_html=False)  # rule 1; HTML is handled explicitly below
    # Rule 2, to a fixed point: scraped captions are often escaped twice ("&amp;amp;"),
    # and a single pass would leave "&amp;", making cleaning non-idempotent.
    for _ in range(5):
        unescaped = html.unescape(s)
        if unescaped == s:
            break
        s = unescaped
    s = unicodedata.normalize("NFC", s)  # rule 3
    # Control characters (Cc) go; format characters (Cf) stay, because emoji ZWJ
    # sequences such as 👨‍👩‍👧 are built from U+200D.
    s = "".join(ch if unicodedata.category(ch) != "Cc" or ch in "\t\n\r" else " " for ch in s)
    s = _URL_RE.sub(URL_TOKEN, s)  # rule 4
    # Hashtags before mentions, so "@#bob" becomes "@bob" and then "@user" in one pass
    # (the other order leaves "@bob", and cleaning would not be idempotent).
    s = HASHTAG_RE.sub(r"\1", s)  # rule 5
    s = _MENTION_RE.sub(MENTION_TOKEN, s)  # rule 6
    s = _WS_RE.sub(" ", s).strip()  # rule 8
    if len(s) > MAX_CHARS:  # rule 9
        cut = s[:MAX_CHARS]
        s = cut.rsplit(" ", 1)[0] if " " in cut else cut
    return s


# ---------------------------------------------------------------------------------------
# Sentiment
# ---------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _vader():
    # Built lazily: loading the lexicon costs ~50 ms and nothing heavy happens at import.
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def _vader_text(raw: str) -> str:
    """The text VADER scores for ``raw``: its first ``MAX_INPUT_CHARS`` characters, each emoji
    replaced by its description exactly as ``polarity_scores`` does it, then cut to
    ``SENTIMENT_MAX_WORDS`` words. VADER finds no emoji left to expand, so below both
    caps it scores this text exactly as it scores ``raw``.
    """
    emojis = _vader().emojis
    parts, prev_space = [], True
    for ch in raw[:MAX_INPUT_CHARS]:
        if ch in emojis:
            if not prev_space:
                parts.append(" ")
            parts.append(emojis[ch])
            prev_space = False
        else:
            parts.append(ch)
            prev_space = ch == " "
    text = "".join(parts).strip()
    words = text.split()  # VADER's own word split
    return " ".join(words[:SENTIMENT_MAX_WORDS]) if len(words) > SENTIMENT_MAX_WORDS else text


def sentiment(raw_text: object) -> dict[str, float]:
    """VADER scores of the *raw* caption: ``{compound, pos, neu, neg}``.

    VADER reads capitals ("LOVE"), punctuation ("!!!") and emoji, all of which cleaning
    may touch, so it must see the caption as the user wrote it, up to the caps above
    (``_vader_text``). ``compound`` in [-1, 1] is the model's sentiment feature; the
    others are kept for reports and the API.
    """
    if raw_text is None or (isinstance(raw_text, float) and np.isnan(raw_text)):
        raw_text = ""
    scores = _vader().polarity_scores(_vader_text(str(raw_text)))
    return {k: float(scores[k]) for k in ("compound", "pos", "neu", "neg")}


# ---------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
# 40 MP covers any phone photo (a 108 MP sensor bins to 12 MP) and stops decompression
# bombs long before they allocate: a 40 MP RGB image is 160 MB decoded (Pillow keeps
# RGB at 4 bytes a pixel).
MAX_PIXELS = 40_000_000
# Long side / short side. 1:20 is generous for social posts (a 3-photo panorama is 1:3,
# a long infographic 1:10) and, with a shortest edge of 224, bounds the image the model's
# resize makes at 224 x 4480 = 1 MP, whatever the file's own size.
MAX_ASPECT_RATIO = 20
ImageSource = Union[str, os.PathLike, bytes, BinaryIO]

# Bytes Pillow holds per pixel of a decoded mode; every other mode (RGB, RGBA, CMYK,
# I, F, LA, ...) is stored at 4.
_DECODED_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# Bytes per pixel that converting a decoded mode to RGB holds besides the decoded image:
# the RGB result (4) by default, none for RGB, through RGBA (8) for a palette that may
# be transparent, the 8-bit step (1) and the result for 16-bit images.
_CONVERT_BYTES_PER_PIXEL = {"RGB": 0, "P": 8, "PA": 8, "RGBa": 8, "La": 8,
                            **{mode: 5 for mode in _SIXTEEN_BIT_MODES}}
_STRIP_PIXELS = 1 << 20  # 16-bit images are scaled to 8 bits this many pixels at a time
_STRIP_BYTES_PER_PIXEL = 16  # the most a strip's numpy temporaries take ("I": 4 + 4 + 4 + 4)
_WEBP_BYTES_PER_PIXEL = 12  # libwebp's RGBA canvas, the frame it hands Pillow, its reader
_DECODER_BYTES = 16 << 20  # decoder state and buffers, whatever the size (measured: 1-5 MiB)
# What a single-scan JPEG is decoded with in place of its end marker (module docstring):
# enough for libjpeg's bit-buffer look-ahead (57 bits) after the last block, no marker.
_JPEG_PADDING = bytes(64)


class ImageError(ValueError):
    """An image that cannot be used. ``reason`` is a stable code for rejects.csv and HTTP."""

    REASONS = ("missing_path", "not_found", "empty_file", "unsupported_format", "corrupt",
               "truncated", "too_many_pixels", "extreme_aspect_ratio")

    def __init__(self, reason: str, message: str):
        assert reason in self.REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, before any pixel is decoded (``probe_image``)."""

    width: int
    height: int
    format: str  # one of ALLOWED_FORMATS
    mode: str  # the mode Pillow decodes to: "RGB", "P", "I;16", "RGBA", ...
    decode_bytes: int  # estimated peak bytes to decode it and convert it to RGB


def check_image_size(width: int, height: int, max_pixels: int = MAX_PIXELS, min_edge: int = 0) -> None:
    """Raise ``ImageError`` unless a ``width`` x ``height`` image may be decoded and resized.

    ``min_edge`` is the shortest edge the model's processor resizes to (it enlarges a
    smaller side): the image that resize makes must fit ``max_pixels`` too. 0 when the
    edge is not known; the aspect-ratio limit then bounds that image.
    """
    if width <= 0 or height <= 0:
        raise ImageError("corrupt", f"image has zero size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError("too_many_pixels",
                         f"{width}x{height} = {width * height:,} pixels exceeds the cap of {max_pixels:,}")
    short, long = sorted((width, height))
    if long > MAX_ASPECT_RATIO * short:
        raise ImageError("extreme_aspect_ratio", f"{width}x{height} is more elongated than 1:{MAX_ASPECT_RATIO}")
    if 0 < short < min_edge:
        resized = min_edge * int(min_edge * long / short)  # the processor's shortest-edge resize
        if resized > max_pixels:
            raise ImageError("too_many_pixels", f"{width}x{height} resized to a shortest edge of {min_edge} "
                                                f"makes {resized:,} pixels, over the cap of {max_pixels:,}")


def _read_bytes(source: ImageSource) -> bytes:
    """The whole encoded image: the checks below read its structure before Pillow decodes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if str(source).strip() == "":
            raise ImageError("missing_path", "no image path given")
        if not path.is_file():
            raise ImageError("not_found", f"no such file: {path}")
        data = path.read_bytes()
    else:
        data = source.read()  # an open binary file object
    if len(data) == 0:
        raise ImageError("empty_file", "the image is empty (0 bytes)")
    return data


def _decode_error(e: BaseException) -> ImageError:
    """Map a decoder exception to ``truncated`` (data ends early) or ``corrupt``."""
    msg = str(e) or type(e).__name__
    short = any(k in msg.lower() for k in ("truncated", "broken data stream", "unexpected end"))
    return ImageError("truncated" if short else "corrupt", f"could not decode image: {msg}")


def _open(data: bytes) -> Image.Image:
    """Pillow's lazy open (header only), with its errors mapped to reason codes."""
    try:
        with warnings.catch_warnings():
            # Pillow warns (not raises) between MAX_IMAGE_PIXELS and 2x; our own cap is
            # the policy, so silence the duplicate warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise ImageError("unsupported_format", f"not an image in an allowed format {ALLOWED_FORMATS}") from None
    except Image.DecompressionBombError as e:
        raise ImageError("too_many_pixels", str(e)) from None
    except (OSError, ValueError, SyntaxError, struct.error) as e:
        # A header cut short ("Truncated File Read") or garbled before the size.
        raise _decode_error(e) from None


def _decode_bytes(width: int, height: int, fmt: str, mode: str) -> int:
    """An upper bound of the bytes ``load_image`` adds at its peak (measured in
    tests/test_prepare_hostile.py): the decoded image, plus the largest of what comes
    next: an EXIF rotation's copy of it, the conversion to RGB, or (WEBP) libwebp's
    buffers; plus a 16-bit strip's temporaries and the decoder's own buffers. 40 MP
    measured / estimated, MiB: RGB JPEG 154 / 321 (306 when EXIF rotates it), RGBA PNG
    306 / 321, 16-bit PNG 274 / 299, lossless WEBP 613 / 626.
    """
    pixels = width * height
    decoded = _DECODED_BYTES_PER_PIXEL.get(mode, 4)
    after = max(decoded, _CONVERT_BYTES_PER_PIXEL.get(mode, 4), _WEBP_BYTES_PER_PIXEL if fmt == "WEBP" else 0)
    strips = _STRIP_BYTES_PER_PIXEL * min(pixels, _STRIP_PIXELS) if mode in _SIXTEEN_BIT_MODES else 0
    return pixels * (decoded + after) + strips + _DECODER_BYTES


def _check_jpeg_header(data: bytes) -> JpegLayout:
    """The JPEG's layout, refused when it cannot hold the pixels it declares."""
    try:
        layout = jpeg_layout(data)
    except (ValueError, IndexError, struct.error) as e:
        raise ImageError("truncated", f"JPEG structure ends early: {e}") from None
    if layout is None:
        raise ImageError("corrupt", "JPEG has no frame or no scan header")
    if layout.arithmetic:
        raise ImageError("unsupported_format", "arithmetic-coded JPEG (only Huffman-coded JPEG is accepted)")
    blocks = layout.blocks()
    if layout.entropy_bytes * 8 < blocks:  # a Huffman code is at least 1 bit per block
        raise ImageError("truncated", f"JPEG declares {layout.width}x{layout.height} ({blocks:,} 8x8 blocks) "
                                      f"but holds {layout.entropy_bytes:,} bytes of pixel data, under 1 bit a block")
    return layout


def _probe(data: bytes, max_pixels: int, min_edge: int) -> tuple[ImageHeader, Image.Image, JpegLayout | None]:
    im = _open(data)
    check_image_size(im.width, im.height, max_pixels, min_edge)
    layout = _check_jpeg_header(data) if im.format == "JPEG" else None
    header = ImageHeader(im.width, im.height, im.format, im.mode,
                         _decode_bytes(im.width, im.height, im.format, im.mode))
    return header, im, layout


def probe_image(source: ImageSource, max_pixels: int = MAX_PIXELS, min_edge: int = 0) -> ImageHeader:
    """Read an image's header, no pixels: its size, format, mode and the bytes decoding costs.

    Raises the ``ImageError`` that ``load_image`` would raise for the same header: an
    unsupported format, an empty file, a header cut short or garbled, too many pixels
    (also after the model's resize to ``min_edge``), an extreme aspect ratio, a JPEG
    with too little data for its declared size. Serving admits decodes by
    ``decode_bytes``; ``load_image`` runs the same checks first.
    """
    header, im, _ = _probe(_read_bytes(source), max_pixels, min_edge)
    im.close()
    return header


def _check_png_rows(data: bytes) -> None:
    """Refuse a PNG whose pixel data inflates to fewer bytes than its rows need."""
    layout = png_layout(data)
    if layout is None:
        return  # Pillow opened it, so it is a PNG; without an IHDR here it fails to decode
    needed = layout.raw_bytes()
    try:
        got = png_inflated_bytes(data, needed)
    except zlib.error as e:
        raise ImageError("corrupt", f"could not decode image: PNG pixel data: {e}") from None
    if got < needed:
        row_bytes = needed // max(1, layout.height)
        raise ImageError("truncated", f"PNG pixel data ends after {got:,} of {needed:,} bytes "
                                      f"(about row {got // max(1, row_bytes)} of {layout.height})")


def _jpeg_to_decode(data: bytes, im: Image.Image, layout: JpegLayout) -> Image.Image:
    """The image Pillow should decode for a JPEG: refused, or reopened without its end marker."""
    if len(layout.scans) > 1:  # progressive, or sequential with a scan per component
        missing = layout.missing_coefficients()
        if missing:
            raise ImageError("truncated", f"JPEG scans end before the image is complete ({missing[0]})")
        return im
    im.close()
    return _open(b"".join((memoryview(data)[:layout.first_scan_end], _JPEG_PADDING)))  # one copy


def _to_8bit(im: Image.Image) -> Image.Image:
    """A 16-bit ("I;16*"), 32-bit ("I") or float ("F") greyscale image as "L", strip by strip.

    Values are divided by 257 (65535 -> 255) and rounded, as ``round(v / 257)``; "I" and
    "F" images whose values stay within 0..255 are taken as they are. Pillow's own
    ``convert("L")`` clips at 255, which turns a normal photo white. Integer arithmetic
    on strips of ``_STRIP_PIXELS``: a 40 MP image costs its 40 MB result, not gigabytes.
    """
    width, height = im.size
    scale = 257 if im.mode.startswith("I;16") or im.getextrema()[1] > 255 else 1
    out = np.empty((height, width), dtype=np.uint8)
    rows = max(1, _STRIP_PIXELS // width)
    for top in range(0, height, rows):
        strip = np.asarray(im.crop((0, top, width, min(height, top + rows))))  # (rows, W)
        if im.mode == "F":  # float data stays float32: rint(v / scale)
            out[top:top + rows] = np.clip(np.rint(strip / np.float32(scale)), 0, 255)
        else:  # floor((v + 128) / 257) == round(v / 257) for integers: no ties
            v = (strip if strip.dtype == np.uint16 else np.clip(strip, 0, 65535)).astype(np.uint32)
            v += scale // 2
            v //= scale
            out[top:top + rows] = np.minimum(v, 255, out=v)
    return Image.fromarray(out)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB, compositing transparency on white."""
    if im.mode == "P":
        # Palette images may carry transparency; go through RGBA so it is composited.
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in _SIXTEEN_BIT_MODES:
        im = _to_8bit(im)
    if im.mode in ("PA", "RGBa", "La"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA"):
        # Paste the colours through their own alpha onto white: one RGB image, where
        # alpha_composite on a white RGBA background took three.
        out = Image.new("RGB", im.size, (255, 255, 255))
        out.paste(im, (0, 0), im)
        return out
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX
    return im


def load_image(source: ImageSource, max_pixels: int = MAX_PIXELS, min_edge: int = 0) -> Image.Image:
    """Decode a post image into a fully loaded 8-bit RGB ``PIL.Image``.

    Accepts a path, raw bytes or a binary file object. Runs ``probe_image``'s header
    checks (``min_edge``: the shortest edge the model resizes to), then the pixel-data
    checks of the module docstring, and only then decodes. Applies EXIF orientation,
    takes the first frame of an animation and composites transparency on white.
    Raises ``ImageError`` with a ``reason`` code for anything that is not a usable image.
    An RGB file comes back as the decoded file object itself (a ``PIL.ImageFile``
    subclass), not a copy: ``posts.prepare_post`` makes the plain image a record holds.
    """
    data = _read_bytes(source)
    header, im, jpeg = _probe(data, max_pixels, min_edge)
    if header.format == "PNG":
        _check_png_rows(data)
    if jpeg is not None:
        im = _jpeg_to_decode(data, im, jpeg)
    del data
    try:
        im.seek(0)  # first frame of a GIF/WEBP animation
        im.load()
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError) as e:
        raise _decode_error(e) from None
    ImageOps.exif_transpose(im, in_place=True)  # in place: no copy when there is no rotation
    return _to_rgb(im)


# Never silently accept truncated data: a half-grey photo is a silent label-noise bug.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class ResizePolicy:
    """How images are shrunk before pickling, taken from the CLIP image processor.

    ``shortest_edge`` and ``resample`` are the processor's own ``size`` and ``resample``.
    Pre-resizing with them, through the processor's own size function, produces exactly
    the image the processor's first step would make, so its resize then becomes an
    identity copy and the model sees bit-identical tensors (tests/test_prepare.py).
    ``shortest_edge=0`` keeps images at full size.
    """

    shortest_edge: int = 224
    resample: int = int(Image.Resampling.BICUBIC)

    @classmethod
    def from_image_processor(cls, image_processor) -> "ResizePolicy":
        size = image_processor.size
        edge = size["shortest_edge"] if "shortest_edge" in size else min(size["height"], size["width"])
        return cls(shortest_edge=int(edge), resample=int(image_processor.resample))

    def as_dict(self) -> dict:
        return {"shortest_edge": self.shortest_edge, "resample": self.resample,
                "resample_name": Image.Resampling(self.resample).name}


def pre_resize(im: Image.Image, policy: ResizePolicy) -> Image.Image:
    """Downsize ``im`` so its shortest edge is ``policy.shortest_edge`` (never upsizes)."""
    if policy.shortest_edge <= 0 or min(im.size) <= policy.shortest_edge:
        return im
    # The processor's own output-size function, so rounding matches it to the pixel.
    from transformers.image_transforms import get_resize_output_image_size

    arr_shape_probe = np.empty((im.height, im.width, 1), dtype=np.uint8)  # (H, W, C)
    new_h, new_w = get_resize_output_image_size(
        arr_shape_probe, size=policy.shortest_edge, default_to_square=False, input_data_format="channels_last"
    )
    return im.resize((new_w, new_h), resample=Image.Resampling(policy.resample))
