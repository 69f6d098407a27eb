"""Request and response schemas of the prediction API (they are also its OpenAPI docs).

Multipart requests are parsed by hand (the same path also takes JSON), so the multipart
schemas here exist for the OpenAPI document; JSON requests are validated with them.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

# --- requests -----------------------------------------------------------------------------


class PostJSON(BaseModel):
    """One post as JSON. The image travels inline as base64; the server never fetches URLs."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "example": {"image_base64": "/9j/4AAQSkZJRgABAQ...", "text": "Sunset at the beach! #travel"}})

    image_base64: str = Field(description="the image file's bytes (JPEG, PNG, WEBP, BMP or GIF), base64; "
                                          "a 'data:image/...;base64,' prefix is accepted")
    text: str = Field(description="the raw caption as posted; may be empty (image-only post)")


class BatchJSON(BaseModel):
    """Several posts as JSON; results come back in the same order."""

    model_config = ConfigDict(extra="forbid")

    # Documentation shape: the server validates each post on its own, so one bad post
    # gets an error entry while the others are still predicted.
    posts: list[PostJSON] = Field(min_length=1, description="posts, each validated on its own")


class PostMultipart(BaseModel):
    """One post as multipart/form-data (what ``curl -F image=@photo.jpg -F text=...`` sends)."""

    image: bytes = Field(json_schema_extra={"format": "binary"}, description="the image file")
    text: str = Field(description="the raw caption; may be empty")


class BatchMultipart(BaseModel):
    """Several posts as multipart/form-data: repeated ``image`` and ``text`` fields, paired by order."""

    image: list[bytes] = Field(json_schema_extra={"items": {"type": "string", "format": "binary"}},
                               description="image files, one per post")
    text: list[str] = Field(description="captions, one per image, in the same order")


# --- responses ----------------------------------------------------------------------------


class Sentiment(BaseModel):
    """VADER scores of the raw caption (``compound`` is the model's feature)."""

    compound: float = Field(ge=-1, le=1)
    pos: float
    neu: float
    neg: float


class ModelInfo(BaseModel):
    name: str = Field(description="the run the artifact came from (RUN_DIR's name)")
    version: str = Field(description="content hash of the artifact's config and head (12 hex)")


class Prediction(BaseModel):
    """The model's prediction for one post."""

    engagement: float = Field(description="predicted engagement in label units (likes)")
    score: float = Field(description="the same prediction on the model's scale (e.g. log1p(likes))")
    sentiment: Sentiment
    cleaned_text: str = Field(description="the caption after data_preprocessing.prepare.clean_text")
    model: ModelInfo


class BatchItem(Prediction):
    """A successful post of a batch."""

    index: int = Field(description="position of the post in the request")
    status: Literal[200] = 200


class ErrorBody(BaseModel):
    """Every error answer, and every failed post of a batch, has this shape."""

    status: int = Field(description="HTTP status code")
    reason: str = Field(description="stable machine-readable code, e.g. unsupported_format, too_many_pixels")
    detail: str | list = Field(description="human-readable explanation (a list of field errors for 422 "
                                           "validation_error)")


class PostError(ErrorBody):
    """A failed post of a batch; the other posts are unaffected."""

    index: int = Field(description="position of the post in the request")


class BatchResponse(BaseModel):
    results: list[Union[BatchItem, PostError]] = Field(description="one entry per post, in request order")
    model: ModelInfo


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    ready: bool
    model: ModelInfo | None = None


class Metadata(BaseModel):
    model: dict = Field(description="name, version, path, architecture, target transform, cleaning version, "
                                    "processor (image size, resize policy, max text length)")
    training: dict = Field(description="summary of the artifact config: metrics, git commit and the rest of "
                                       "what training recorded")
    settings: dict = Field(description="the limits and settings this server runs with")


# Models that only the hand-written request bodies reference; app.py adds them to the
# OpenAPI components so /docs shows both request shapes.
REQUEST_SCHEMAS = (PostJSON, BatchJSON, PostMultipart, BatchMultipart)
