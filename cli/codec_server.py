"""``kiln codec-server``: Temporal's remote codec protocol over HTTP, so the Web UI and the ``temporal`` CLI
(``--codec-endpoint``) show sealed payloads decrypted to those who reach it, and ciphertext to everyone else.

``POST /encode`` and ``POST /decode`` take and return ``{"payloads": [...]}`` in protobuf's JSON form (what the
UI and the CLI send). The UI calls it from the browser, so the answers carry CORS headers for the UI's origins.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads

from activities.codec import CodecKeyError, EncryptionCodec

ALLOWED_HEADERS = "Content-Type, X-Namespace, Authorization"
DEV_UI_ORIGINS = ["http://127.0.0.1:8233", "http://localhost:8233"]  # python worker.py --dev's Web UI


def codec_app(codec: EncryptionCodec, *, origins: Sequence[str]) -> web.Application:
    """The codec server's routes; ``origins`` are the Web UI addresses allowed to call it (``*`` for any)."""

    def cors(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin and ("*" in origins or origin in origins):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Credentials"] = "true"  # the UI's "include credentials"
            response.headers["Access-Control-Allow-Methods"] = "POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
            response.headers["Vary"] = "Origin"
        return response

    def handler(convert: Callable[[Sequence[Payload]], Awaitable[list[Payload]]]) -> Callable:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                payloads = json_format.Parse(await request.read(), Payloads())
            except json_format.ParseError as err:
                return cors(request, web.json_response({"error": f"not a Payloads JSON: {err}"}, status=400))
            try:
                converted = await convert(payloads.payloads)
            except CodecKeyError as err:
                return cors(request, web.json_response({"error": str(err)}, status=400))
            body = json_format.MessageToJson(Payloads(payloads=converted))
            return cors(request, web.Response(text=body, content_type="application/json"))

        return handle

    async def preflight(request: web.Request) -> web.StreamResponse:
        return cors(request, web.Response(status=204))

    app = web.Application()
    app.router.add_post("/encode", handler(codec.encode))
    app.router.add_post("/decode", handler(codec.decode))
    app.router.add_route("OPTIONS", "/{path:(encode|decode)}", preflight)
    return app


async def start_codec_server(codec: EncryptionCodec, *, host: str, port: int, origins: Sequence[str]) -> web.AppRunner:
    """Serve until the returned runner is cleaned up."""
    runner = web.AppRunner(codec_app(codec, origins=origins), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
