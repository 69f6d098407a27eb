"""The one owner of post preparation: caption cleaning, sentiment and image loading.

Preprocessing, the training Dataset and the server all import these functions, so a
caption or an image is prepared the same way at every stage. Nothing else in the repo
may re-implement a regex, a colour conversion or a resize.

Caption cleaning rules (``clean_text``), applied in this order. Bump
``CLEANING_VERSION`` whenever a rule changes: it is written into every artifact, and
training refuses data cleaned by another version.

| # | rule                         | example in               | example out        |
|---|------------------------------|--------------------------|--------------------|
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
"""

from __future__ import annotations

import html
import io
import os
import re
import unicodedata
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Union

import ftfy
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# ---------------------------------------------------------------------------------------
# Caption cleaning
# ---------------------------------------------------------------------------------------

CLEANING_VERSION = "1"
MAX_CHARS = 500  # captions past this are cut at a word boundary; CLIP sees 77 tokens anyway
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
    s = str(text)
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


def sentiment(raw_text: object) -> dict[str, float]:
    """VADER scores of the *raw* caption: ``{compound, pos, neu, neg}``.

    VADER reads capitals ("LOVE"), punctuation ("!!!") and emoji, all of which cleaning
    may touch, so it must see the caption as the user wrote it. ``compound`` in [-1, 1]
    is the model's sentiment feature; the others are kept for reports and the API.
    """
    if raw_text is None or (isinstance(raw_text, float) and np.isnan(raw_text)):
        raw_text = ""
    scores = _vader().polarity_scores(str(raw_text))
    return {k: float(scores[k]) for k in ("compound", "pos", "neu", "neg")}


# ---------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
# 40 MP covers any phone photo (a 108 MP sensor bins to 12 MP) and stops decompression
# bombs long before they allocate: a 40 MP RGB image is 120 MB decoded.
MAX_PIXELS = 40_000_000
ImageSource = Union[str, os.PathLike, bytes, BinaryIO]


class ImageError(ValueError):
    """An image that cannot be used. ``reason`` is a stable code for rejects.csv and HTTP."""

    REASONS = ("missing_path", "not_found", "empty_file", "unsupported_format", "corrupt",
               "truncated", "too_many_pixels")

    def __init__(self, reason: str, message: str):
        assert reason in self.REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def _open_source(source: ImageSource) -> BinaryIO:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError("empty_file", "the image is empty (0 bytes)")
        return io.BytesIO(bytes(source))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if str(source).strip() == "":
            raise ImageError("missing_path", "no image path given")
        if not path.is_file():
            raise ImageError("not_found", f"no such file: {path}")
        if path.stat().st_size == 0:
            raise ImageError("empty_file", f"the image is empty (0 bytes): {path}")
        return open(path, "rb")
    return source  # an open binary file object


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB, compositing transparency on white."""
    if im.mode == "P":
        # Palette images may carry transparency; go through RGBA so it is composited.
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit greyscale decodes as "I"/"I;16" with values 0..65535. PIL's own
        # convert("L") clips at 255, which turns a normal photo white, so scale instead.
        arr = np.asarray(im, dtype=np.float64)
        scale = 257.0 if (im.mode.startswith("I;16") or arr.max(initial=0) > 255) else 1.0
        arr = np.clip(np.rint(arr / scale), 0, 255).astype(np.uint8)
        im = Image.fromarray(arr, mode="L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX
    return im


def _decode_error(e: BaseException) -> ImageError:
    """Map a decoder exception to ``truncated`` (data ends early) or ``corrupt``."""
    msg = str(e) or type(e).__name__
    short = any(k in msg.lower() for k in ("truncated", "broken data stream", "unexpected end"))
    return ImageError("truncated" if short else "corrupt", f"could not decode image: {msg}")


def load_image(source: ImageSource, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode a post image into a fully loaded 8-bit RGB ``PIL.Image``.

    Accepts a path, raw bytes or a binary file object. Applies EXIF orientation, takes
    the first frame of an animation and composites transparency on white. Raises
    ``ImageError`` with a ``reason`` code for anything that is not a usable image in an
    allowed format, including truncated files and images over ``max_pixels``.
    """
    fh = _open_source(source)
    try:
        with warnings.catch_warnings():
            # Pillow warns (not raises) between MAX_IMAGE_PIXELS and 2x; our own cap
            # below is the policy, so silence the duplicate warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                im = Image.open(fh, formats=ALLOWED_FORMATS)
            except UnidentifiedImageError:
                raise ImageError("unsupported_format",
                                 f"not an image in an allowed format {ALLOWED_FORMATS}") from None
            except Image.DecompressionBombError as e:
                raise ImageError("too_many_pixels", str(e)) from None
            except (OSError, ValueError, SyntaxError) as e:
                # A header cut short ("Truncated File Read") or garbled before the size.
                raise _decode_error(e) from None
            # Check the header size *before* decoding, so a bomb never allocates.
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError("too_many_pixels",
                                 f"{w}x{h} = {w * h:,} pixels exceeds the cap of {max_pixels:,}")
            if w == 0 or h == 0:
                raise ImageError("corrupt", f"image has zero size {w}x{h}")
            try:
                im.seek(0)  # first frame of a GIF/WEBP animation
                im.load()
            except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
                raise _decode_error(e) from None
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    finally:
        if fh is not source:
            fh.close()


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


# --- provisional probe_image (h2); replaced by h1's at merge ---


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read without decoding its pixels."""

    width: int
    height: int
    format: str
    mode: str
    decode_bytes: int  # estimated peak bytes to decode and convert it to RGB


def probe_image(source: ImageSource) -> ImageHeader:
    """Read an image's header only (no pixel data); raises the ImageError codes of ``load_image``."""
    fh = _open_source(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                im = Image.open(fh, formats=ALLOWED_FORMATS)
            except UnidentifiedImageError:
                raise ImageError("unsupported_format",
                                 f"not an image in an allowed format {ALLOWED_FORMATS}") from None
            except Image.DecompressionBombError as e:
                raise ImageError("too_many_pixels", str(e)) from None
            except (OSError, ValueError, SyntaxError) as e:
                raise _decode_error(e) from None
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise ImageError("too_many_pixels", f"{w}x{h} = {w * h:,} pixels exceeds the cap of {MAX_PIXELS:,}")
        if w == 0 or h == 0:
            raise ImageError("corrupt", f"image has zero size {w}x{h}")
        bands = len(im.getbands())
        depth = 2 if im.mode.startswith("I;16") else 4 if im.mode in ("I", "F") else 1
        return ImageHeader(w, h, str(im.format), im.mode, w * h * (bands * depth + 3))
    finally:
        if fh is not source:
            fh.close()
