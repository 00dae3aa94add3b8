"""The one place that turns failures into OpenAI-shaped error bodies.

Every error leaves the service as ``{"error": {"message", "type", "param", "code"}}`` so that the
official clients raise their usual exception classes. Client mistakes are 4xx with a message for
people; anything unexpected is a bare 500 whose message names only the request id (the traceback
goes to the log, without exception messages, which might quote a prompt).
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, g, jsonify
from gunicorn.http.errors import ParseException  # type: ignore[import-untyped]
from werkzeug.exceptions import ClientDisconnected, HTTPException

from tdllm.errors import UsageError

log = logging.getLogger("tdllm.api")
RETRY_AFTER_S = 1  # the Retry-After of a 429 (a full inbox), in seconds


@dataclass
class ApiError(Exception):
    """A failure with its HTTP status and OpenAI error fields."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def queue_full() -> ApiError:
    return ApiError(
        429,
        "the service is at capacity; retry after a short delay",
        "rate_limit_error",
        None,
        "rate_limit_exceeded",
    )


def not_ready(reason: str) -> ApiError:
    return ApiError(
        503, f"the service is not ready: {reason}", "service_unavailable", None, "not_ready"
    )


_HTTP = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
}


def from_exception(exc: BaseException) -> ApiError:
    """Map any exception to the error the client sees."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UsageError):
        return invalid(str(exc))
    if isinstance(exc, ClientDisconnected) and isinstance(exc.__context__, TimeoutError):
        # werkzeug's name for a failed body read; under gunicorn a timeout there is the read
        # deadline of gunicorn_conf (a client sending its body too slowly)
        message = "the request body arrived too slowly (request_read_timeout_s)"
        return ApiError(408, message, "invalid_request_error", None, "request_timeout")
    if isinstance(exc, ParseException):  # gunicorn, reading a malformed chunked body
        return invalid("the request body's chunked framing is malformed", None, "invalid_body")
    if isinstance(exc, HTTPException) and exc.code is not None and exc.code < 500:
        kind, code = _HTTP.get(exc.code, ("invalid_request_error", None))
        message = {
            413: "the request body is too large",
            404: "no such endpoint",
            405: "method not allowed on this endpoint",
            400: "the request body is not valid JSON",
            408: "the request body arrived too slowly",
        }.get(exc.code, exc.description or "bad request")
        return ApiError(exc.code, message, kind, None, code)
    request_id = getattr(g, "request_id", "-")
    return ApiError(500, f"internal error (request id {request_id})", "server_error", None, None)


def error_response(error: ApiError) -> Response:
    response = jsonify(error.body())
    response.status_code = error.status
    if error.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    if error.status == 429:  # the inbox drains at decode speed: a short wait usually suffices
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(Exception)
    def _handle(exc: Exception) -> Response:
        error = from_exception(exc)
        if isinstance(exc, ApiError):  # a deliberate answer (503 not ready, 4xx): no frames
            if error.status >= 500:
                log.warning("%d %s", error.status, error.code or error.type)
        elif error.status >= 500:
            # type and frames only: exception messages may quote request content
            frames = "".join(traceback.format_tb(exc.__traceback__))
            log.error("unhandled %s\n%s", type(exc).__name__, frames)
        return error_response(error)
