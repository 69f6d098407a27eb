"""The request side of the HTTP contract, built from one list of feature names.

``build_contract(feature_names, max_caption_chars, max_posts)`` makes the four request
models with ``pydantic.create_model``:

| model       | path                       | body                                          |
|-------------|----------------------------|-----------------------------------------------|
| `PostForm`  | `POST /predict`            | multipart: `image` file, `text`, features     |
| `PostJSON`  | `POST /predict/json`       | JSON: `image_base64`, `text`, features        |
| `BatchForm` | `POST /predict/batch`      | multipart: image_0, text_0, ..., image_1, ... |
| `BatchJSON` | `POST /predict/batch/json` | JSON: `{"posts": [PostJSON, ...]}`            |

FastAPI validates requests with them and derives the OpenAPI document from them, so the
two cannot drift. Each feature column becomes a field of every model
(a form field or a JSON key of that name; `<name>_i` for post i of a multipart batch),
required, with an empty value (or JSON null) for "unknown". ``Contract.read_post`` is the
one function that turns a validated post into a ``RawPost``, the typed input of
``Predictor.prepare``.

``build_variants_contract(feature_names, datetime_names, max_caption_chars)`` makes those of
/predict/variants: `VariantsForm` (multipart: `image`, repeated `captions`, features) and
`VariantsJSON`; with a timestamp column, a `TimeGrid` too (`grid_start`, `grid_days`,
`grid_hours` in multipart). ``VariantsContract.read`` turns one into a ``RawVariants``.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Annotated, Any, Sequence

from fastapi import Request, UploadFile
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictFloat, StrictInt, StrictStr,
                      WithJsonSchema, create_model)
from pydantic_core import PydanticCustomError

from serving.errors import APIError
from serving.schemas import EXAMPLE_CAPTION, EXAMPLE_IMAGE_BASE64

FIXED_FIELDS = ("image", "image_base64", "text")  # a feature column may not take these names


@dataclass(frozen=True)
class RawPost:
    """One post as the client sent it."""

    image: bytes  # the image file's bytes, not decoded yet
    caption: str  # the raw caption; cleaning and sentiment happen in prepare
    features: dict[str, str | None] = field(default_factory=dict)  # feature column -> value as sent


# --- field types ------------------------------------------------------------------------


async def read_image_file(image: UploadFile) -> bytes:
    """An image file part's bytes; a 0-byte one breaks the document's minLength 1, so the request
    fails as a whole (422 empty_file), a batch's too."""
    data = await image.read()
    if not data:
        raise APIError(422, "empty_file", f"the image file {image.filename or '(no name)'!r} is empty (0 bytes)")
    return data


def _decode_base64(value: Any) -> bytes:
    """image_base64 -> bytes. A data URL prefix (data:image/png;base64,) and line breaks
    (``base64`` wraps at 76 columns) are accepted; anything else that is not base64 is not."""
    if not isinstance(value, str):
        raise PydanticCustomError("string_type", "Input should be a valid string")
    if value == "":  # the document's minLength 1: the request breaks the schema (a batch fails as a whole)
        raise PydanticCustomError("empty_file", "the image is empty (0 bytes)")
    data = value.strip()
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise PydanticCustomError("invalid_base64", "image_base64 is not valid base64: {error}",
                                  {"error": str(e)}) from None


def _finite(value: Any) -> Any:
    """A JSON feature value may not be NaN or Infinity. Python's json reads them (they are
    not JSON), and NaN is also pandas' mark of an empty cell, which preprocessing imputes:
    a client's NaN must be an error, not a silent imputation."""
    if isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError("invalid_feature", "{value} is not a number; send null for an unknown value",
                                  {"value": str(value)})
    return value


# A JSON feature value: a number or a string, null or "" for unknown; strict, so true/false
# are not numbers.
JSONFeature = Annotated[StrictInt | StrictFloat | StrictStr | None, AfterValidator(_finite)]

# minLength 1: an empty image is refused (422 empty_file), and the document says so.
Base64Image = Annotated[bytes, BeforeValidator(_decode_base64), WithJsonSchema(
    {"type": "string", "format": "byte", "minLength": 1,
     "description": "the image file's bytes (JPEG, PNG, WEBP, BMP or GIF), base64; a 'data:image/...;base64,' "
                    "prefix is accepted"})]
ImageFile = Annotated[UploadFile, WithJsonSchema(
    {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream", "minLength": 1,
     "description": "an image file: JPEG, PNG, WEBP, BMP or GIF"})]


