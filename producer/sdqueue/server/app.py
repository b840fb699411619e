"""``create_app``: the FastAPI application of ``sdqueue serve``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

import anyio.to_thread
import redis
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from sdqueue.client import SdQueue
from sdqueue.server import routes_jobs, routes_openai
from sdqueue.server.context import Context
from sdqueue.server.errors import ApiError, install_handlers
from sdqueue.server.schemas import Health, error_body
from sdqueue.server.settings import ServerSettings, get_server_settings

log = logging.getLogger(__name__)
UPLOAD_PATHS = ("/v1/uploads", "/v1/images/edits")


class BodyLimit:
    """Refuse an upload whose declared length is over the limit before reading any of it (413)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in UPLOAD_PATHS:
            length = dict(scope["headers"]).get(b"content-length", b"0")
            if length.isdigit() and int(length) > self.limit:
                message = f"file: the request is {int(length)} bytes, over the {self.limit}-byte upload limit"
                response = JSONResponse(error_body(message, "invalid_request_error", "file"), status_code=413)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _page() -> str:
    return files("sdqueue.server").joinpath("page.html").read_text(encoding="utf-8")


def create_app(settings: ServerSettings | None = None, queue: SdQueue | None = None) -> FastAPI:
    """The app; settings default to the SDQ_* environment (``ServerSettings``)."""
    settings = settings or get_server_settings()
    ctx = Context(settings, queue)
    if ctx.open:
        log.warning("no API keys configured (SDQ_API_KEYS, SDQ_API_KEYS_FILE): the API is open to anyone")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 64
        yield

    from sdqueue.cli import _version

    app = FastAPI(
        title="sdqueue",
        version=_version(),
        summary="Stable Diffusion job queue: native job API and OpenAI-compatible images API",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    install_handlers(app)
    app.include_router(routes_jobs.router)
    app.include_router(routes_openai.router)
    page = _page()

    @app.get("/", include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}})
    async def healthz(request: Request) -> Any:
        """Readiness: Redis answers."""
        try:
            await run_in_threadpool(ctx.queue.redis.ping)
        except redis.RedisError:
            return JSONResponse({"ok": False}, status_code=503)
        return Health(ok=True)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        err = ApiError(500, f"internal error ({type(exc).__name__}); see the server log", "server_error")
        return JSONResponse(error_body(err.message, err.kind), status_code=500)

    app.add_middleware(BodyLimit, limit=settings.max_input_bytes * 2 + 1024 * 1024)
    return app
