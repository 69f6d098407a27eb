"""FastAPI prediction service: image + caption -> predicted engagement.

    MODEL_DIR=runs/demo/model uvicorn serving.app:app --port 8000
    curl -F image=@photo.jpg -F 'text=Sunset at the beach! #travel' localhost:8000/predict

Request path of one post:

1. the body (size-capped by ``BodySizeLimitMiddleware``) is parsed by content type:
   multipart/form-data (``image`` file + ``text``) or JSON (``image_base64`` + ``text``);
2. in a worker thread, ``Predictor.prepare`` decodes the image with
   ``prepare.load_image``, pre-resizes it with the model's own resize policy and cleans
   the caption / scores its sentiment with ``prepare.clean_text``/``prepare.sentiment``:
   exactly the functions preprocessing used to build the training records;
3. the prepared post joins the ``MicroBatcher`` queue; batches go through the artifact's
   ``PostBatcher`` (the one processor call training's Collator also makes) and
   ``LoadedModel.predict_batch`` in the batcher's inference thread.

Settings come from ``serving.settings`` (environment variables). The model is loaded once,
in the lifespan. Every error is JSON ``{status, reason, detail}`` (``schemas.ErrorBody``).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import binascii
import hashlib
import http
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as `python serving/app.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from common.config import config_dict, field, parse_config, setup_logging
from data_preprocessing.posts import Post, prepare_post
from data_preprocessing.prepare import ImageError, clean_text, sentiment
from serving.batching import MicroBatcher, QueueFull
from serving.schemas import (
    REQUEST_SCHEMAS,
    BatchItem,
    BatchResponse,
    ErrorBody,
    Health,
    Metadata,
    ModelInfo,
    PostError,
    PostJSON,
    Prediction,
    Ready,
    Sentiment,
)
from serving.settings import ServingSettings, get_settings

log = logging.getLogger(__name__)

API_VERSION = "1"

# ImageError.reason -> HTTP status. A file that is no image at all (or not an allowed
# format) is the wrong media type; an image that is broken is unprocessable content.
IMAGE_ERROR_STATUS = {
    "empty_file": 422,
    "unsupported_format": 415,
    "corrupt": 422,
    "truncated": 422,
    "too_many_pixels": 413,
    "missing_path": 422,  # not reachable from bytes; mapped so no reason can become a 500
    "not_found": 422,
}
SSRF_DETAIL = ("image_url is not accepted: this server never fetches URLs sent by clients, because that would "
               "let anyone make it request internal addresses (SSRF). Download the image yourself and send its "
               "bytes, as image_base64 in JSON or as the multipart file field 'image'.")


class APIError(Exception):
    """An error answer: ``status``, a stable ``reason`` code and a human ``detail``."""

    def __init__(self, status: int, reason: str, detail: Any, headers: dict[str, str] | None = None):
        super().__init__(f"{status} {reason}: {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail
        self.headers = headers

    def body(self) -> dict:
        return {"status": self.status, "reason": self.reason, "detail": self.detail}


def _error_response(status: int, reason: str, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"status": status, "reason": reason, "detail": detail}, status_code=status, headers=headers)


# ---------------------------------------------------------------------------------------
# Request body size limit
# ---------------------------------------------------------------------------------------


class BodyTooLarge(Exception):
    def __init__(self, size: int, limit: int):
        super().__init__(f"request body exceeds {limit} bytes")
        self.size = size
        self.limit = limit


def _body_limit(scope: Scope) -> int:
    settings = getattr(scope["app"].state, "settings", None) if "app" in scope else None
    return (settings or _DEFAULT_SETTINGS).max_body_bytes


class BodySizeLimitMiddleware:
    """Pure ASGI middleware: 413 for bodies over MAX_BODY_BYTES, declared or streamed.

    Starlette reads bodies without a limit. A declared Content-Length over the limit is
    refused before a byte is read; otherwise (chunked uploads, or a client that lies)
    the bytes are counted as they stream and reading stops as soon as they pass it.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = _body_limit(scope)
        declared = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
        if declared is not None and declared > limit:
            await self._refuse(scope, receive, send, declared, limit)
            return

        received = 0
        response_started = False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(received, limit)
            return message

        async def tracking_send(message):
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as e:
            if response_started:  # cannot happen with our endpoints; never send two responses
                raise
            await self._refuse(scope, receive, send, e.size, limit, streamed=True)

    @staticmethod
    async def _refuse(scope, receive, send, size: int, limit: int, streamed: bool = False) -> None:
        what = f"more than {limit:,} bytes arrived" if streamed else f"Content-Length {size:,}"
        response = _error_response(413, "body_too_large",
                                   f"request body too large: {what}; the limit is {limit:,} bytes (MAX_BODY_BYTES)",
                                   headers={"Connection": "close"})
        await response(scope, receive, send)


