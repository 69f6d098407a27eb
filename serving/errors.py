"""Error answers: every error is JSON ``{status, reason, detail, request_id}`` (``schemas.ErrorBody``).

``reason`` is a stable code (the README's error table). Request validation is FastAPI's,
from the request models in ``serving.contract``; ``validation_reason`` turns pydantic's
error types into the table's codes, so a client sees ``caption_too_long`` rather than
``string_too_long`` whichever path the post came by.
"""

from __future__ import annotations

import http
import re
from contextvars import ContextVar
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# The ID of the request being answered; RequestContextMiddleware sets it for each request.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)

# The detail of every 500: what went wrong is in the server log, never in the answer.
INTERNAL_ERROR = "internal server error; the details are in the server log"
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


def error_response(status: int, reason: str, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"status": status, "reason": reason, "detail": detail, "request_id": REQUEST_ID.get()}
    return JSONResponse(body, status_code=status, headers=headers)


# --- request validation -> reason codes ---------------------------------------------------

# Error types our own validators raise (serving.contract); they are reason codes already.
CUSTOM_REASONS = {"invalid_base64": 422, "unpaired_fields": 422, "invalid_feature": 422, "empty_file": 422}


def _field(error: dict) -> str:
    """The request field an error is about: ("body", "posts", 0, "text") -> "text"."""
    names = [part for part in error["loc"] if isinstance(part, str) and part != "body"]
    return names[-1] if names else ""


def _reason_of(error: dict, multipart: bool) -> tuple[int, str] | None:
    kind, name = error["type"], _field(error)
    if multipart:  # a multipart batch numbers its posts' fields: text_3 is a text
        name = re.sub(r"_[0-9]+$", "", name)
    if kind == "json_invalid":
        return 400, "invalid_json"
    if kind == "extra_forbidden" and name == "image_url":
        return 422, "image_url_not_supported"
    if kind in CUSTOM_REASONS:
        return CUSTOM_REASONS[kind], kind
    if name in ("posts", "image") and kind == "too_long":
        return 413, "too_many_posts"
    if name == "posts" and kind == "too_short":
        return 422, "no_posts"
    if name in ("text", "captions") and kind == "string_too_long":
        return 422, "caption_too_long"
    if kind == "missing" and not multipart and name and name not in ("image_base64", "text", "posts"):
        return 422, "missing_feature"  # every other required JSON key is a feature column
    if kind == "missing" and multipart:
        return 422, "missing_field"
    if kind == "extra_forbidden":
        return 422, "unknown_field"
    if multipart and name == "image" and kind in ("value_error", "string_type"):
        return 422, "image_not_a_file"  # FastAPI: "Expected UploadFile, received: <class 'str'>"
    if multipart and name == "text" and kind == "string_type":
        return 422, "text_not_a_string"
    if error["loc"] == ("body",) and kind in ("model_attributes_type", "dict_type", "model_type"):
        return 422, "invalid_post"
    return None


def validation_reason(errors: list[dict], multipart: bool) -> tuple[int, str, Any]:
    """Pydantic errors of one request -> (status, reason, detail).

    The first error that has a code in the table names the answer; with none, it is
    validation_error and the list of errors. The detail keeps type/loc/msg only: never
    the input back (a base64 image) or ctx.
    """
    for error in errors:
        found = _reason_of(error, multipart)
        if found is not None:
            status, reason = found
            if reason == "image_url_not_supported":
                return status, reason, SSRF_DETAIL
            if reason == "missing_field":
                field = _field(error)
                return status, reason, f"the multipart field '{field}' is missing" + (
                    "; send text= for an image-only post" if field == "text" else "")
            return status, reason, f"{'.'.join(map(str, error['loc']))}: {error['msg']}"
    return 422, "validation_error", [{k: e[k] for k in ("type", "loc", "msg")} for e in errors]


# --- handlers -------------------------------------------------------------------------------


def _count_rejection(request: Request, status: int, reason: str) -> None:
    if status in (503, 504):  # capacity answers are what an operator watches for
        request.app.state.metrics.rejected.labels(status=str(status), reason=reason).inc()


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    _count_rejection(request, exc.status, exc.reason)
    return error_response(exc.status, exc.reason, exc.detail, exc.headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Our own (middleware.BodyRefused) name their reason; Starlette's are named after the
    # status: 404 -> not_found, 405 -> method_not_allowed, 400 -> bad_request (bad multipart).
    reason = getattr(exc, "reason", None)
    if reason is None:
        try:
            reason = http.HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
        except ValueError:
            reason = "http_error"
    _count_rejection(request, exc.status_code, reason)
    return error_response(exc.status_code, reason, exc.detail, getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    multipart = request.headers.get("content-type", "").lower().startswith("multipart/")
    status, reason, detail = validation_reason(list(exc.errors()), multipart)
    return error_response(status, reason, detail)


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app answers is an ErrorBody; unexpected ones are caught by
    ``RequestContextMiddleware`` (it owns the request ID the 500 body carries)."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
