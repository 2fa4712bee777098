"""Every error leaves the server as the OpenAI envelope `{"error": {"message", "type", "param", "code"}}`.

Handlers cover our own `APIError`, request validation (wrong types, bounds, malformed JSON), HTTP
exceptions (unknown route, wrong method) and, last, any other exception (logged, 500). A bad request can
never take the server down or leak a bare 500.
"""
from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("fbserve.server")

# HTTP status -> OpenAI error type
# (server/admission.py documents the choices for 401, 413, 429, 503 and 504)
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable", 504: "timeout_error"}


class APIError(Exception):
    """An error the client should see as-is: status, message, and the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


class ClientDisconnected(Exception):
    """The client went away before the response was ready; its generation was cancelled."""


def error_body(status: int, message: str, param: str | None = None, code: str | int | None = None) -> dict:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code)).model_dump()


def error_response(status: int, message: str, param: str | None = None, code: str | int | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def status_label(status: int) -> str:
    """The `requests_total{status}` label for an HTTP error status."""
    if status in (429, 503):
        return "rejected"
    return "invalid" if status < 500 else "error"


def _count(request: Request, status: int) -> None:
    """Count a failed generation request once, through its tracker when generation had started."""
    if request.method != "POST" or not request.url.path.startswith("/v1/"):
        return
    tracker = getattr(request.state, "tracker", None)
    if tracker is not None:
        tracker.finish(status_label(status))
        return
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.count_request(status_label(status))
        if status == 503:
            metrics.requests_rejected.labels(reason="loading").inc()


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        where = ".".join(loc)
        param = param or where or None
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        _count(request, exc.status)
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        _count(request, 400)
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        _count(request, exc.status_code)
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 413:  # a body that outgrew --max-body-bytes while being read
            request.app.state.metrics.requests_rejected.labels(reason="too_large").inc()
            return error_response(413, detail, code="request_too_large")
        return error_response(exc.status_code, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnected)
    async def _disconnected(request: Request, exc: ClientDisconnected) -> Response:
        # Nobody reads this; 499 (nginx's "client closed request") keeps the access log honest.
        tracker = getattr(request.state, "tracker", None)
        if tracker is not None:
            tracker.finish("cancelled")
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        _count(request, 500)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
