"""A recording in-process transport for `E2eClient`: the bytes "on the wire", tamper hooks."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask.testing import FlaskClient

Events = list[dict[str, Any]]


@dataclass
class RecordingTransport:
    """The client's network, recorded: every byte sent and received lands in `wire`."""

    client: FlaskClient
    wire: list[bytes] = field(default_factory=list)
    tamper_get: Any = None
    tamper_post: Any = None
    tamper_answer: Any = None
    tamper_records: Callable[[Events], Events] | None = None
    streams: list[Events] = field(default_factory=list)  # every stream's records, as received
    posts: list[dict[str, Any]] = field(default_factory=list)  # every envelope, as sent
    headers: dict[str, str] = field(default_factory=dict)  # sent in clear with every request

    def get(self, path: str, params: dict[str, str]) -> Any:
        resp = self.client.get(path, query_string=params, headers=self.headers)
        self.wire += [json.dumps(params).encode(), resp.data]
        doc = resp.get_json()
        return self.tamper_get(doc) if self.tamper_get else doc

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        body = self.tamper_post(body) if self.tamper_post else body
        self.posts.append(body)
        resp = self.client.post(path, json=body, headers=self.headers)
        self.wire += [json.dumps(body).encode(), resp.data]
        doc = resp.get_json()
        return resp.status_code, self.tamper_answer(doc) if self.tamper_answer else doc

    def post_stream(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        body = self.tamper_post(body) if self.tamper_post else body
        self.posts.append(body)
        resp = self.client.post(path, json=body, headers=self.headers)
        self.wire += [json.dumps(body).encode(), resp.data]
        if resp.mimetype != "text/event-stream":
            return resp.status_code, iter(resp.data.split(b"\n"))
        events = [json.loads(line[6:]) for line in resp.data.split(b"\n") if line]
        self.streams.append(events)
        if self.tamper_records:
            events = self.tamper_records(events)
        lines = [b"data: " + json.dumps(e).encode() for e in events]
        return resp.status_code, iter([x for line in lines for x in (line, b"")])
