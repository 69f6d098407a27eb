"""A post, as one typed thing: what preprocessing stores, training batches and serving predicts.

- ``Post``: a *prepared* post, the model's input: the RGB image (pre-resized), the cleaned
  caption, the caption's VADER sentiment and the parsed extra feature values.
- ``Record``: a ``Post`` plus its label and its row in the posts table; what a record file
  holds, one per kept post.
- ``PrepareConfig``: how raw parts become a ``Post`` (resize policy, pixel cap, feature
  columns). It travels with the data (``meta.json["prepare"]``) and with the model (the
  artifact's ``config.json["prepare"]``), as open_clip's ``PreprocessCfg`` does, so serving
  prepares a post exactly as the training data was prepared.
- ``prepare_post``: raw image + raw caption + raw feature cells -> ``Post``. The only
  function that does it; preprocessing's workers and the server both call it.

On disk a record is a plain dict (``Record.to_dict``), so ``pickle.load`` reads record
files with no project code, and the restricted unpickler needs no class of ours. The keys
are spelled here and nowhere else::

    {"image": PIL.Image (RGB), "text": str, "sentiment": float, "label": float, "row": int,
     "features": {column: float | str | None}}      # "features" only when there are any

``RECORD_FORMAT_VERSION`` 2 added ``features``; version 1 records (no ``features``) load
as posts without features. ``records.check_record_format`` refuses any other version.

``Record.from_dict`` checks a dict before it trusts it (``Record.problems``): the image is
an RGB ``PIL.Image`` within the pixel cap and the aspect-ratio limit, ``text`` a str,
``sentiment`` and ``label`` finite real numbers, ``row`` an int, ``features`` a dict of
str -> float | str | None. A record file is input like any other.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

from PIL import Image

from data_preprocessing.features import FeatureError, FeatureSchema, FeatureSpec, Value
from data_preprocessing.prepare import (CLEANING_VERSION, MAX_PIXELS, ImageError, ImageSource, ResizePolicy,
                                        check_image_size, clean_text, load_image, pre_resize, sentiment)

RECORD_FORMAT_VERSION = 2
# The on-disk keys, once. Readers accept records without the optional ones.
_REQUIRED_KEYS = ("image", "text", "sentiment", "label", "row")
_FEATURES_KEY = "features"


@dataclass
class Post:
    """A prepared post: exactly what ``PostBatcher`` turns into model tensors."""

    image: Image.Image  # RGB, pre-resized with the processor's resize policy
    text: str  # clean_text(raw caption)
    sentiment: float  # VADER compound of the *raw* caption, in [-1, 1]
    features: dict[str, Value] = field(default_factory=dict)  # column -> parsed value (None = missing)
    # All four VADER scores, for the API's answer; not stored in records.
    sentiment_scores: dict[str, float] | None = field(default=None, compare=False, repr=False)


@dataclass(kw_only=True)
class Record(Post):
    """A post of the training data: a ``Post`` plus its label and its input row number."""

    label: float
    row: int

    def to_dict(self) -> dict[str, Any]:
        """The on-disk form: a plain dict (see the module docstring)."""
        d = {"image": self.image, "text": self.text, "sentiment": float(self.sentiment),
             "label": float(self.label), "row": int(self.row)}
        if self.features:
            d[_FEATURES_KEY] = dict(self.features)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], max_pixels: int = MAX_PIXELS) -> "Record":
        """The record an on-disk dict holds; ``ValueError`` says what is wrong with one that is not."""
        missing = [k for k in _REQUIRED_KEYS if k not in d]
        if missing:
            raise ValueError(f"not a record: keys {missing} missing (record format {RECORD_FORMAT_VERSION})")
        problems = cls.problems(d, max_pixels)
        if problems:
            raise ValueError(f"not a record: {'; '.join(problems)}")
        return cls(image=d["image"], text=d["text"], sentiment=d["sentiment"], label=d["label"], row=d["row"],
                   features=dict(d.get(_FEATURES_KEY) or {}))

    @staticmethod
    def problems(d: Any, max_pixels: int = MAX_PIXELS) -> list[str]:
        """What keeps ``d`` from being an on-disk record: its keys and the type of each value."""
        if not isinstance(d, dict):
            return [f"record is a {type(d).__name__}, not a dict"]
        missing = [k for k in _REQUIRED_KEYS if k not in d]
        if missing:
            return [f"record lacks keys {missing}"]
        extra = sorted(set(d) - set(_REQUIRED_KEYS) - {_FEATURES_KEY}, key=str)
        problems = [f"record has unknown keys {extra}"] if extra else []
        problems += _image_problems(d["image"], max_pixels)
        if not isinstance(d["text"], str):
            problems.append(f"text is a {type(d['text']).__name__}, not a str")
        for key in ("sentiment", "label"):
            if not _is_real(d[key]):
                problems.append(f"{key} is a {type(d[key]).__name__}, not a number")
            elif not math.isfinite(d[key]):
                problems.append(f"{key} is not finite")
        if not isinstance(d["row"], numbers.Integral) or isinstance(d["row"], bool):
            problems.append(f"row is a {type(d['row']).__name__}, not an int")
        return problems + _feature_problems(d.get(_FEATURES_KEY, {}))


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _image_problems(im: Any, max_pixels: int) -> list[str]:
    if not isinstance(im, Image.Image):
        return [f"image is a {type(im).__name__}, not a PIL.Image"]
    if im.mode != "RGB":
        return [f"image mode is {im.mode}, not RGB"]
    try:
        check_image_size(im.width, im.height, max_pixels)
    except ImageError as e:
        return [f"image {e}"]
    return []


def _feature_problems(features: Any) -> list[str]:
    if not isinstance(features, dict):
        return [f"features is a {type(features).__name__}, not a dict"]
    bad = [k for k, v in features.items()
           if not isinstance(k, str) or not (v is None or isinstance(v, str) or _is_real(v))]
    return [f"features hold values that are not float, str or None: {bad[:5]}"] if bad else []


@dataclass(frozen=True)
class PrepareConfig:
    """How raw parts become a ``Post``; saved with the data and with the model."""

    resize: ResizePolicy = field(default_factory=ResizePolicy)
    max_pixels: int = MAX_PIXELS
    features: FeatureSchema = field(default_factory=FeatureSchema)
    cleaning_version: str = CLEANING_VERSION

    def to_dict(self) -> dict:
        return {"resize": self.resize.as_dict(), "max_pixels": self.max_pixels,
                "features": self.features.to_dict(), "cleaning_version": self.cleaning_version}

    @classmethod
    def from_dict(cls, d: Mapping) -> "PrepareConfig":
        resize = ResizePolicy(int(d["resize"]["shortest_edge"]), int(d["resize"]["resample"]))
        return cls(resize, int(d["max_pixels"]), FeatureSchema.from_dict(d.get("features")),
                   str(d["cleaning_version"]))

    @classmethod
    def for_columns(cls, resize: ResizePolicy, max_pixels: int, columns) -> "PrepareConfig":
        """A config that can parse ``columns`` (not yet fitted: preprocessing fits on train)."""
        return cls(resize, max_pixels, FeatureSchema(tuple(FeatureSpec(c) for c in columns)))


def parse_features(raw: Mapping[str, object], schema: FeatureSchema) -> dict[str, Value]:
    """Raw cells by column name -> parsed values; ``FeatureError`` names the first bad one.

    Every schema column must be present (an explicitly empty value means missing), and no
    other name may be: a client that forgot a field, or misspelt one, is told so.
    """
    unknown = sorted(set(raw) - set(schema.names))
    if unknown:
        raise FeatureError(unknown[0], f"unknown feature; this model takes {schema.names or 'no features'}",
                           reason="unknown_feature")
    out = {}
    for col in schema.columns:
        if col.name not in raw:
            raise FeatureError(col.name, "feature is missing; send an empty value for an unknown value",
                               reason="missing_feature")
        out[col.name] = col.parse(raw[col.name])
    return out


def prepare_post(image: ImageSource, raw_text: object, raw_features: Mapping[str, object],
                 cfg: PrepareConfig) -> Post:
    """Raw post parts -> a ``Post``, by ``cfg``. Raises ``FeatureError`` or ``prepare.ImageError``.

    Features are parsed first: they are cheap, and a bad cell should not cost a decode.
    """
    features = parse_features(raw_features, cfg.features)
    # The model's resize edge goes to load_image: a 2-pixel-high image is refused before
    # the processor would enlarge it to 224 rows of 224 * 10,000 pixels.
    im = pre_resize(load_image(image, max_pixels=cfg.max_pixels, min_edge=cfg.resize.shortest_edge), cfg.resize)
    if type(im) is not Image.Image:
        # Not resized, so still the decoded file's own object (a JpegImageFile...), whose
        # class the safe unpickler refuses: records hold a plain Image.
        im = im.copy()
    # EXIF/ICC/dpi are not used downstream, cost bytes, and may hold classes the safe
    # unpickler refuses (e.g. TIFF rationals), so a prepared image carries no info.
    im.info = {}
    text, compound, scores = caption_parts(raw_text)
    return Post(image=im, text=text, sentiment=compound, features=features, sentiment_scores=scores)


def caption_parts(raw_text: object) -> tuple[str, float, dict[str, float]]:
    """A raw caption -> (cleaned text, VADER compound, the four VADER scores), as a ``Post`` holds
    them; ``prepare_post`` and serving's caption variants of one image (``Predictor.prepare_variants``)."""
    scores = sentiment(raw_text)  # VADER reads the raw caption (capitals, emoji, "!!!")
    return clean_text(raw_text), scores["compound"], scores