# ---------------------------------------------------------------------------------------
# Model: prepare posts, run batches
# ---------------------------------------------------------------------------------------


def model_info(loaded) -> ModelInfo:
    """name: the run directory's name; version: a hash of the artifact's config and head."""
    path = Path(loaded.path).resolve()
    name = loaded.config.get("run_name") or (path.parent.name if path.name == "model" else path.name)
    digest = hashlib.sha256()
    for part in ("config.json", "head.safetensors"):
        f = path / part
        if f.is_file():
            digest.update(f.read_bytes())
    return ModelInfo(name=str(name), version=str(loaded.config.get("version") or digest.hexdigest()[:12]))


class Predictor:
    """The loaded model plus the steps around it. ``prepare`` and ``run_batch`` block: call
    them from threads (the endpoints do), never on the event loop."""

    def __init__(self, loaded, settings: ServingSettings):
        self.loaded = loaded
        self.settings = settings
        self.policy = loaded.resize_policy  # from the processor saved with the model
        # The artifact's own preparation config, with MAX_PIXELS from the settings.
        self.prepare_config = dataclasses.replace(loaded.prepare, max_pixels=settings.max_pixels)
        self.info = model_info(loaded)
        # Test hook: called with every batch's model tensors (in the inference thread)
        # before the forward pass. tests/test_parity.py captures them; overload tests sleep.
        self.on_batch: Callable[[dict], None] | None = None

    def prepare(self, image_bytes: bytes, raw_text: str) -> Post:
        """Decode, pre-resize, clean and score one post exactly as preprocessing does."""
        try:
            return prepare_post(image_bytes, raw_text, {}, self.prepare_config)
        except ImageError as e:
            raise APIError(IMAGE_ERROR_STATUS.get(e.reason, 422), e.reason, e.message) from None
        except Exception as e:  # noqa: BLE001 - a decoder failing on a damaged header is a bad image
            # (preprocess.prepare_record rejects these as "corrupt" too), not a server error.
            log.warning("image decoder raised %s: %s", type(e).__name__, e)
            raise APIError(422, "corrupt", f"could not open image: {type(e).__name__}") from None

    def run_batch(self, posts: list[Post]) -> list[tuple[float, float]]:
        """Prepared posts -> [(model-scale score, label-unit engagement)], one per post."""
        batch = self.loaded.batcher(posts)
        if self.on_batch is not None:
            self.on_batch(batch)
        score, engagement = self.loaded.predict_batch(batch)
        return list(zip(score.tolist(), engagement.tolist()))

    def prediction(self, post: Post, result: tuple[float, float]) -> dict:
        score, engagement = result
        return {"engagement": engagement, "score": score, "sentiment": Sentiment(**post.sentiment_scores),
                "cleaned_text": post.text, "model": self.info}

    def describe(self) -> dict:
        """/metadata's model section."""
        cfg = self.loaded.config
        ip = self.loaded.batcher.processor.image_processor
        return {
            **self.info.model_dump(),
            "path": str(self.loaded.path),
            "format": cfg.get("format"),
            "architecture": cfg.get("architecture"),
            "target_transform": cfg.get("target_transform"),
            "cleaning_version": cfg.get("cleaning_version"),
            "processor": {"image_size": dict(getattr(ip, "crop_size", None) or ip.size),
                          "resize_policy": self.policy.as_dict(),
                          "max_text_length": self.loaded.batcher.max_length},
        }

    def training_summary(self) -> dict:
        """/metadata's training section: what training recorded besides the architecture."""
        skip = {"format", "architecture", "target_transform", "cleaning_version"}
        return {k: v for k, v in self.loaded.config.items() if k not in skip}


