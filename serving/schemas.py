"""Response schemas of the prediction API, and the error body. The request models depend
on the model's feature columns and on settings, so ``serving.contract`` builds them."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, Field

# A real 8x8 PNG (sky over sand), so the documented examples work as sent:
# tests/test_serving.py posts every example of the OpenAPI document.
EXAMPLE_IMAGE_BASE64 = ("iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAG0lEQVR42mPUiDrBgA0wMeAApEswPuuxobUdAKqVAw"
                        "cKxepQAAAAAElFTkSuQmCC")
EXAMPLE_CAPTION = "Sunset at the beach! #travel"


class Sentiment(BaseModel):
    """VADER scores of the raw caption (``compound`` is the model's feature)."""

    compound: float = Field(ge=-1, le=1)
    pos: float
    neu: float
    neg: float


class ModelInfo(BaseModel):
    name: str = Field(description="the run the artifact came from (RUN_DIR's name)")
    version: str = Field(description="content hash of the artifact's config and head (12 hex)")


class Interval(BaseModel):
    """A split-conformal prediction interval in label units (see the README)."""

    level: float = Field(description="the nominal coverage, e.g. 0.8")
    low: float = Field(description="lower end, label units")
    high: float = Field(description="upper end, label units")


class Prediction(BaseModel):
    """The model's prediction for one post."""

    engagement: float = Field(description="predicted engagement in label units (likes)")
    score: float = Field(description="the same prediction on the model's scale (e.g. log1p(likes))")
    sentiment: Sentiment
    cleaned_text: str = Field(description="the caption after data_preprocessing.prepare.clean_text")
    interval: Interval | None = Field(None, description="how sure: the conformal interval at the artifact's level "
                                                        "(null for an artifact without a calibration)")
    contributions: dict[str, float] | None = Field(
        None, description="what drove it: exact Shapley values, on the model scale, of image, caption, sentiment "
                          "and each feature column against the train-mean reference; they sum to score - "
                          "reference_score (null for an artifact without a reference)")
    reference_score: float | None = Field(None, description="the prediction for the reference post (train means), "
                                                            "model scale")
    model: ModelInfo


class BatchItem(Prediction):
    """A successful post of a batch."""

    index: int = Field(description="position of the post in the request")
    status: Literal[200] = 200


class PostError(BaseModel):
    """A failed post of a batch (its image could not be used); the other posts are unaffected."""

    index: int = Field(description="position of the post in the request")
    status: int = Field(description="the HTTP status this post alone would have got")
    reason: str = Field(description="stable code, e.g. unsupported_format, too_many_pixels")
    detail: str = Field(description="human-readable explanation")


class BatchResponse(BaseModel):
    results: list[Union[BatchItem, PostError]] = Field(description="one entry per post, in request order")
    model: ModelInfo


class ErrorBody(BaseModel):
    """Every error answer has this shape."""

    status: int = Field(description="HTTP status code")
    reason: str = Field(description="stable machine-readable code, e.g. unsupported_format, too_many_pixels")
    detail: str | list = Field(description="human-readable explanation (a list of field errors for 422 "
                                           "validation_error)")
    request_id: str | None = Field(description="the X-Request-ID of this request; quote it when reporting a problem")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    ready: bool
    model: ModelInfo | None = None


class Metadata(BaseModel):
    model: dict = Field(description="name, version, architecture, target transform, cleaning version, "
                                    "processor (image size, resize policy, max text length), feature columns, "
                                    "runtime (which computes the embeddings, torch or onnx, and why)")
    training: dict = Field(description="summary of the artifact config: metrics, git commit and the rest of "
                                       "what training recorded")
    settings: dict = Field(description="the limits and settings this server runs with, and micro-batching "
                                       "counters")
