"""Pure ASGI middleware: the request context (ID, deadline, access log, metrics, catch-all
500) and the body's limits (size, bytes in flight across the server, time).

Pure ASGI rather than ``BaseHTTPMiddleware``: both must see the raw message stream (the
body limits act on bytes as they arrive; the request ID goes into the response headers
whoever sends them), and neither may buffer a body.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from contextvars import ContextVar

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import INTERNAL_ERROR, REQUEST_ID, error_response
from serving.settings import DEFAULT_SETTINGS, ServingSettings

log = logging.getLogger(__name__)
access_log = logging.getLogger("serving.access")

REQUEST_ID_HEADER = "X-Request-ID"
# A client's own ID is kept if it is a plain token (uuid, hex, trace id); anything else
# (too long, spaces, control characters) could forge log lines, so it is replaced.
_CLIENT_ID_RE = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
# The request's deadline (event loop time): REQUEST_TIMEOUT_S after its headers arrived.
# RequestContextMiddleware sets it; the body reader and Service.predict both work to it.
REQUEST_DEADLINE: ContextVar[float | None] = ContextVar("request_deadline", default=None)

# Control characters (C0, DEL, C1), the Unicode line and paragraph separators, and the
# backslash and double quote that would make an escape or a quoted field ambiguous.
_LOG_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))} | {
    ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029",
    ord("\\"): "\\\\", ord('"'): '\\"'}


def log_safe(value: object) -> str:
    """A client-supplied value as a log line may carry it: control characters backslash-
    escaped (``\\n``, ``\\x1b``), so a value can neither start a forged line nor end the
    quoted field it sits in. Every client value that reaches a log line goes through this."""
    return str(value).translate(_LOG_ESCAPES)


def settings_of(scope: Scope) -> ServingSettings:
    """The app's settings once the lifespan has resolved them, else the defaults."""
    settings = getattr(scope["app"].state, "settings", None) if "app" in scope else None
    return settings or DEFAULT_SETTINGS