@dataclass
class Service:
    """Everything the lifespan builds; lives on ``app.state.service`` while serving."""

    settings: ServingSettings
    predictor: Predictor
    batcher: MicroBatcher
    prep_pool: ThreadPoolExecutor  # decoding threads, separate from the one inference thread
    loaded_at: float

    async def prepare(self, image_bytes: bytes, raw_text: str) -> Post:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.prep_pool, self.predictor.prepare, image_bytes, raw_text)


def resolve_settings(app: FastAPI) -> ServingSettings:
    """The settings dependency as the app resolves it, overrides included."""
    provider = app.dependency_overrides.get(get_settings, get_settings)
    try:
        return provider()
    except ValidationError as e:
        raise RuntimeError(f"invalid serving settings (environment variables): {e}") from None


def _check_model_dir(settings: ServingSettings) -> Path:
    if settings.model_dir is None:
        raise RuntimeError("MODEL_DIR is not set: point it at a model artifact, e.g. "
                           "MODEL_DIR=runs/<run>/model uvicorn serving.app:app")
    model_dir = Path(settings.model_dir)
    if not model_dir.is_dir():
        raise RuntimeError(f"MODEL_DIR={model_dir} is not a directory (expected RUN_DIR/model written by "
                           "training/train_torch.py)")
    return model_dir


def _warm_up(predictor: Predictor) -> None:
    """One tiny prediction at startup: a broken artifact fails here, not on the first user."""
    from PIL import Image

    edge = max(predictor.policy.shortest_edge, 1)
    post = Post(Image.new("RGB", (edge, edge), (127, 127, 127)), clean_text("warm up"), sentiment("warm up")["compound"],
                dict.fromkeys(predictor.loaded.prepare.features.names))
    predictor.run_batch([post])


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Load settings and the model once; start the micro-batcher; stop it on shutdown."""
    if not logging.getLogger().handlers:
        # Under `uvicorn serving.app:app` the lifespan is this process's entry point, and
        # uvicorn configures only its own loggers; without this our startup log is lost.
        # Follow uvicorn's --log-level where it set one.
        setup_logging(logging.getLogger("uvicorn.error").level or logging.INFO)
    settings = resolve_settings(app)
    app.state.settings = settings
    model_dir = _check_model_dir(settings)
    import torch

    from models.clip_regressor import load_model

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    t0 = time.perf_counter()
    try:
        # In a thread: loading blocks for seconds, and the loop should stay responsive.
        loaded = await asyncio.to_thread(load_model, model_dir)
        predictor = Predictor(loaded, settings)
        await asyncio.to_thread(_warm_up, predictor)
    except Exception as e:  # noqa: BLE001 - any failure here means "this is not a usable model"
        raise RuntimeError(f"could not load the model from MODEL_DIR={model_dir}: {type(e).__name__}: {e}") from e
    batching = settings.micro_batching
    batcher = MicroBatcher(predictor.run_batch,
                           max_batch_size=settings.max_batch_size if batching else 1,
                           max_wait_s=settings.max_wait_ms / 1000.0 if batching else 0.0,
                           max_queue=settings.max_queue)
    await batcher.start()
    prep_pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1), thread_name_prefix="prepare")
    app.state.service = Service(settings, predictor, batcher, prep_pool, time.time())
    log.info("loaded model %s (version %s) from %s in %.1fs; torch threads %d; micro-batching %s "
             "(max batch %d, max wait %.1f ms, max queue %d)", predictor.info.name, predictor.info.version,
             model_dir, time.perf_counter() - t0, torch.get_num_threads(), "on" if batching else "off",
             batcher.max_batch_size, batcher.max_wait_s * 1000, batcher.max_queue)
    try:
        yield
    finally:
        app.state.service = None  # /ready turns 503 while draining
        await batcher.stop()
        prep_pool.shutdown(wait=False, cancel_futures=True)
        log.info("model unloaded")


def get_service(request: Request) -> Service:
    """Dependency: the loaded service, or 503 while the model is not loaded."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise APIError(503, "not_ready", "the model is not loaded (yet); retry shortly", {"Retry-After": "5"})
    return service


# ---------------------------------------------------------------------------------------
# Request parsing
# ---------------------------------------------------------------------------------------


def _body_kind(request: Request) -> str:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        return "multipart"
    if media_type == "application/json" or media_type.endswith("+json"):
        return "json"
    raise APIError(415, "unsupported_media_type",
                   f"Content-Type {media_type or '(none)'} is not accepted: send multipart/form-data "
                   "(fields image, text) or application/json")


