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
from typing import TYPE_CHECKING, Any, Callable

from data_preprocessing.features import FeatureError
from data_preprocessing.posts import Post, caption_parts, parse_features, prepare_post
from data_preprocessing.prepare import ImageError, ImageHeader, clean_text, probe_image, sentiment
from serving.contract import RawPost, RawVariants, TimeGrid
from serving.errors import APIError
from serving.middleware import log_safe
from serving.schemas import (Best, Estimate, GridAnswer, GridCell, Interval, ModelInfo, Prediction, Sentiment, Variant,
                             VariantsResponse)

if TYPE_CHECKING:
    from models.embedding_cache import ImageEmbeddingCache

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


@dataclasses.dataclass
class PreparedVariants:
    """A /predict/variants request, prepared: what ``Predictor.run_variants`` takes."""

    captions: list[str]  # as sent
    posts: list[Post]  # one per caption: the same image, the request's features
    rows: list[dict]  # parsed feature rows: the request's own, then one per grid time
    times: list[tuple[int, int, str]]  # (day, hour, value) per grid time, in ``rows[1:]`` order
    grid: TimeGrid | None
    grid_column: str | None


def get_model_loader() -> Callable[..., Any]:
    """Dependency: how the lifespan loads MODEL_DIR (``models.artifact.load_model``),
    called as ``load(model_dir, runtime=RUNTIME)``.

    The seam tests override (``app.dependency_overrides[get_model_loader]``) to wrap the
    loaded model: tests/test_parity.py records the tensors the model is given, and the
    load tests make it slow or make it fail.
    """
    from models.artifact import load_model

    return load_model


def model_info(loaded) -> ModelInfo:
    """name: the run directory's name; version: a hash of the artifact's config and head."""
    from models.artifact import artifact_version

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
    """The loaded model (``models.artifact.LoadedModel``) and the steps around it."""

    def __init__(self, loaded, max_pixels: int, image_cache_size: int = 0,
                 observe_cache: Callable[[int, int], None] | None = None):
        self.loaded = loaded
        self.max_pixels = max_pixels
        self.policy = loaded.resize_policy  # from the processor saved with the model
        self.info = model_info(loaded)
        self.image_cache = self._cache_images(image_cache_size, observe_cache)
        # The artifact's own preparation config (MAX_PIXELS from the settings), and its
        # feature columns: the request models are built from the same list (serving.contract).
        self.prepare_config = dataclasses.replace(loaded.prepare, max_pixels=max_pixels)
        self.feature_names: tuple[str, ...] = tuple(loaded.prepare.features.names)
        self.feature_kinds: dict[str, str] = {c.name: c.kind for c in loaded.prepare.features.columns}

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

    def _cache_images(self, entries: int, observe) -> "ImageEmbeddingCache | None":
        """Route the model's image tower through an LRU cache of ``entries`` embeddings (IMAGE_CACHE_SIZE),
        where the embedder runs its towers apart (torch, bf16; not the ONNX graphs). Even at 0 entries a
        batch embeds each distinct image once."""
        from models.embedding_cache import CachingEmbedder, ImageEmbeddingCache, has_towers

        if not has_towers(getattr(self.loaded, "embedder", None)):
            return None
        cache = ImageEmbeddingCache(entries, self.info.version, observe)
        self.loaded.embedder = CachingEmbedder(self.loaded.embedder, cache)
        return cache

    def _features(self, raw: dict) -> dict:
        with _as_api_errors():
            return parse_features(raw, self.prepare_config.features)

    def prepare_variants(self, raw: RawVariants, first: Post) -> PreparedVariants:
        """``first``: the image and the first caption, prepared (``prepare``) once; then each other
        caption cleaned and scored, and the feature rows parsed: the request's own, then one per grid
        time (the timestamp column set to it)."""
        posts = [first]
        for caption in raw.captions[1:]:
            text, compound, scores = caption_parts(caption)
            posts.append(dataclasses.replace(first, text=text, sentiment=compound, sentiment_scores=scores))
        times = raw.grid.times() if raw.grid is not None else []
        rows = [first.features] + [self._features({**raw.features, raw.grid_column: t}) for _, _, t in times]
        return PreparedVariants(list(raw.captions), posts, rows, times, raw.grid, raw.grid_column)

    def run_variants(self, prepared: PreparedVariants) -> VariantsResponse:
        """Every caption at every time (``LoadedModel.explain_variants``) as the API's answer."""
        # With a grid, the best is among its times; without one, among the captions at the time sent.
        out = self.loaded.explain_variants(prepared.posts, prepared.rows, best_from=1 if prepared.times else 0)
        n = len(prepared.posts)
        variants = [self._prediction(p, e, 0) for p, e in zip(prepared.posts, out.explained)]
        ranking = sorted(range(n), key=lambda i: (-variants[i].score, i))
        rank = {i: r + 1 for r, i in enumerate(ranking)}
        (c, row), best = out.best, out.explained[-1]
        grid = None
        if prepared.grid is not None:
            est = [[self._estimate(out.grid, i * out.rows + j) for i in range(n)] for j in range(1, out.rows)]
            cells = [GridCell(day=d, hour=h, time=t, predictions=p) for (d, h, t), p in zip(prepared.times, est)]
            g = prepared.grid
            grid = GridAnswer(column=prepared.grid_column, start=g.start.isoformat(), days=g.days, hours=g.hours,
                              cells=cells)
        return VariantsResponse(
            variants=[Variant(index=i, caption=prepared.captions[i], rank=rank[i], **v.model_dump())
                      for i, v in enumerate(variants)],
            ranking=ranking, grid=grid, model=self.info,
            best=Best(index=c, time=prepared.times[row - 1][2] if row else None,
                      prediction=self._prediction(prepared.posts[c], best, 0)))

    @staticmethod
    def _interval(out, i: int) -> Interval | None:
        if not out.intervals:  # the first level the artifact was calibrated for
            return None
        level, (low, high) = next(iter(out.intervals.items()))
        return Interval(level=float(level), low=float(low[i]), high=float(high[i]))

    def _estimate(self, out, i: int) -> Estimate:
        return Estimate(engagement=float(out.engagement[i]), score=float(out.score[i]), interval=self._interval(out, i))

    def run_batch(self, posts: list[Post]) -> list[Prediction]:
        """Prepared posts -> one Prediction each, in order (in the batcher's inference thread)."""
        out = self.loaded.explain_batch(self.loaded.batcher(posts))
        return [self._prediction(p, out, i) for i, p in enumerate(posts)]

    def _prediction(self, post: Post, out, i: int) -> Prediction:
        """Post ``i`` of ``explain_batch``'s answer as the API's Prediction."""
        interval = self._interval(out, i)
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