def _caption(max_chars: int, **kw) -> Any:
    return Field(max_length=max_chars, description=f"the raw caption as posted, at most {max_chars} characters "
                                                   "(MAX_CAPTION_CHARS); may be empty (an image-only post)", **kw)


def _form_fields_required(*names: str):
    """json_schema_extra that marks form fields required although their models give them defaults.

    FastAPI reads an empty form value as absent, so PostForm defaults text and the feature
    fields to "" and check_post_form tells `text=` (an image-only post) or `platform=` (a
    missing value) from a field not sent at all. The fields are required all the same, and
    the document says so.
    """
    def extra(schema: dict) -> None:
        schema["required"] = sorted({*schema.get("required", ()), *names})
        for name in names:
            schema["properties"][name].pop("default", None)

    return extra


_EXAMPLE = {"image_base64": EXAMPLE_IMAGE_BASE64, "text": EXAMPLE_CAPTION}


class _PostFormBase(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _with_required(base: type[BaseModel], *names: str) -> type[BaseModel]:
    """``base`` with these defaulted form fields marked required in the document."""
    config = ConfigDict(**base.model_config, json_schema_extra=_form_fields_required(*names))
    return type(base.__name__, (base,), {"model_config": config, "__module__": __name__})


class _PostJSONBase(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _BatchJSONBase(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _with_examples(base: type[BaseModel], *examples: dict) -> type[BaseModel]:
    """``base`` with these documented examples: each holds every field the model requires (the
    feature columns as "", unknown), so each works as sent (tests/test_schemathesis.py)."""
    config = ConfigDict(**base.model_config, json_schema_extra={"examples": list(examples)})
    return type(base.__name__, (base,), {"model_config": config, "__module__": __name__})


class _BatchFormBase(BaseModel):
    model_config = ConfigDict(extra="forbid")


def post_field(name: str, i: int) -> str:
    """A multipart batch's field ``name`` of post ``i``: image_0, text_0, followers_0, image_1, ..."""
    return f"{name}_{i}"


def _numbered_posts(fields: Sequence[str], max_posts: int):
    """json_schema_extra of the multipart batch: post 0's fields required; a post's fields come all
    together, and post i only after post i - 1 (``dependentRequired``), no defaults, no null. The
    pairing that repeated fields left to words, in terms JSON Schema states."""
    def extra(schema: dict) -> None:
        schema["required"] = [post_field(f, 0) for f in fields]
        schema["dependentRequired"] = {
            post_field(f, i): [post_field(g, i) for g in fields if g != f] + ([post_field("image", i - 1)] if i else [])
            for i in range(max_posts) for f in fields}
        for prop in schema["properties"].values():
            prop.pop("default", None)
            branches = [b for b in prop.pop("anyOf", []) if b.get("type") != "null"]
            prop.update(branches[0] if branches else {})

    return extra


# --- the contract -----------------------------------------------------------------------


@dataclass(frozen=True)
class Contract:
    """The request models of one app, and how a validated post becomes a RawPost."""

    feature_names: tuple[str, ...]
    max_caption_chars: int
    max_posts: int
    PostForm: type[BaseModel]
    PostJSON: type[BaseModel]
    BatchForm: type[BaseModel]
    BatchJSON: type[BaseModel]

    async def read_post(self, post: BaseModel) -> RawPost:
        """A validated PostForm or PostJSON -> RawPost (image bytes, raw caption, features)."""
        image = post.image_base64 if isinstance(post, self.PostJSON) else await read_image_file(post.image)
        # A JSON feature key not sent stays absent: prepare answers missing_feature. (Multipart paths
        # check that every feature field was sent before the body is read: check_features_sent.)
        sent = post.model_fields_set if isinstance(post, self.PostJSON) else self.feature_names
        return RawPost(image, post.text, {n: getattr(post, n) for n in self.feature_names if n in sent})

    def posts_of(self, batch: BaseModel) -> list[BaseModel]:
        """A validated BatchForm or BatchJSON -> its posts, in order, each a PostForm or PostJSON.
        (``check_batch_form`` made sure a multipart batch's posts are whole and numbered from 0.)"""
        if isinstance(batch, self.BatchJSON):
            return list(batch.posts)
        sent = [i for i in range(self.max_posts) if getattr(batch, post_field("image", i)) is not None]
        return [self.PostForm.model_construct(**{f: getattr(batch, post_field(f, i))
                                                 for f in ("image", "text", *self.feature_names)}) for i in sent]


def build_contract(feature_names: Sequence[str], max_caption_chars: int, max_posts: int) -> Contract:
    """The request models for these feature columns and limits (see the module docstring)."""
    names = tuple(feature_names)
    clash = set(names) & {*FIXED_FIELDS, "posts"}
    if clash:
        raise ValueError(f"feature columns {sorted(clash)} collide with the request's own fields")
    what = "; required, an empty value means 'unknown' (imputed as in training)"
    form_feature = {n: (str, Field("", description=f"the post's '{n}' feature column{what}")) for n in names}
    json_feature = {n: (JSONFeature, Field(description=f"the post's '{n}' feature column{what}")) for n in names}
    numbered = {}  # the multipart batch: post i's fields image_i, text_i, <feature>_i
    for i in range(max_posts):
        numbered[post_field("image", i)] = (ImageFile | None, Field(None, description=f"post {i}'s image file"))
        numbered[post_field("text", i)] = (str, _caption(max_caption_chars, default=""))
        numbered.update({post_field(n, i): (str, Field("", description=f"post {i}'s '{n}'{what}")) for n in names})
    clash = set(numbered) & set(names)
    if clash:
        raise ValueError(f"feature columns {sorted(clash)} collide with the batch's numbered fields")
    posts = dict(min_length=1, max_length=max_posts)
    example = {**_EXAMPLE, **dict.fromkeys(names, "")}  # "": unknown (FastAPI drops nulls from the document)
    post_form = create_model(
        "PostForm", __base__=_with_required(_PostFormBase, "text", *names),
        __doc__="One post as multipart/form-data (curl -F image=@photo.jpg -F text=...).",
        image=(ImageFile, Field(description="the image file")),
        text=(str, _caption(max_caption_chars, default="")), **form_feature)
    post_json = create_model(
        "PostJSON", __base__=_with_examples(_PostJSONBase, example),
        __doc__="One post as JSON; the image travels inline, never as a URL.",
        image_base64=(Base64Image, Field(examples=[EXAMPLE_IMAGE_BASE64])), text=(str, _caption(max_caption_chars)),
        **json_feature)
    batch_form = create_model(
        "BatchForm", __config__=ConfigDict(extra="forbid", json_schema_extra=_numbered_posts(
            ("image", "text", *names), max_posts)),
        __doc__=f"Several posts as multipart/form-data, numbered from 0: post i is image_i, text_i and each feature "
                f"column's <name>_i, all sent; 1 to {max_posts} posts (MAX_POSTS_PER_REQUEST).",
        **numbered)
    batch_json = create_model(
        "BatchJSON", __base__=_with_examples(_BatchJSONBase, {"posts": [example, {**example, "text": ""}]}),
        __doc__="Several posts as JSON; results come back in the same order.",
        posts=(list[post_json], Field(description=f"1 to {max_posts} posts (MAX_POSTS_PER_REQUEST)", **posts)))
    return Contract(names, max_caption_chars, max_posts, post_form, post_json, batch_form, batch_json)


# --- checks the models cannot make --------------------------------------------------------


def require_media_type(kind: str, other_path: str):
    """Dependency: 415 unless the body is ``kind`` ("multipart" or "json"); the detail
    names the path that takes the other kind."""

    async def check(request: Request) -> None:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        ok = media == "multipart/form-data" if kind == "multipart" else (
            media == "application/json" or media.endswith("+json"))
        if not ok:
            want = "multipart/form-data" if kind == "multipart" else "application/json"
            raise APIError(415, "unsupported_media_type",
                           f"Content-Type {media or '(none)'} is not accepted here: send {want}, or use "
                           f"{other_path} for {'JSON' if kind == 'multipart' else 'multipart/form-data'}")

    return check


async def check_post_form(request: Request) -> None:
    """Dependency of POST /predict: each field present once. The form model cannot check
    this itself: FastAPI drops empty values (``text=``) and keeps only the last of repeats."""
    form = await request.form()  # already parsed by FastAPI; Starlette caches it
    for name, what in (("image", "the image file"), ("text", "the caption; send text= for an image-only post")):
        if name not in form:
            raise APIError(422, "missing_field", f"the multipart field '{name}' ({what}) is missing")
    await check_features_sent(request)
    repeated = sorted(name for name in set(form.keys()) if len(form.getlist(name)) > 1)
    if repeated:
        raise APIError(422, "too_many_fields", f"fields {repeated} are repeated: /predict takes one post; "
                                               "use /predict/batch for several")


_NUMBERED = re.compile(r"(?P<name>.+)_(?P<i>[0-9]+)")


async def check_batch_form(request: Request) -> None:
    """Dependency of POST /predict/batch: each post's fields all sent (an empty value is a value), the
    posts numbered 0, 1, ... without a gap, at most MAX_POSTS_PER_REQUEST, no field twice: what the
    document's dependentRequired says, checked on the raw form (FastAPI reads `text_1=` as absent)."""
    form = await request.form()  # cached by Starlette
    contract: Contract = request.app.state.contract
    fields = ("image", "text", *contract.feature_names)
    numbered = {(m["name"], int(m["i"])) for key in form.keys() if (m := _NUMBERED.fullmatch(key)) and
                m["name"] in fields}
    posts = sorted({i for _, i in numbered})
    if posts and posts[-1] >= contract.max_posts:
        raise APIError(413, "too_many_posts", f"post {posts[-1]}: at most {contract.max_posts} posts "
                                              "(MAX_POSTS_PER_REQUEST), numbered 0 to "
                                              f"{contract.max_posts - 1}")
    for i in range(posts[-1] + 1 if posts else 1):
        missing = [post_field(f, i) for f in fields if (f, i) not in numbered]
        if missing:
            raise APIError(422, "missing_field" if not posts else "unpaired_fields",
                           f"post {i} lacks {missing}: post i sends image_i, text_i and each feature column as "
                           "<name>_i (text_i= for an image-only post), and posts are numbered 0, 1, ... in order")
    repeated = sorted(key for key in set(form.keys()) if len(form.getlist(key)) > 1)
    if repeated:
        raise APIError(422, "too_many_fields", f"fields {repeated} are repeated: each post's fields are numbered")


async def check_features_sent(request: Request) -> None:
    """Dependency of the multipart paths: every feature column of the model was sent, if
    only empty (``-F platform=``, an unknown value). A client that forgot one gets 422
    missing_feature naming it, never a silent guess; FastAPI alone cannot tell the two
    apart, since it reads an empty form value as absent."""
    form = await request.form()  # cached by Starlette
    for name in request.app.state.contract.feature_names:
        if name not in form:
            raise APIError(422, "missing_feature", f"{name}: the feature field '{name}' is missing; send "
                                                   f"{name}= for an unknown value")


# --- variants: one image, several captions, maybe a week of posting times ------------------

MAX_VARIANTS = 5  # captions per /predict/variants request
MAX_GRID_DAYS = 7
_DAY_RE = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"


def _day(value: Any) -> date:
    """A grid's start day: exactly YYYY-MM-DD (``date.fromisoformat`` alone takes more forms)."""
    if type(value) is date:  # already read (a form's field becomes a TimeGrid's)
        return value
    if not isinstance(value, str) or not re.fullmatch(_DAY_RE, value):
        raise PydanticCustomError("invalid_day", "a day is written YYYY-MM-DD")
    try:
        return date.fromisoformat(value)
    except ValueError as e:
        raise PydanticCustomError("invalid_day", "not a calendar day: {error}", {"error": str(e)}) from None


Day = Annotated[date, BeforeValidator(_day), WithJsonSchema({"type": "string", "format": "date", "pattern": _DAY_RE})]
Hour = Annotated[StrictInt, Field(ge=0, le=23)]
GridDays = Annotated[StrictInt, Field(ge=1, le=MAX_GRID_DAYS)]
# Multipart carries every value as text: its grid numbers are read from their digits.
FormHour = Annotated[int, Field(ge=0, le=23)]
FormGridDays = Annotated[int, Field(ge=1, le=MAX_GRID_DAYS)]


class TimeGrid(BaseModel):
    """Posting times to score: every ``hours`` hour of ``days`` days from ``start``, local time in
    the timestamp column's zone."""

    model_config = ConfigDict(extra="forbid")

    start: Day = Field(description="the first day, YYYY-MM-DD")
    days: GridDays = Field(description=f"how many days, 1 to {MAX_GRID_DAYS}")
    hours: list[Hour] = Field(default_factory=lambda: list(range(24)), min_length=1, max_length=24,
                              description="hours of the day, 0 to 23 (default: all 24)")

    def times(self) -> list[tuple[int, int, str]]:
        """(day offset, hour, the timestamp column's value: ISO local time without an offset)."""
        return [(d, h, f"{self.start + timedelta(days=d):%Y-%m-%d}T{h:02d}:00") for d in range(self.days)
                for h in self.hours]


@dataclass(frozen=True)
class RawVariants:
    """One /predict/variants request as the client sent it."""

    image: bytes
    captions: tuple[str, ...]
    features: dict[str, str | None]  # feature column -> value as sent (the timestamp: the chosen time)
    grid: TimeGrid | None = None  # with it, the first timestamp column takes every time of the grid
    grid_column: str | None = None


@dataclass(frozen=True)
class VariantsContract:
    """The request models of /predict/variants and /predict/variants/json for one model."""

    feature_names: tuple[str, ...]
    datetime_names: tuple[str, ...]  # the timestamp columns; a grid exists only with one
    VariantsForm: type[BaseModel]
    VariantsJSON: type[BaseModel]

    async def read(self, req: BaseModel) -> RawVariants:
        """A validated VariantsForm or VariantsJSON -> RawVariants."""
        if isinstance(req, self.VariantsJSON):
            image, grid = req.image_base64, getattr(req, "grid", None)
        else:
            image = await read_image_file(req.image)
            start, days = getattr(req, "grid_start", None), getattr(req, "grid_days", None)
            grid = None if start is None else TimeGrid(start=start, days=days, **(
                {"hours": req.grid_hours} if req.grid_hours else {}))
        return RawVariants(image, tuple(req.captions), {n: getattr(req, n) for n in self.feature_names}, grid,
                           self.datetime_names[0] if grid is not None else None)


def _grid_form_fields() -> dict[str, Any]:
    """Multipart's grid: three plain fields (a form has no objects); sent together or not at all."""
    return {"grid_start": (Day | None, Field(None, description="the grid's first day, YYYY-MM-DD (with grid_days)")),
            "grid_days": (FormGridDays | None, Field(None, description=f"days in the grid, 1 to {MAX_GRID_DAYS}")),
            "grid_hours": (list[FormHour] | None, Field(None, description="hours of the day, repeated (default all 24)"))}


def _grid_together(schema: dict) -> None:
    """The form document: the grid's fields come together (grid_hours needs the other two), no null."""
    schema["dependentRequired"] = {"grid_start": ["grid_days"], "grid_days": ["grid_start"],
                                   "grid_hours": ["grid_start", "grid_days"]}
    for name in ("grid_start", "grid_days", "grid_hours"):
        prop = schema["properties"][name]
        prop.pop("default", None)
        branches = [b for b in prop.pop("anyOf", []) if b.get("type") != "null"]
        prop.update(branches[0] if branches else {})


def build_variants_contract(feature_names: Sequence[str], datetime_names: Sequence[str],
                            max_caption_chars: int) -> VariantsContract:
    """The variants request models for these feature columns (``datetime_names``: the timestamp
    ones among them, which add the grid)."""
    names, dt = tuple(feature_names), tuple(datetime_names)
    what = "; required, an empty value means 'unknown' (imputed as in training)"
    captions = (list[Annotated[str, _caption(max_caption_chars)]],
                Field(min_length=1, max_length=MAX_VARIANTS, description=f"1 to {MAX_VARIANTS} caption variants "
                                                                         "of the post, each scored with the image"))
    json_feature = {n: (JSONFeature, Field(description=f"the post's '{n}'{what}")) for n in names}
    grid_json = {"grid": (TimeGrid | None, Field(None, description=f"score every time of this grid in '{dt[0]}' "
                                                                   "instead of one"))} if dt else {}
    example = {"image_base64": EXAMPLE_IMAGE_BASE64, "captions": [EXAMPLE_CAPTION, "Golden hour, no filter"],
               **dict.fromkeys(names, "")}
    variants_json = create_model(
        "VariantsJSON", __config__=ConfigDict(extra="forbid", json_schema_extra={"examples": [example]}),
        __doc__="One image and its caption variants as JSON.",
        image_base64=(Base64Image, Field(examples=[EXAMPLE_IMAGE_BASE64])), captions=captions, **json_feature,
        **grid_json)
    form_feature = {n: (str, Field("", description=f"the post's '{n}'{what}")) for n in names}
    required = _form_fields_required("captions", *names)
    extra = (lambda schema: (required(schema), _grid_together(schema))) if dt else required
    variants_form = create_model(
        "VariantsForm", __config__=ConfigDict(extra="forbid", json_schema_extra=extra),
        __doc__="One image and its caption variants as multipart/form-data (repeat captions=...).",
        image=(ImageFile, Field(description="the image file")), captions=captions, **form_feature,
        **(_grid_form_fields() if dt else {}))
    return VariantsContract(names, dt, variants_form, variants_json)