async def _read_json(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, "invalid_json", f"the body is not valid JSON: {e}") from None


def _check_caption(text: str, settings: ServingSettings) -> None:
    if len(text) > settings.max_caption_chars:
        raise APIError(422, "caption_too_long",
                       f"caption has {len(text):,} characters; the limit is {settings.max_caption_chars:,} "
                       "(MAX_CAPTION_CHARS)")


def _post_from_json(obj: Any, settings: ServingSettings) -> tuple[bytes, str]:
    """A JSON post -> (image bytes, raw caption), or APIError."""
    if not isinstance(obj, dict):
        raise APIError(422, "invalid_post", "a post must be a JSON object {image_base64, text}")
    if "image_url" in obj:
        raise APIError(422, "image_url_not_supported", SSRF_DETAIL)
    try:
        post = PostJSON.model_validate(obj)
    except ValidationError as e:
        # type/loc/msg only: never echo the input back (a base64 image) or unserialisable ctx
        raise APIError(422, "validation_error",
                       [{k: err[k] for k in ("type", "loc", "msg")} for err in e.errors()]) from None
    _check_caption(post.text, settings)
    data = post.image_base64.strip()
    if data.startswith("data:") and "," in data:  # data URL: data:image/jpeg;base64,....
        data = data.split(",", 1)[1]
    try:
        image = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(422, "invalid_base64", f"image_base64 is not valid base64: {e}") from None
    return image, post.text


async def _post_from_form(image: Any, text: Any, settings: ServingSettings) -> tuple[bytes, str]:
    """One multipart (image, text) pair -> (image bytes, raw caption), or APIError."""
    if not isinstance(image, UploadFile):
        raise APIError(422, "image_not_a_file",
                       "the field 'image' must be a file upload (curl -F image=@photo.jpg), not a text value")
    if not isinstance(text, str):
        raise APIError(422, "text_not_a_string", "the field 'text' must be a text value, not a file")
    _check_caption(text, settings)
    return await image.read(), text


async def _read_form(request: Request):
    # Files spool to disk past 1 MB; the body limit bounds the total. Many-file limits are
    # left generous here because the post count is checked (with a clearer message) below.
    return await request.form(max_files=10_000, max_fields=10_000)


def _missing(name: str, what: str) -> APIError:
    return APIError(422, "missing_field", f"the multipart field '{name}' ({what}) is missing")


# ---------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------

_ERROR_RESPONSES = {
    code: {"model": ErrorBody, "description": desc}
    for code, desc in {
        400: "malformed body (invalid JSON or multipart)",
        413: "body, image (pixels) or batch too large",
        415: "unsupported Content-Type, or the file is not an image in an allowed format",
        422: "missing field, empty/corrupt/truncated image, caption too long, invalid base64, image_url sent",
        503: "model not loaded yet, or the queue is full (see Retry-After)",
        504: "no prediction within REQUEST_TIMEOUT_S",
        500: "unexpected server error (no details are leaked)",
    }.items()
}


def _request_body(multipart_model: str, json_model: str, description: str) -> dict:
    """OpenAPI requestBody for a path that takes either multipart or JSON."""
    return {"requestBody": {"required": True, "description": description, "content": {
        "multipart/form-data": {"schema": {"$ref": f"#/components/schemas/{multipart_model}"}},
        "application/json": {"schema": {"$ref": f"#/components/schemas/{json_model}"}},
    }}}


