"""The API's routes: probes and metrics (``router``), and the prediction routes built for
one ``Contract`` (``prediction_router``).

Every response the document lists is one the code sends: the error statuses come from
``ERRORS`` and carry ``ErrorBody``, and every response has an ``X-Request-ID`` header.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint signatures,
# and the prediction endpoints name request models that exist only inside the factory.

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request, Response
from fastapi.responses import JSONResponse

from serving.contract import (MAX_GRID_DAYS, Contract, VariantsContract, check_batch_form, check_features_sent,
                              check_post_form, require_media_type)
from serving.errors import APIError
from serving.schemas import (BatchItem, BatchResponse, ErrorBody, Health, Metadata, PostError, Prediction, Ready,
                             VariantsResponse)
from serving.service import Service, get_service

PREDICT_TAG = "predict"

REQUEST_ID_HEADER = {"X-Request-ID": {
    "description": "the client's own X-Request-ID if it is a plain token (letters, digits, ._:/+=-, at most "
                   "128), else a new one; the access log line and any error body carry it too",
    "schema": {"type": "string"}, "required": True}}
RETRY_AFTER_HEADER = {"Retry-After": {"description": "seconds to wait before retrying",
                                      "schema": {"type": "integer"}, "required": True}}
ERRORS = {
    400: "the body is not valid JSON (invalid_json) or not valid multipart (bad_request)",
    408: "the body did not arrive within REQUEST_TIMEOUT_S of the headers (body_timeout)",
    413: "body over MAX_BODY_BYTES (body_too_large), image over MAX_PIXELS (too_many_pixels), or more posts "
         "than MAX_POSTS_PER_REQUEST (too_many_posts)",
    415: "the Content-Type this path does not take (unsupported_media_type), or a file that is not an image in "
         "an allowed format (unsupported_format)",
    422: "a missing, repeated or unknown field, a feature value that is not a finite number in its bounds, a caption "
         "over MAX_CAPTION_CHARS, invalid base64, image_url (refused: the server never fetches URLs), unpaired batch "
         "fields, or an empty, truncated or corrupt image, or one of an extreme aspect ratio",
    500: "unexpected server error (internal_error); the details are in the server log, never in the answer",
    503: "the model is not loaded yet (not_ready), or the server is at capacity (overloaded): the queue is full, "
         "or too many request bytes (MAX_INFLIGHT_BYTES) or image pixels (MAX_DECODE_PIXELS) are in hand",
    504: "no prediction within REQUEST_TIMEOUT_S (deadline_exceeded)",
}
PREDICT_ERRORS = (400, 408, 413, 415, 422, 500, 503, 504)


def documented(*errors: int, ok: dict | None = None) -> dict[int, dict[str, Any]]:
    """FastAPI ``responses=``: 200 (``ok`` adds to it) and these error statuses."""
    out = {200: {"headers": REQUEST_ID_HEADER, **(ok or {})}}
    for status in errors:
        headers = {**REQUEST_ID_HEADER, **(RETRY_AFTER_HEADER if status == 503 else {})}
        out[status] = {"model": ErrorBody, "description": ERRORS[status], "headers": headers}
    return out


# --- probes, metadata, metrics --------------------------------------------------------------

router = APIRouter()


@router.get("/health", response_model=Health, responses=documented(500), summary="Liveness: the process answers")
async def health() -> Health:
    return Health()


@router.get("/ready", response_model=Ready, summary="Readiness: 200 once the model is loaded, 503 before",
            responses={**documented(500), 503: {"model": Ready, "description": "model not loaded",
                                                "headers": {**REQUEST_ID_HEADER, **RETRY_AFTER_HEADER}}})
async def ready(request: Request):
    service = getattr(request.app.state, "service", None)
    if service is None:
        return JSONResponse(Ready(ready=False).model_dump(), status_code=503, headers={"Retry-After": "5"})
    return Ready(ready=True, model=service.predictor.info)


@router.get("/metadata", response_model=Metadata, responses=documented(500, 503),
            summary="Model config, training summary, server limits and micro-batching counters (for people)")
async def metadata(service: Service = Depends(get_service)) -> Metadata:
    return Metadata(model=names_not_paths(service.predictor.describe()),
                    training=names_not_paths(service.predictor.training_summary()),
                    settings=names_not_paths({**service.settings.limits(), "batching": service.batcher.stats()}))


# An absolute path inside a string: "/...", "~/..." or "C:\...", not part of a URL or of a
# relative path ("https://x/y", "runs/demo").
_ABSOLUTE_PATH_RE = re.compile(r"(?<![\w.:/~-])(?:/|~/|[A-Za-z]:[\\/])[^\s'\"]+")


def names_not_paths(value: Any) -> Any:
    """``value`` (JSON) with every absolute path in its strings replaced by its last name:
    /metadata is open to anyone who can reach the server, and paths such as the training
    data's or the CLIP's (the artifact's config records them) say how the host is laid out."""
    if isinstance(value, dict):
        return {k: names_not_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [names_not_paths(v) for v in value]
    if isinstance(value, str):
        return _ABSOLUTE_PATH_RE.sub(lambda m: re.split(r"[\\/]", m.group(0).rstrip("/\\"))[-1], value)
    return value


@router.get("/metrics", response_class=Response, summary="Prometheus metrics (for scrapers)",
            responses=documented(500, ok={"content": {"text/plain": {"schema": {"type": "string"}}},
                                          "description": "Prometheus text exposition format"}))
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.exposition()
    return Response(body, media_type=content_type)


# --- prediction -------------------------------------------------------------------------------


async def batch_response(service: Service, posts: list) -> BatchResponse:
    """Predict a batch's RawPosts; each entry is its prediction or its own error, by index."""
    results = [PostError(index=i, status=out.status, reason=out.reason, detail=str(out.detail))
               if isinstance(out, APIError) else BatchItem(index=i, **out.model_dump())
               for i, out in enumerate(await service.predict(posts))]
    return BatchResponse(results=results, model=service.predictor.info)


def prediction_router(contract: Contract) -> APIRouter:
    """/predict, /predict/json, /predict/batch and /predict/batch/json for ``contract``."""
    router = APIRouter(tags=[PREDICT_TAG], responses=documented(*PREDICT_ERRORS))
    multipart = Depends(require_media_type("multipart", other_path="/predict/json or /predict/batch/json"))
    json_body = Depends(require_media_type("json", other_path="/predict or /predict/batch"))
    PostForm, PostJSON, BatchForm, BatchJSON = contract.PostForm, contract.PostJSON, contract.BatchForm, contract.BatchJSON

    @router.post("/predict", response_model=Prediction, dependencies=[multipart, Depends(check_post_form)],
                 summary="Predict one post's engagement (multipart/form-data)",
                 description="`curl -F image=@photo.jpg -F 'text=Sunset at the beach! #travel' HOST/predict`. "
                             "The caption may be empty (`text=`) but must be sent.")
    async def predict(post: Annotated[PostForm, Form(media_type="multipart/form-data")],
                      service: Service = Depends(get_service)) -> Prediction:
        return await service.predict_one(await contract.read_post(post))

    @router.post("/predict/json", response_model=Prediction, dependencies=[json_body],
                 summary="Predict one post's engagement (JSON)",
                 description="The image travels inline as base64. `image_url` is refused (422): the server never "
                             "fetches URLs (SSRF).")
    async def predict_json(post: PostJSON, service: Service = Depends(get_service)) -> Prediction:
        return await service.predict_one(await contract.read_post(post))

    batch_doc = ("The answer has one entry per post, in order: a prediction (status 200) or, when that post's "
                 "image cannot be used, its own error {index, status, reason, detail}; one bad image does not "
                 "fail the others. A request that breaks the schema fails as a whole.")

    @router.post("/predict/batch", response_model=BatchResponse, dependencies=[multipart, Depends(check_batch_form)],
                 summary="Predict several posts (multipart/form-data)",
                 description="Post i's fields are numbered i, from 0: `curl -F image_0=@a.jpg -F text_0=first "
                             "-F image_1=@b.png -F text_1= HOST/predict/batch`. Each post sends all its fields (a "
                             "feature column `<name>_i`; an empty value means unknown), else 422 unpaired_fields. "
                             + batch_doc)
    async def predict_batch(batch: Annotated[BatchForm, Form(media_type="multipart/form-data")],
                            service: Service = Depends(get_service)) -> BatchResponse:
        return await batch_response(service, [await contract.read_post(p) for p in contract.posts_of(batch)])

    @router.post("/predict/batch/json", response_model=BatchResponse, dependencies=[json_body],
                 summary="Predict several posts (JSON)", description="`{\"posts\": [PostJSON, ...]}`. " + batch_doc)
    async def predict_batch_json(batch: BatchJSON, service: Service = Depends(get_service)) -> BatchResponse:
        return await batch_response(service, [await contract.read_post(p) for p in contract.posts_of(batch)])

    return router


def variants_router(contract: VariantsContract) -> APIRouter:
    """/predict/variants (multipart) and /predict/variants/json for ``contract``."""
    router = APIRouter(tags=[PREDICT_TAG], responses=documented(*PREDICT_ERRORS))
    multipart = Depends(require_media_type("multipart", other_path="/predict/variants/json"))
    json_body = Depends(require_media_type("json", other_path="/predict/variants"))
    VariantsForm, VariantsJSON = contract.VariantsForm, contract.VariantsJSON
    grid = (f" With a grid (a start day, 1 to {MAX_GRID_DAYS} days, the hours), every caption is scored at every "
            f"time of it in the timestamp column '{contract.datetime_names[0]}', and the best (caption, time) "
            "is named; only the variants at the time sent and the best carry contributions."
            if contract.datetime_names else "")
    doc = ("One image and 1 to 5 caption variants (and the account fields): each variant's prediction, interval and "
           "contributions, the same as /predict answers for that post, ranked; the image is embedded once." + grid)

    @router.post("/predict/variants", response_model=VariantsResponse,
                 dependencies=[multipart, Depends(check_features_sent)],
                 summary="Compare caption variants of one post (multipart/form-data)",
                 description="`curl -F image=@photo.jpg -F 'captions=Sunset!' -F 'captions=Golden hour' "
                             "HOST/predict/variants`. " + doc)
    async def predict_variants(req: Annotated[VariantsForm, Form(media_type="multipart/form-data")],
                               service: Service = Depends(get_service)) -> VariantsResponse:
        return await service.predict_variants(await contract.read(req))

    @router.post("/predict/variants/json", response_model=VariantsResponse, dependencies=[json_body],
                 summary="Compare caption variants of one post (JSON)",
                 description="`{\"image_base64\": ..., \"captions\": [...]}`. " + doc)
    async def predict_variants_json(req: VariantsJSON, service: Service = Depends(get_service)) -> VariantsResponse:
        return await service.predict_variants(await contract.read(req))

    return router
