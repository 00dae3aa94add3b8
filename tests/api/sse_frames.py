"""Parse an SSE body the way a strict client would (every event is one `data:` line)."""

from __future__ import annotations

import json
from typing import Any


def parse_sse(body: str) -> tuple[list[dict[str, Any]], bool]:
    """(JSON events, whether the stream ended with [DONE]); asserts the framing."""
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    done = events[-1] == "data: [DONE]"
    payloads = events[:-1] if done else events
    out = []
    for event in payloads:
        assert event.startswith("data: ") and "\n" not in event
        out.append(json.loads(event[len("data: ") :]))
    return out, done