def _custom_openapi(app: FastAPI) -> Callable[[], dict]:
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            # The hand-parsed request bodies reference these; FastAPI only registers models
            # that appear in signatures, so add them (and their nested models) here.
            for model in REQUEST_SCHEMAS:
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, sub in js.pop("$defs", {}).items():
                    components.setdefault(name, sub)
                components[model.__name__] = js
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def create_app(settings: ServingSettings | None = None) -> FastAPI:
    """Build the app. ``settings`` overrides the environment (tests); the model loads in
    the lifespan, i.e. when a server (or ``with TestClient(app)``) starts, not here."""
    app = FastAPI(
        title="Engagement prediction",
        version=API_VERSION,
        description="Predict a social-media post's engagement (likes) from its image and caption "
                    "with a fine-tuned CLIP regressor. POST /predict takes multipart/form-data "
                    "(image file + text) or JSON (image_base64 + text); the server never fetches URLs.",
        lifespan=lifespan,
    )
    if settings is not None:
        app.dependency_overrides[get_settings] = lambda: settings
    app.add_middleware(BodySizeLimitMiddleware)
    app.openapi = _custom_openapi(app)

    # -- error handlers: every error is {status, reason, detail} --------------------------
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _error_response(exc.status, exc.reason, exc.detail, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        try:  # 404 -> not_found, 405 -> method_not_allowed, 400 -> bad_request (e.g. bad multipart)
            reason = http.HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
        except ValueError:
            reason = "http_error"
        return _error_response(exc.status_code, reason, exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in exc.errors()]
        return _error_response(422, "validation_error", errors)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):
        # The traceback goes to the log, never to the client.
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error_response(500, "internal_error", "internal server error; the details are in the server log")

    # -- probes ---------------------------------------------------------------------------
    @app.get("/health", response_model=Health, summary="Liveness: the process answers")
    async def health() -> Health:
        return Health()

    @app.get("/ready", response_model=Ready, summary="Readiness: 200 once the model is loaded, 503 before",
             responses={503: {"model": Ready, "description": "model not loaded"}})
    async def ready(request: Request):
        service = getattr(request.app.state, "service", None)
        if service is None:
            return JSONResponse(Ready(ready=False).model_dump(), status_code=503, headers={"Retry-After": "5"})
        return Ready(ready=True, model=service.predictor.info)

    @app.get("/metadata", response_model=Metadata, summary="Model config, training summary and server limits",
             responses={503: _ERROR_RESPONSES[503]})
    async def metadata(service: Service = Depends(get_service)) -> Metadata:
        return Metadata(model=service.predictor.describe(), training=service.predictor.training_summary(),
                        settings={**service.settings.limits(), "batching": service.batcher.stats()})

    # -- prediction -----------------------------------------------------------------------
    async def _predict_posts(service: Service, posts: list[tuple[bytes, str] | APIError]) -> list:
        """Prepare posts in threads, run the good ones through the batcher together.

        Returns, per post, a (PreparedPost, result) pair or its APIError. Overload (503)
        and the deadline (504) fail the whole request: a client retries all of it.
        """
        s = service.settings
        try:
            async with asyncio.timeout(s.request_timeout_s):
                async def prep(p):
                    if isinstance(p, APIError):
                        return p
                    try:
                        return await service.prepare(*p)
                    except APIError as e:
                        return e

                # Announced to the batcher, so a batch forming now waits for these posts.
                with service.batcher.incoming(sum(not isinstance(p, APIError) for p in posts)):
                    prepared = await asyncio.gather(*(prep(p) for p in posts))
                good = [p for p in prepared if isinstance(p, Post)]
                results = iter(await service.batcher.submit_many(good))
        except TimeoutError:
            raise APIError(504, "deadline_exceeded",
                           f"no prediction within {s.request_timeout_s:g}s (REQUEST_TIMEOUT_S)") from None
        except QueueFull as e:
            raise APIError(503, "overloaded",
                           f"the server is at capacity ({e.queued} posts queued, MAX_QUEUE={e.max_queue}); "
                           "retry later", {"Retry-After": str(e.retry_after_s)}) from None
        return [p if isinstance(p, APIError) else (p, next(results)) for p in prepared]

    @app.post(
        "/predict", response_model=Prediction, responses=_ERROR_RESPONSES,
        summary="Predict one post's engagement",
        description="multipart/form-data with an `image` file and a `text` caption "
                    "(`curl -F image=@photo.jpg -F 'text=Sunset at the beach! #travel' HOST/predict`), or "
                    "JSON `{\"image_base64\": ..., \"text\": ...}`. The caption may be empty. `image_url` is "
                    "refused (422): the server never fetches URLs (SSRF).",
        openapi_extra=_request_body("PostMultipart", "PostJSON", "one post, as multipart or JSON"),
    )
    async def predict(request: Request, service: Service = Depends(get_service)) -> Prediction:
        s = service.settings
        if _body_kind(request) == "json":
            post = _post_from_json(await _read_json(request), s)
        else:
            form = await _read_form(request)
            images, texts = form.getlist("image"), form.getlist("text")
            if not images:
                raise _missing("image", "the image file")
            if not texts:
                raise _missing("text", "the caption; send text= for an image-only post")
            if len(images) > 1 or len(texts) > 1:
                raise APIError(422, "too_many_fields", "/predict takes one image and one text; "
                                                       "use /predict/batch for several posts")
            post = await _post_from_form(images[0], texts[0], s)
        (out,) = await _predict_posts(service, [post])
        if isinstance(out, APIError):
            raise out
        return Prediction(**service.predictor.prediction(*out))

    @app.post(
        "/predict/batch", response_model=BatchResponse, responses=_ERROR_RESPONSES,
        summary="Predict several posts in one request",
        description="multipart/form-data with repeated `image` and `text` fields paired by order, or JSON "
                    "`{\"posts\": [{image_base64, text}, ...]}`. The answer has one entry per post, in order: "
                    "a prediction (status 200) or that post's own error {index, status, reason, detail}; one "
                    "bad post does not fail the others. At most MAX_POSTS_PER_REQUEST posts (413).",
        openapi_extra=_request_body("BatchMultipart", "BatchJSON", "several posts, as multipart or JSON"),
    )
    async def predict_batch(request: Request, service: Service = Depends(get_service)) -> BatchResponse:
        s = service.settings
        posts: list[tuple[bytes, str] | APIError] = []
        if _body_kind(request) == "json":
            body = await _read_json(request)
            if not isinstance(body, dict) or not isinstance(body.get("posts"), list):
                raise APIError(422, "validation_error", "expected a JSON object {\"posts\": [{image_base64, text}]}")
            extra = set(body) - {"posts"}
            if extra:
                raise APIError(422, "validation_error", f"unexpected fields {sorted(extra)}; expected only 'posts'")
            raw_posts = body["posts"]
            _check_post_count(len(raw_posts), s)
            for obj in raw_posts:
                try:
                    posts.append(_post_from_json(obj, s))
                except APIError as e:
                    posts.append(e)
        else:
            form = await _read_form(request)
            images, texts = form.getlist("image"), form.getlist("text")
            if len(images) != len(texts):
                raise APIError(422, "unpaired_fields",
                               f"{len(images)} 'image' fields but {len(texts)} 'text' fields; send one text "
                               "per image, in the same order (text= for an image-only post)")
            _check_post_count(len(images), s)
            for image, text in zip(images, texts):
                try:
                    posts.append(await _post_from_form(image, text, s))
                except APIError as e:
                    posts.append(e)
        outs = await _predict_posts(service, posts)
        results = []
        for i, out in enumerate(outs):
            if isinstance(out, APIError):
                results.append(PostError(index=i, **out.body()))
            else:
                results.append(BatchItem(index=i, **service.predictor.prediction(*out)))
        return BatchResponse(results=results, model=service.predictor.info)

    return app


