"""FastAPI prediction service: image + caption -> predicted engagement.

    MODEL_DIR=runs/demo/model uvicorn serving.app:app --port 8000
    curl -F image=@photo.jpg -F 'text=Sunset at the beach! #travel' localhost:8000/predict

The package follows FastAPI's "Bigger Applications" layout:

| module          | owns                                                                    |
|-----------------|-------------------------------------------------------------------------|
| `app.py`        | the app factory, the lifespan (load the model once), `python -m` entry  |
| `routes.py`     | the routes (`APIRouter`s) and what the OpenAPI document says of them    |
| `contract.py`   | the request models (built from the feature names) and `RawPost`         |
| `service.py`    | one request's posts: prepare, queue, predict; `get_service`             |
| `predictor.py`  | the model: `prepare` (the preprocessing functions), `run_batch`         |
| `batching.py`   | the micro-batcher                                                       |
| `middleware.py` | request ID and deadline, access log, metrics, 500, body limits          |
| `errors.py`     | `APIError`, the error body, validation errors -> reason codes           |
| `pages.py`      | the playground page (`static/`) and the offline /docs, not in OpenAPI   |
| `metrics.py`    | the Prometheus series (`GET /metrics`)                                  |
| `schemas.py`    | response models                                                         |
| `settings.py`   | environment settings (`get_settings`)                                   |

The request models depend on the limits in settings (caption length, posts per request)
and on the feature columns the model declares, so ``create_app`` builds them, and the
routes, from both; the lifespan checks that the model it loads agrees.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as `python serving/app.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi import FastAPI
from pydantic import ValidationError

from common.config import config_dict, field, parse_config, setup_logging
from serving.contract import Contract, VariantsContract, build_contract, build_variants_contract
from serving.errors import install_error_handlers
from serving.metrics import ServingMetrics
from serving.middleware import BodyLimitsMiddleware, RequestContextMiddleware
from serving.predictor import Predictor, get_model_loader
from serving.pages import mount_pages
from serving.routes import prediction_router, router, variants_router
from serving.service import Service, torch_thread
from serving.settings import DEFAULT_SETTINGS, ServingSettings, get_settings

log = logging.getLogger(__name__)

API_VERSION = "2"


def resolve(app: FastAPI, dependency: Callable[[], Any]) -> Any:
    """A dependency as the app resolves it, overrides included (the lifespan's seam)."""
    return app.dependency_overrides.get(dependency, dependency)()


def _settings(app: FastAPI) -> ServingSettings:
    try:
        return resolve(app, get_settings)
    except ValidationError as e:
        raise RuntimeError(f"invalid serving settings (environment variables): {e}") from None


def _check_model_dir(settings: ServingSettings) -> Path:
    if settings.model_dir is None:
        raise RuntimeError("MODEL_DIR is not set: point it at a model artifact, e.g. "
                           "MODEL_DIR=runs/<run>/model uvicorn serving.app:app")
    model_dir = Path(settings.model_dir)
    if not model_dir.is_dir():
        raise RuntimeError(f"MODEL_DIR={model_dir} is not a directory (expected RUN_DIR/model written by "
                           "training/train_torch.py; a bare `python training/train_torch.py` writes runs/<time>/ "
                           'and points runs/latest at it, the default MODEL_DIR: README.md, "On your own data")')
    return model_dir


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


async def _load_predictor(app: FastAPI, settings: ServingSettings, torch_pool) -> Predictor:
    """Load MODEL_DIR and run one warm-up prediction on the torch thread (it takes seconds
    and the loop should stay responsive); any failure means "this is not a usable model"."""
    model_dir = _check_model_dir(settings)
    load = resolve(app, get_model_loader)
    loop = asyncio.get_running_loop()
    try:
        loaded = await loop.run_in_executor(torch_pool, functools.partial(load, model_dir, runtime=settings.runtime))
        predictor = Predictor(loaded, settings.max_pixels, settings.image_cache_size, app.state.metrics.observe_cache)
        await loop.run_in_executor(torch_pool, predictor.warm_up)
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"could not load the model from MODEL_DIR={model_dir}: {type(e).__name__}: {e}") from e
    return predictor


