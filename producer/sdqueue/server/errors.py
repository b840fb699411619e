"""Every refusal as a 4xx in OpenAI's error shape, naming the field: no handler answers 500 for
bad input. Exceptions of the contract and the client map to statuses here, in one place."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdqueue.contract import describe_errors
from sdqueue.errors import (
    BrokerUnavailable,
    InputImageError,
    JobIdConflict,
    JobValidationError,
    StorageUnavailable,
)
from sdqueue.server.schemas import ErrorBody, error_body

log = logging.getLogger(__name__)
_FIELD = re.compile(r"^(?:invalid (?:job|request): )?([A-Za-z_][A-Za-z0-9_.-]*)(?: .*?)?: ")
_SOURCES = ("body", "query", "header", "path")


class ApiError(Exception):
    """A refusal: HTTP status, message, OpenAI error type, the field at fault, extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.headers, self.code = param, headers or {}, code


def field_of(message: str) -> str | None:
    """The field a contract message starts with (``prompt: ...`` -> ``prompt``)."""
    match = _FIELD.match(message)
    return match.group(1) if match else None


def not_found(job_id: str) -> ApiError:
    """The same answer for an unknown job and another key's job."""
    return ApiError(404, f"job {job_id!r}: no such job", "not_found_error", "job_id", code="job_not_found")


def _validation_status(request: Request) -> int:
    return 400 if request.url.path.startswith("/v1/images/") else 422


def _plain(error: dict[str, Any]) -> dict[str, Any]:
    """A FastAPI error located as the contract locates it: ``steps``, not ``body.steps``."""
    loc = tuple(error.get("loc", ()))
    if error.get("type") == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", "not valid JSON")
        return {**error, "loc": ("body",), "msg": f"not valid JSON ({reason}); send a JSON object"}
    if loc and loc[0] in _SOURCES:
        loc = loc[1:] or (loc[0],)
    if loc == ("body",) or not loc:
        return {
            **error,
            "loc": ("body",),
            "msg": "send a JSON object (a job: see the schema at /openapi.json)",
        }
    return {**error, "loc": loc}


def _respond(error: ApiError) -> JSONResponse:
    body = error_body(error.message, error.kind, error.param, error.code)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def install_handlers(app: FastAPI) -> None:
    """Map every expected exception to its 4xx/503 answer."""

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return _respond(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [_plain(dict(e)) for e in exc.errors()]
        lines = describe_errors(errors)
        message = "invalid request: " + "; ".join(lines)
        return _respond(
            ApiError(_validation_status(request), message, param=field_of(lines[0]) if lines else None)
        )

    @app.exception_handler(JobValidationError)
    async def _job(request: Request, exc: JobValidationError) -> JSONResponse:
        status = _validation_status(request)
        param = "image" if isinstance(exc, InputImageError) and status == 400 else field_of(str(exc))
        return _respond(ApiError(status, str(exc), param=param))

    @app.exception_handler(JobIdConflict)
    async def _conflict(_: Request, exc: JobIdConflict) -> JSONResponse:
        return _respond(ApiError(409, str(exc), param="Idempotency-Key", code="idempotency_conflict"))

    @app.exception_handler(BrokerUnavailable)
    @app.exception_handler(StorageUnavailable)
    async def _unavailable(_: Request, exc: Exception) -> JSONResponse:
        log.warning("backend unavailable: %s", exc)
        return _respond(ApiError(503, str(exc), "service_unavailable", headers={"Retry-After": "2"}))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _respond(ApiError(exc.status_code, str(exc.detail), kind, headers=dict(exc.headers or {})))


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "bad request (OpenAI-compatible endpoints)",
        401: "no or unknown API key",
        403: "this key may not do that (e.g. another lane)",
        404: "no such job (another key's jobs answer the same)",
        409: "Idempotency-Key reused for a different job",
        413: "upload too large",
        415: "upload is not a PNG, JPEG or WebP",
        422: "a field breaks the contract; the message names it",
        429: "rate limit or concurrency quota; see Retry-After",
        502: "the job failed in the worker (OpenAI-compatible endpoints)",
        503: "Redis or S3 unreachable; see Retry-After",
        504: "the images were not ready within the timeout (OpenAI-compatible endpoints)",
    }.items()
}