def request_deadline() -> float | None:
    """The deadline of the request being answered (``asyncio`` loop time), if any."""
    return REQUEST_DEADLINE.get()


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
    """Outermost middleware: gives every request an ID and a deadline, writes one access
    line, records the request metrics, and answers an unexpected exception with a JSON 500.

    The ID is the client's ``X-Request-ID`` when it is a plain token, else a new uuid4
    hex. It is set in ``errors.REQUEST_ID`` (so error bodies carry it) and added to every
    response's headers. The deadline (``REQUEST_DEADLINE``) is REQUEST_TIMEOUT_S from now,
    when the headers have arrived: reading the body counts against it.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        token = REQUEST_ID.set(request_id)
        deadline = REQUEST_DEADLINE.set(asyncio.get_running_loop().time() + settings_of(scope).request_timeout_s)
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
            log.error("unhandled error on %s %s (request_id=%s)", log_safe(scope["method"]), log_safe(scope["path"]),
                      request_id, exc_info=exc)
            if status is not None:  # a response is already on the wire: nothing more can be sent
                raise
            response = error_response(500, "internal_error", INTERNAL_ERROR)
            await response(scope, receive, send_with_id)
        finally:
            self._record(scope, status or 500, time.perf_counter() - t0, request_id)
            REQUEST_DEADLINE.reset(deadline)
            REQUEST_ID.reset(token)

    @staticmethod
    def _record(scope: Scope, status: int, seconds: float, request_id: str) -> None:
        path = route_path(scope)
        metrics = getattr(scope["app"].state, "metrics", None)
        if metrics is not None:
            metrics.observe_request(path, scope["method"], status, seconds)
        client = scope.get("client")
        query = scope.get("query_string", b"").decode("latin-1")
        access_log.info('%s "%s %s" %d %.1fms request_id=%s', f"{client[0]}:{client[1]}" if client else "-",
                        log_safe(scope["method"]), log_safe(scope["path"] + ("?" + query if query else "")), status,
                        seconds * 1000, request_id)


class BodyRefused(HTTPException):
    """Raised from ``receive`` when a body passes one of its limits.

    An HTTPException, because FastAPI re-raises those from body parsing (anything else
    becomes a 400); the app's HTTPException handler answers it with ``reason``. The rest of
    the body is never read, so the answer closes the connection.
    """

    def __init__(self, status: int, reason: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(status, detail, headers={"Connection": "close", **(headers or {})})
        self.reason = reason


class BodyTooLarge(BodyRefused):
    def __init__(self, what: str, limit: int):
        super().__init__(413, "body_too_large",
                         f"request body too large: {what}; the limit is {limit:,} bytes (MAX_BODY_BYTES)")


class BodyTimeout(BodyRefused):
    def __init__(self, timeout_s: float):
        super().__init__(408, "body_timeout", f"the request body did not arrive within {timeout_s:g}s of its "
                                              "headers (REQUEST_TIMEOUT_S)")


class BodiesInFlight(BodyRefused):
    def __init__(self, held: int, limit: int):
        super().__init__(503, "overloaded", f"the server is holding {held:,} bytes of request bodies "
                                            f"(MAX_INFLIGHT_BYTES={limit:,}); retry later", {"Retry-After": "1"})


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class InflightBytes:
    """Bytes of request bodies held across the server (one count per app)."""

    def __init__(self) -> None:
        self.held = 0

    def take(self, n: int, limit: int, own: int) -> bool:
        """Count ``n`` more bytes for a body that holds ``own`` already, if they fit under
        ``limit``; a body is always let in when it is the only one held."""
        if self.held + n > limit and self.held > own:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n


class _Body:
    """One request's body as the route reads it, within its limits (``BodyLimitsMiddleware``)."""

    def __init__(self, receive: Receive, scope: Scope, inflight: InflightBytes):
        self._receive = receive
        self.settings = settings_of(scope)
        self.declared = _declared_length(scope)
        self.deadline = request_deadline()
        self.inflight = inflight
        self.received = 0  # bytes of the body so far
        self.held = 0  # bytes counted in ``inflight`` for this body
        self.complete = False

    async def receive(self) -> Message:
        if self.complete:  # after the body only http.disconnect comes: no limit applies
            return await self._receive()
        limit = self.settings.max_body_bytes
        if self.declared is not None and self.declared > limit:
            raise BodyTooLarge(f"Content-Length {self.declared:,}", limit)
        self._hold(self.declared or 0)  # a declared body is counted before a byte is read
        message = await self._in_time()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > limit:
                raise BodyTooLarge(f"more than {limit:,} bytes arrived", limit)
            self._hold(self.received)  # chunked, or more than declared
            self.complete = not message.get("more_body", False)
        return message

    def _hold(self, total: int) -> None:
        more = total - self.held
        if more > 0:
            if not self.inflight.take(more, self.settings.max_inflight_bytes, own=self.held):
                raise BodiesInFlight(self.inflight.held, self.settings.max_inflight_bytes)
            self.held = total

    async def _in_time(self) -> Message:
        if self.deadline is None:  # no RequestContextMiddleware outside (not this app)
            return await self._receive()
        try:
            async with asyncio.timeout_at(self.deadline):
                return await self._receive()
        except TimeoutError:
            raise BodyTimeout(self.settings.request_timeout_s) from None

    def release(self) -> None:
        self.inflight.give(self.held)
        self.held = 0


class BodyLimitsMiddleware:
    """The request body's limits, applied as the route reads it (Starlette sets none):

    - size: 413 ``body_too_large`` past MAX_BODY_BYTES. A declared Content-Length over it
      is refused before a byte is read; otherwise (chunked uploads, a client that lies)
      the bytes are counted as they stream, and reading stops once they pass it.
    - bytes in flight: 503 ``overloaded`` when this body would take the bodies held across
      the server past MAX_INFLIGHT_BYTES. A declared length is counted up front, a streamed
      body as it arrives; a body is held until its request is answered.
    - time: 408 ``body_timeout`` when the body is not complete by the request's deadline
      (``REQUEST_DEADLINE``), so a client that trickles bytes cannot hold a request open.

    Each refusal is raised inside the route's body parsing, so it is answered (and
    counted) like any error of that route, and the connection is closed.
    """

    def __init__(self, app: ASGIApp):
        self.app = app
        self.inflight = InflightBytes()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = _Body(receive, scope, self.inflight)
        response_started = False

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, body.receive, tracking_send)
        except BodyRefused as exc:  # raised where no exception handler sits between us and receive
            if response_started:  # never send two responses
                raise
            await error_response(exc.status_code, exc.reason, exc.detail, exc.headers)(scope, receive, send)
        finally:
            body.release()
