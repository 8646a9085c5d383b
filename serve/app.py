"""The FastAPI app: the routes of `routes.build_router`, OpenAI-shaped errors, a body limit.

    state = ServerState.for_engine(engine, model_id="my-gpt2")   # a started Engine
    app = create_app(state)                                       # any ASGI server runs it
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpt2_onnx.serve.routes import ServerState, build_router
from gpt2_onnx.serve.schemas import ApiError, error_body

MAX_BODY_BYTES = 1 << 20  # 1 MiB: a full 1024-token context as text or ids is ~10 kB
_OUTCOME = {400: "invalid", 401: "unauthorized", 404: "invalid", 405: "invalid",
            413: "invalid", 422: "invalid", 429: "rejected", 503: "unavailable"}


def create_app(state: ServerState, *, max_body_bytes: int = MAX_BODY_BYTES,
               ui: bool = True) -> FastAPI:
    """An ASGI app serving `state` (see routes.ServerState); `ui`: the playground page at
    GET / (gpt2_onnx.serve.ui)."""
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) \
            or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be an integer >= 1, got {max_body_bytes!r}")
    app = FastAPI(title="gpt2-onnx", summary="OpenAI-compatible completions on GPT-2 (ONNX)",
                  docs_url="/docs", redoc_url=None)
    app.state.gpt2_onnx = state
    app.include_router(build_router(state))
    if ui:
        from gpt2_onnx.serve.ui import build_ui_router

        app.include_router(build_ui_router())

    def answer(status: int, body: dict[str, Any], headers: dict[str, str] | None = None
               ) -> JSONResponse:
        state.metrics.requests.labels(_OUTCOME.get(status, "error")).inc()
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return answer(exc.status, exc.body(), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        kind = first.get("type", "")
        ctype = request.headers.get("content-type", "")
        if kind == "json_invalid":
            message = "the body is not valid JSON"
        elif not loc and "json" not in ctype:
            # Kept strict (FastAPI's default): a web page cannot post a plain form to a local
            # server without a CORS preflight.
            message = (f"send the body as JSON with 'Content-Type: application/json' (got "
                       f"{ctype or 'no Content-Type'})")
        elif kind == "missing" and not loc:
            message = "the body is missing: send a JSON object"
        else:
            got = first.get("input")
            shown = "" if kind in ("missing", "extra_forbidden") else f" (got {got!r:.80})"
            message = f"{param or 'body'}: {first.get('msg', 'invalid')}{shown}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        return answer(400, error_body(message, param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see GET /docs"
        return answer(exc.status_code, error_body(message), dict(exc.headers or {}))

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes,
                       on_reject=state.metrics.requests.labels("invalid").inc)
    return app


class BodyLimit:
    """413 in OpenAI's shape for a body over `max_bytes`: by Content-Length before reading, and
    by counting for a chunked body. The body (at most max_bytes) is read here and replayed to
    the app; later receives (the client's disconnect) pass through."""

    def __init__(self, app: ASGIApp, max_bytes: int,
                 on_reject: Callable[[], None] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(scope, send)
            return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before the body ended
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                await self._reject(scope, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, send: Send) -> None:
        if self.on_reject is not None:
            self.on_reject()
        body = error_body(f"the request body is larger than {self.max_bytes} bytes",
                          code="body_too_large")
        await JSONResponse(body, status_code=413)(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
