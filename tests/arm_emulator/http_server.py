"""The emulator's HTTP side: a threaded keep-alive server on 127.0.0.1, reading a request and writing an answer."""

from __future__ import annotations

import json
import socket
import sys
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .protocol import Request, Response


class HttpServer(ThreadingHTTPServer):
    """One thread per connection, daemonic, so a client that keeps a connection open never blocks stop()."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that resets a kept-alive connection is ordinary; anything else is printed."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as azure-core's requests session expects
    serve: Callable[[BaseHTTPRequestHandler], None]

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; without this, Nagle plus delayed ACK adds ~40 ms
        # to every exchange.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _any(self) -> None:
        self.serve(self)

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _any

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: the call log (`ArmEmulator.calls`) is the record."""


def make_server(port: int, serve: Callable[[BaseHTTPRequestHandler], None]) -> HttpServer:
    """A server on 127.0.0.1:`port` (0: a free one) that hands every request, any method, to `serve`."""
    handler = type("_BoundHandler", (_Handler,), {"serve": staticmethod(serve)})
    return HttpServer(("127.0.0.1", port), handler)


def read_request(h: BaseHTTPRequestHandler) -> Request:
    """The request `h` has read the head of, with its body; `origin` is the Host the client addressed."""
    url = urlsplit(h.path)
    query = {k.lower(): v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
    length = int(h.headers.get("Content-Length") or 0)
    return Request(
        h.command,
        url.path,
        query,
        h.rfile.read(length),
        f"http://{h.headers.get('Host')}",
        h.headers.get("x-ms-range") or h.headers.get("Range"),
        h.headers.get("Authorization"),
        dict(h.headers.items()),
        url.query,
    )


def write(h: BaseHTTPRequestHandler, method: str, resp: Response) -> None:
    """Sends `resp`: JSON with ARM's headers, or Azurite's answer with its own headers untouched."""
    if resp.raw:
        assert isinstance(resp.body, bytes)
        h.send_response(resp.status)
        for name, value in resp.headers.items():
            h.send_header(name, value)
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(resp.body)
        return
    data = resp.body if isinstance(resp.body, bytes) else b"" if resp.body is None else json.dumps(resp.body).encode()
    h.send_response(resp.status)
    h.send_header("Content-Type", resp.headers.pop("Content-Type", "application/json; charset=utf-8"))
    h.send_header("Content-Length", str(len(data)))
    h.send_header("x-ms-request-id", str(uuid.uuid4()))
    for name, value in resp.headers.items():
        h.send_header(name, value)
    h.end_headers()
    if method != "HEAD":
        h.wfile.write(data)
