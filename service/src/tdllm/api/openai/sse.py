"""Server-sent events framing as OpenAI streams it: ``data: {json}\\n\\n`` ... ``data: [DONE]``."""

from __future__ import annotations

import json
from typing import Any

DONE = "data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering
MIMETYPE = "text/event-stream"


def event(payload: dict[str, Any]) -> str:
    """One event; compact JSON never contains a raw newline, so one ``data:`` line suffices."""
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"
