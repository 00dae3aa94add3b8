"""JSON log lines with request ids; nothing a client sent is ever logged.

Each request gets an id (the client's ``X-Request-Id`` if it is a short token, else a random
one), echoed in the response header. One access line per request carries the route template,
status, duration and token counts: fields the service computed, never prompt or completion text,
never the query string or headers (API keys).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, g, request

access_log = logging.getLogger("tdllm.api.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line |= fields
        return json.dumps(line, separators=(",", ":"), default=str)


def logging_config(level: str) -> dict[str, Any]:
    """A `logging.config.dictConfig` document (gunicorn's logconfig_dict) for JSON output."""
    formatter = {"()": f"{__name__}.JsonFormatter"}
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": formatter},
        "handlers": {"stderr": handler},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": level.upper(), "handlers": [], "propagate": True},
            "gunicorn.access": {"level": "WARNING", "handlers": [], "propagate": False},
        },
    }


def install_request_logging(app: Flask, endpoint_observer: Any) -> None:
    """Request ids, the access line and the per-route metrics, at the end of each response."""

    @app.before_request
    def _begin() -> None:
        wanted = request.headers.get("X-Request-Id", "")
        g.request_id = wanted if _REQUEST_ID.fullmatch(wanted) else secrets.token_hex(8)
        g.started = time.monotonic()
        g.log_fields = {}

    @app.after_request
    def _end(response: Response) -> Response:
        request_id = getattr(g, "request_id", None) or secrets.token_hex(8)
        started = getattr(g, "started", time.monotonic())
        endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
        status = response.status_code
        fields = getattr(g, "log_fields", {})
        method = request.method
        response.headers["X-Request-Id"] = request_id

        def finished() -> None:  # after the last byte, so streams count their whole duration
            duration = time.monotonic() - started
            endpoint_observer(endpoint, status, duration)
            line = {
                "request_id": request_id,
                "method": method,
                "endpoint": endpoint,
                "status": status,
                "duration_ms": round(duration * 1000, 1),
            } | fields
            access_log.info("request", extra={"fields": line})

        response.call_on_close(finished)
        return response
