"""A real HTTP server on 127.0.0.1 for the tests that download image URLs.

Not a test module. ``LoopbackServer`` runs ``http.server.ThreadingHTTPServer`` on a free port in a
thread and answers each path from a route; it counts the requests per path (server-side, so a
test can prove that a cached URL was not fetched) and the body bytes each route managed to send.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

# A route answers one request: (handler, how many times this path was asked before) -> None.
Route = Callable[[BaseHTTPRequestHandler, int], None]


def respond(handler: BaseHTTPRequestHandler, status: int, body: bytes = b"", ctype: str = "application/octet-stream",
            headers: dict[str, str] | None = None) -> None:
    """A complete answer with a Content-Length."""
    handler.send_response(status)
    handler.send_header("Content-Type", ctype)
    handler.send_header("Content-Length", str(len(body)))
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(body)


def static(body: bytes, ctype: str, status: int = 200) -> Route:
    return lambda h, n: respond(h, status, body, ctype)


def redirect(location: str) -> Route:
    return lambda h, n: respond(h, 302, headers={"Location": location})


def failing(statuses: list[int], then: Route, headers: dict[str, str] | None = None) -> Route:
    """Answer ``statuses[n]`` to the n-th request while there are any, then as ``then``."""
    return lambda h, n: respond(h, statuses[n], b"busy", "text/plain", headers) if n < len(statuses) else then(h, n)


def slow(seconds: float, then: Route) -> Route:
    def route(h, n):
        time.sleep(seconds)
        then(h, n)
    return route


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):  # a client that gave up
            super().handle_error(request, client_address)


@dataclass
class LoopbackServer:
    """``routes`` by path (query strings ignored); an unknown path is a 404."""

    routes: dict[str, Route]
    hits: Counter = field(default_factory=Counter)  # path -> requests received
    times: defaultdict = field(default_factory=lambda: defaultdict(list))  # path -> time.monotonic() of each
    sent: Counter = field(default_factory=Counter)  # path -> body bytes written by ``stream`` routes

    def __post_init__(self):
        self._lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", 0), self._handler_class())
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stream(self, total: int, chunk: int = 64 * 1024, declare: bool = False, pause_s: float = 0.0,
               stall_after: int | None = None) -> Route:
        """A body of ``total`` bytes in ``chunk``-byte writes, ``pause_s`` apart; with a Content-Length if
        ``declare``, else ended by closing the connection. After ``stall_after`` bytes the server stops for 30 s.
        ``sent`` counts what reached the socket before the client hung up."""
        def route(h, n):
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.send_header("Connection", "close")
            if declare:
                h.send_header("Content-Length", str(total))
            h.end_headers()
            block = b"\xff" * chunk
            try:
                for _ in range(total // chunk):
                    if self.sent[h.path] == stall_after:
                        time.sleep(30)  # a daemon thread: stop() does not wait for it
                    time.sleep(pause_s)
                    h.wfile.write(block)
                    with self._lock:
                        self.sent[h.path] += chunk
            except (BrokenPipeError, ConnectionResetError):
                pass
        return route

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?")[0]
                with server._lock:
                    n = server.hits[path]
                    server.hits[path] += 1
                    server.times[path].append(time.monotonic())
                route = server.routes.get(path)
                if route is None:
                    respond(self, 404, b"<html><body>Not Found</body></html>", "text/html")
                else:
                    route(self, n)

            def log_message(self, *args):  # the test output stays quiet
                pass

        return Handler
