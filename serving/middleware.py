"""Pure ASGI middleware: the request context (ID, access log, metrics, catch-all 500) and
the body size limit.

Pure ASGI rather than ``BaseHTTPMiddleware``: both must see the raw message stream (the
body limit counts bytes as they arrive; the request ID goes into the response headers
whoever sends them), and neither may buffer a body.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import REQUEST_ID, error_response
from serving.settings import DEFAULT_SETTINGS

log = logging.getLogger(__name__)
access_log = logging.getLogger("serving.access")

REQUEST_ID_HEADER = "X-Request-ID"
# A client's own ID is kept if it is a plain token (uuid, hex, trace id); anything else
# (too long, spaces, control characters) could forge log lines, so it is replaced.
_CLIENT_ID_RE = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            client_id = value.decode("latin-1")
            if _CLIENT_ID_RE.fullmatch(client_id):
                return client_id
    return uuid.uuid4().hex


def route_path(scope: Scope) -> str:
    """The route template a request hit ("/predict"), for metric labels; raw paths would
    let clients create unbounded label values. API routes set "route"; the docs routes
    (fixed paths) only "endpoint"; neither is set for a 404: "unmatched"."""
    route = scope.get("route")
    if route is not None:
        return route.path
    return scope["path"] if "endpoint" in scope else "unmatched"


class RequestContextMiddleware:
    """Outermost middleware: gives every request an ID, writes one access line, records the
    request metrics, and answers an unexpected exception with a JSON 500.

    The ID is the client's ``X-Request-ID`` when it is a plain token, else a new uuid4
    hex. It is set in ``errors.REQUEST_ID`` (so error bodies carry it) and added to every
    response's headers.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        token = REQUEST_ID.set(request_id)
        t0 = time.perf_counter()
        status = None  # set once a response starts

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # noqa: BLE001 - every request gets an answer; the log gets the traceback
            log.error("unhandled error on %s %s (request_id=%s)", scope["method"], scope["path"], request_id,
                      exc_info=exc)
            if status is not None:  # a response is already on the wire: nothing more can be sent
                raise
            response = error_response(500, "internal_error", "internal server error; the details are in the "
                                                             "server log")
            await response(scope, receive, send_with_id)
        finally:
            self._record(scope, status or 500, time.perf_counter() - t0, request_id)
            REQUEST_ID.reset(token)

    @staticmethod
    def _record(scope: Scope, status: int, seconds: float, request_id: str) -> None:
        path = route_path(scope)
        metrics = getattr(scope["app"].state, "metrics", None)
        if metrics is not None:
            metrics.observe_request(path, scope["method"], status, seconds)
        client = scope.get("client")
        access_log.info('%s "%s %s" %d %.1fms request_id=%s', f"{client[0]}:{client[1]}" if client else "-",
                        scope["method"], scope["path"], status, seconds * 1000, request_id)


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once the body passes the limit.

    An HTTPException, because FastAPI re-raises those from body parsing (anything else
    becomes a 400); the app's HTTPException handler answers it with this reason.
    """

    reason = "body_too_large"

    def __init__(self, what: str, limit: int):
        super().__init__(413, f"request body too large: {what}; the limit is {limit:,} bytes (MAX_BODY_BYTES)",
                         headers={"Connection": "close"})


def _body_limit(scope: Scope) -> int:
    settings = getattr(scope["app"].state, "settings", None) if "app" in scope else None
    return (settings or DEFAULT_SETTINGS).max_body_bytes


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class BodySizeLimitMiddleware:
    """413 for bodies over MAX_BODY_BYTES, declared or streamed.

    Starlette reads bodies without a limit. When the app first reads the body, a declared
    Content-Length over the limit is refused before a byte is read; otherwise (chunked
    uploads, or a client that lies) the bytes are counted as they stream and reading stops
    as soon as they pass the limit. The refusal is raised inside the route's body parsing,
    so it is answered (and counted) like any error of that route.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = _body_limit(scope)
        declared = _declared_length(scope)
        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            if declared is not None and declared > limit:
                raise BodyTooLarge(f"Content-Length {declared:,}", limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(f"more than {limit:,} bytes arrived", limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:  # raised where no exception handler sits between us and receive
            if response_started:  # never send two responses
                raise
            await error_response(exc.status_code, exc.reason, exc.detail, exc.headers)(scope, receive, send)
