"""The loaded model and the two steps around it: prepare a post exactly as preprocessing
does, and run a batch of prepared posts through the model.

``prepare`` and ``run_batch`` block (image decoding, the forward pass): the service calls
them from threads, never on the event loop.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from data_preprocessing.features import FeatureError
from data_preprocessing.posts import Post, parse_features, prepare_post
from data_preprocessing.prepare import ImageError, ImageHeader, clean_text, probe_image, sentiment
from serving.contract import RawPost
from serving.errors import APIError
from serving.middleware import log_safe
from serving.schemas import Interval, ModelInfo, Prediction, Sentiment

log = logging.getLogger(__name__)

# ImageError.reason -> HTTP status. A file that is no image at all (or not an allowed
# format) is the wrong media type; an image that is broken is unprocessable content.
IMAGE_ERROR_STATUS = {
    "empty_file": 422,
    "unsupported_format": 415,
    "corrupt": 422,
    "truncated": 422,
    "too_many_pixels": 413,
    "extreme_aspect_ratio": 422,
    "missing_path": 422,  # not reachable from bytes; mapped so no reason can become a 500
    "not_found": 422,
}


def get_model_loader() -> Callable[..., Any]:
    """Dependency: how the lifespan loads MODEL_DIR (``models.clip_regressor.load_model``),
    called as ``load(model_dir, runtime=RUNTIME)``.

    The seam tests override (``app.dependency_overrides[get_model_loader]``) to wrap the
    loaded model: tests/test_parity.py records the tensors the model is given, and the
    load tests make it slow or make it fail.
    """
    from models.clip_regressor import load_model

    return load_model


def model_info(loaded) -> ModelInfo:
    """name: the run directory's name; version: a hash of the artifact's config and head."""
    from models.clip_regressor import artifact_version

    path = Path(loaded.path).resolve()
    name = loaded.config.get("run_name") or (path.parent.name if path.name == "model" else path.name)
    return ModelInfo(name=str(name), version=str(loaded.config.get("version") or artifact_version(path)))


@contextmanager
def _as_api_errors():
    """A bad feature or image -> its APIError (422, or the image reason's status)."""
    try:
        yield
    except FeatureError as e:
        raise APIError(422, e.api_reason, e.message) from None
    except ImageError as e:
        raise APIError(IMAGE_ERROR_STATUS.get(e.reason, 422), e.reason, e.message) from None
    except Exception as e:  # noqa: BLE001 - a decoder failing on a damaged header is a bad image
        # (preprocess.prepare_record rejects these as "corrupt" too), not a server error.
        log.warning("image decoder raised %s: %s", type(e).__name__, log_safe(e))
        raise APIError(422, "corrupt", f"could not open image: {type(e).__name__}") from None


class Predictor:
    """The loaded model (``models.clip_regressor.LoadedModel``) and the steps around it."""

    def __init__(self, loaded, max_pixels: int):
        self.loaded = loaded
        self.max_pixels = max_pixels
        self.policy = loaded.resize_policy  # from the processor saved with the model
        self.info = model_info(loaded)
        # The artifact's own preparation config (MAX_PIXELS from the settings), and its
        # feature columns: the request models are built from the same list (serving.contract).
        self.prepare_config = dataclasses.replace(loaded.prepare, max_pixels=max_pixels)
        self.feature_names: tuple[str, ...] = tuple(loaded.prepare.features.names)

    def check(self, raw: RawPost) -> ImageHeader:
        """What can be known of a post before decoding it: its features parse, and its
        image's header (``prepare.probe_image``), whose size the decode admission counts.
        Raises the APIError that ``prepare`` would."""
        with _as_api_errors():
            parse_features(raw.features, self.prepare_config.features)
            return probe_image(raw.image, self.max_pixels, self.policy.shortest_edge)

    def prepare(self, raw: RawPost) -> Post:
        """Decode, pre-resize, clean and score one post with ``posts.prepare_post``, as
        preprocessing does. A feature the client did not send is absent from ``raw.features``."""
        with _as_api_errors():
            return prepare_post(raw.image, raw.caption, raw.features, self.prepare_config)

    def run_batch(self, posts: list[Post]) -> list[Prediction]:
        """Prepared posts -> one Prediction each, in order (in the batcher's inference thread)."""
        out = self.loaded.explain_batch(self.loaded.batcher(posts))
        return [self._prediction(p, out, i) for i, p in enumerate(posts)]

    def _prediction(self, post: Post, out, i: int) -> Prediction:
        """Post ``i`` of ``explain_batch``'s answer as the API's Prediction."""
        interval = None
        if out.intervals:  # the first level the artifact was calibrated for
            level, (low, high) = next(iter(out.intervals.items()))
            interval = Interval(level=float(level), low=float(low[i]), high=float(high[i]))
        contributions = (None if out.contributions is None
                         else {g: float(c) for g, c in zip(out.groups, out.contributions[i])})
        return Prediction(engagement=float(out.engagement[i]), score=float(out.score[i]),
                          sentiment=Sentiment(**post.sentiment_scores), cleaned_text=post.text, interval=interval,
                          contributions=contributions, reference_score=out.reference_score, model=self.info)

    def warm_up(self) -> None:
        """One tiny prediction at startup: a broken artifact fails here, not on the first user."""
        from PIL import Image

        edge = max(self.policy.shortest_edge, 1)
        image = Image.new("RGB", (edge, edge), (127, 127, 127))
        scores = sentiment("warm up")
        self.run_batch([Post(image, clean_text("warm up"), scores["compound"], dict.fromkeys(self.feature_names),
                             sentiment_scores=scores)])

    def describe(self) -> dict:
        """/metadata's model section."""
        cfg = self.loaded.config
        ip = self.loaded.batcher.processor.image_processor
        return {
            **self.info.model_dump(),
            "format": cfg.get("format"),
            "architecture": cfg.get("architecture"),
            "target_transform": cfg.get("target_transform"),
            "cleaning_version": cfg.get("cleaning_version"),
            "features": self.loaded.prepare.features.to_dict()["features"],
            # which runtime computes the embeddings (RUNTIME), and why: models.runtime.RuntimeInfo
            "runtime": dataclasses.asdict(self.loaded.runtime) if self.loaded.runtime else None,
            "processor": {"image_size": dict(getattr(ip, "crop_size", None) or ip.size),
                          "resize_policy": self.policy.as_dict(),
                          "max_text_length": self.loaded.batcher.max_length},
        }

    def training_summary(self) -> dict:
        """/metadata's training section: what training recorded besides the architecture."""
        skip = {"format", "architecture", "target_transform", "cleaning_version"}
        return {k: v for k, v in self.loaded.config.items() if k not in skip}