def _check_post_count(n: int, settings: ServingSettings) -> None:
    if n == 0:
        raise APIError(422, "no_posts", "the request holds no posts")
    if n > settings.max_posts_per_request:
        raise APIError(413, "too_many_posts", f"{n} posts in one request; the limit is "
                                              f"{settings.max_posts_per_request} (MAX_POSTS_PER_REQUEST)")


# Defaults for the body limit before the lifespan has resolved the real settings; built
# without reading the environment, so importing this module never fails.
_DEFAULT_SETTINGS = ServingSettings.model_construct()

# `uvicorn serving.app:app`: reads settings from the environment when it starts.
app = create_app()


# ---------------------------------------------------------------------------------------
# `python -m serving.app`: the same server, with our logging setup
# ---------------------------------------------------------------------------------------


@dataclass
class ServeConfig:
    """Run the prediction server (model and limits come from environment variables, see serving/settings.py)."""

    host: str = field("127.0.0.1", help="interface to bind (0.0.0.0 to listen on all)")
    port: int = field(8000, help="TCP port")
    log_level: str = field("info", help="uvicorn log level", choices=("critical", "error", "warning", "info", "debug"))


def main(argv: list[str] | None = None) -> None:
    # 1. Parse args, configure logging.
    cfg = parse_config(ServeConfig, argv)
    setup_logging(getattr(logging, cfg.log_level.upper()))
    log.info("config: %s", config_dict(cfg))
    # 2. Serve; the lifespan loads MODEL_DIR.
    import uvicorn

    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, log_config=None)


if __name__ == "__main__":
    main()
