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


# --- /predict/variants ----------------------------------------------------------------------


class Variant(Prediction):
    """One caption with the image, at the time the request gave: what /predict answers for that post."""

    index: int = Field(description="position of the caption in the request")
    caption: str = Field(description="the caption as sent")
    rank: int = Field(description="1 for the highest prediction, then 2, ...; ties keep request order")


class Estimate(BaseModel):
    """A grid cell's prediction for one caption: as /predict's, without contributions."""

    engagement: float = Field(description="predicted engagement in label units (likes)")
    score: float = Field(description="the same on the model's scale")
    interval: Interval | None = None


class GridCell(BaseModel):
    day: int = Field(description="days after the grid's start, 0 first")
    hour: int = Field(description="hour of the day, local time in the timestamp column's zone")
    time: str = Field(description="the value the timestamp column took (ISO local time, no offset)")
    predictions: list[Estimate] = Field(description="one per caption, in request order")


class GridAnswer(BaseModel):
    column: str = Field(description="the timestamp column the grid's times went into")
    start: str
    days: int
    hours: list[int]
    cells: list[GridCell] = Field(description="day by day, then hour by hour")


class Best(BaseModel):
    """The highest prediction of every caption x time combination, with its contributions."""

    index: int = Field(description="the caption's position in the request")
    time: str | None = Field(description="the grid time (null without a grid: the time the request gave)")
    prediction: Prediction


class VariantsResponse(BaseModel):
    variants: list[Variant] = Field(description="one per caption, in request order")
    ranking: list[int] = Field(description="caption positions, highest prediction first")
    best: Best
    grid: GridAnswer | None = Field(None, description="every caption at every grid time (null without a grid)")
    model: ModelInfo