def _check_contract(contract: Contract, settings: ServingSettings, predictor: Predictor) -> None:
    """The routes were built in create_app; fail startup if they do not fit what it loads."""
    built = (contract.feature_names, contract.max_caption_chars, contract.max_posts)
    wanted = (predictor.feature_names, settings.max_caption_chars, settings.max_posts_per_request)
    if built != wanted:
        raise RuntimeError(f"the app was built for (features, MAX_CAPTION_CHARS, MAX_POSTS_PER_REQUEST) = {built}, "
                           f"but the settings and MODEL_DIR say {wanted}: pass them to create_app")


def _check_variants_contract(contract: VariantsContract, predictor: Predictor) -> None:
    """The variants' grid was built for the timestamp columns MODEL_DIR declared; so must the model take."""
    wanted = tuple(n for n, kind in predictor.feature_kinds.items() if kind == "datetime")
    if contract.datetime_names != wanted:
        raise RuntimeError(f"the app was built for the timestamp columns {contract.datetime_names}, but MODEL_DIR "
                           f"has {wanted}: pass them to create_app")


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Load settings and the model once and run the micro-batcher while the app serves."""
    if not logging.getLogger().handlers:
        # Under `uvicorn serving.app:app` the lifespan is this process's entry point, and
        # uvicorn configures only its own loggers; without this our log lines are lost.
        # Follow uvicorn's --log-level where it set one.
        setup_logging(logging.getLogger("uvicorn.error").level or logging.INFO)
    settings = app.state.settings = _settings(app)
    t0 = time.perf_counter()
    torch_pool = torch_thread(settings.torch_threads)
    try:
        predictor = await _load_predictor(app, settings, torch_pool)
        _check_contract(app.state.contract, settings, predictor)
        _check_variants_contract(app.state.variants_contract, predictor)
    except BaseException:
        torch_pool.shutdown(wait=False, cancel_futures=True)
        raise
    metrics: ServingMetrics = app.state.metrics
    metrics.model_load_seconds.set(time.perf_counter() - t0)
    metrics.model.info(predictor.info.model_dump())
    if predictor.image_cache is not None:
        metrics.track_cache(lambda: len(predictor.image_cache))
    service = app.state.service = await Service.start(settings, predictor, metrics, torch_pool)
    threads = await asyncio.get_running_loop().run_in_executor(torch_pool, _torch_threads)
    log.info("loaded model %s (version %s) from %s in %.1fs; torch threads %d; micro-batching %s "
             "(max batch %d, max wait %.1f ms, max queue %d)", predictor.info.name, predictor.info.version,
             settings.model_dir, time.perf_counter() - t0, threads,
             "on" if settings.micro_batching else "off", service.batcher.max_batch_size,
             service.batcher.max_wait_s * 1000, service.batcher.max_queue)
    try:
        yield
    finally:
        app.state.service = None  # /ready turns 503 while draining
        await service.stop()
        log.info("model unloaded")


def _limits(settings: ServingSettings | None) -> ServingSettings:
    """The settings the routes are built with: these, else the environment's. Invalid
    environment settings fall back to the defaults here: startup fails on them anyway,
    in the lifespan, with a message that names the variable."""
    if settings is not None:
        return settings
    try:
        return get_settings()
    except ValidationError:
        return DEFAULT_SETTINGS


def create_app(settings: ServingSettings | None = None, feature_names: tuple[str, ...] | None = None,
               datetime_names: tuple[str, ...] | None = None) -> FastAPI:
    """Build the app for ``settings`` (default: the environment's) and the model's feature
    columns (default: those MODEL_DIR's config.json declares, a small JSON read; ``datetime_names``
    the timestamp columns among them). The model loads in the lifespan, i.e. when a server (or
    ``with TestClient(app)``) starts, not here."""
    from models.artifact import artifact_feature_kinds, artifact_feature_names

    app = FastAPI(
        title="Engagement prediction", version=API_VERSION, lifespan=lifespan, docs_url=None, redoc_url=None,
        description="Predict a social-media post's engagement (likes) from its image and caption with a "
                    "fine-tuned CLIP regressor. Send a post as multipart/form-data to /predict (image file + "
                    "text) or as JSON to /predict/json (image_base64 + text); the server never fetches URLs.")
    if settings is not None:
        app.dependency_overrides[get_settings] = lambda: settings
    limits = _limits(settings)
    if feature_names is None:
        feature_names = artifact_feature_names(limits.model_dir)
    if datetime_names is None:
        datetime_names = tuple(n for n, kind in artifact_feature_kinds(limits.model_dir).items() if kind == "datetime")
    app.state.contract = build_contract(feature_names, limits.max_caption_chars, limits.max_posts_per_request)
    app.state.variants_contract = build_variants_contract(feature_names, datetime_names, limits.max_caption_chars)
    app.state.metrics = ServingMetrics()
    app.state.service = None
    app.add_middleware(BodyLimitsMiddleware)
    app.add_middleware(RequestContextMiddleware)  # added last: the outermost, so it sees every answer
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(prediction_router(app.state.contract))
    app.include_router(variants_router(app.state.variants_contract))
    mount_pages(app)  # the playground at /, and /docs with Swagger UI's files served from here
    return app


# `uvicorn serving.app:app`: reads settings from the environment when it starts.
app = create_app()


def header_timeout_protocol(timeout_s: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request line and headers are not
    complete ``timeout_s`` after it opened, or after the first byte of its next request.

    uvicorn has no such timeout: its keep-alive timer stops at a request's first byte, so
    a client that sends a header byte now and then holds its connection (and a file
    descriptor) for ever. Once the headers are in, the request's deadline
    (REQUEST_TIMEOUT_S) bounds reading the body.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # a request has begun but its headers are not complete
                self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None and not self.transport.is_closing():
                self._header_timer = self.loop.call_later(timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                # debug: a flood of slow connections must not become a flood of log lines
                log.debug("closed a connection from %s: no complete request headers within %gs", self.client,
                          timeout_s)
                self.transport.close()

    return HeaderTimeoutH11Protocol


@dataclass
class ServeConfig:
    """Run the prediction server (model and limits come from environment variables, see serving/settings.py)."""

    host: str = field("127.0.0.1", help="interface to bind (0.0.0.0 to listen on all)")
    port: int = field(8000, help="TCP port")
    log_level: str = field("info", help="uvicorn log level", choices=("critical", "error", "warning", "info", "debug"))
    limit_concurrency: int = field(512, help="open connections (or requests in progress) past which uvicorn answers "
                                             "new requests 503")
    keep_alive_s: int = field(5, help="seconds an idle keep-alive connection stays open")
    header_timeout_s: float = field(10.0, help="seconds a connection has to send a request's line and headers, "
                                               "from its opening or its next request's first byte; then it is closed")

    def __post_init__(self):
        if self.limit_concurrency < 1 or self.keep_alive_s < 1 or self.header_timeout_s <= 0:
            raise ValueError("--limit-concurrency and --keep-alive-s must be >= 1 and --header-timeout-s > 0")


def main(argv: list[str] | None = None) -> None:
    # 1. Parse args, configure logging.
    cfg = parse_config(ServeConfig, argv)
    setup_logging(getattr(logging, cfg.log_level.upper()))
    log.info("config: %s", config_dict(cfg))
    # 2. Serve; the lifespan loads MODEL_DIR. The app writes its own access line (with
    # the request ID), so uvicorn's is off.
    import uvicorn

    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, log_config=None, access_log=False,
                http=header_timeout_protocol(cfg.header_timeout_s), limit_concurrency=cfg.limit_concurrency,
                timeout_keep_alive=cfg.keep_alive_s)


if __name__ == "__main__":
    main()
