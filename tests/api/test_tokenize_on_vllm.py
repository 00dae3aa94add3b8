"""/tokenize and /detokenize on the vllm engine: the front forwards them to vLLM's own endpoints.
A stand-in vLLM on a Unix socket shows what is forwarded, what the front refuses before vLLM
sees it (the same 4xx as on our engine), and that vLLM's failures reach the client as a 502
without its internals (tests/vllm runs the real vLLM).
"""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, cast

import pytest
from flask.testing import FlaskClient

from tdllm.api.app import create_app
from tdllm.vllm_engine.backend import VllmBackend

from .conftest import MODEL, api_settings
from .test_request_validation import assert_openai_error
from .test_tokenize import QUESTION, ok_json


@dataclass
class StandInVllm:
    """vLLM's /tokenize and /detokenize on a Unix socket: counts a character a token, so that
    a long prompt is over the context; "boom" makes it fail (500), "bad" refuse (400)."""

    socket_path: str
    received: list[tuple[str, Any]] = field(default_factory=list)
    alive: bool = True
    stopping: bool = False
    process: None = None

    def answer(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        self.received.append((path, body))
        text = body.get("prompt")
        if text == "boom":
            return 500, {"error": {"message": "Traceback: secret internals", "code": 500}}
        if text == "bad":
            return 400, {"error": {"message": "vLLM says no", "param": "body.prompt"}}
        if path == "/detokenize":
            return 200, {"prompt": "".join(chr(96 + t % 26) for t in body["tokens"])}
        ids = [ord(c) % 100 for c in text] if text is not None else [7] * 3 * len(body["messages"])
        strs = [str(i) for i in ids] if body.get("return_token_strs") else None
        return 200, {"count": len(ids), "max_model_len": 64, "tokens": ids, "token_strs": strs}

    def stop(self, timeout_s: float = 5.0) -> None:
        self.stopping = True


@pytest.fixture
def vllm(tmp_path: Path) -> Iterator[tuple[StandInVllm, FlaskClient]]:
    stand_in = StandInVllm(str(tmp_path / "vllm.sock"))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            status, doc = stand_in.answer(self.path, json.loads(self.rfile.read(length)))
            payload = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = socketserver.ThreadingUnixStreamServer(stand_in.socket_path, Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    backend = VllmBackend(
        cast(Any, stand_in),
        model_name=MODEL,
        max_model_len=64,
        vocab_size=100,
        capacity=4,
        protection={"profile": "td-only", "device": None, "k": None},
    )
    settings = api_settings(engine="vllm", vllm_python="/x/py")  # never started here
    app = create_app(settings, engine_runner=cast(Any, backend))
    yield stand_in, app.test_client()
    server.shutdown()
    server.server_close()


def test_on_vllm_tokenize_is_vllms_own_answer(vllm: tuple[StandInVllm, FlaskClient]) -> None:
    stand_in, client = vllm
    body = {"prompt": "hello", "add_special_tokens": False, "return_token_strs": True}
    answer = ok_json(client.post("/tokenize", json=body))
    assert answer == {
        "count": 5,
        "max_model_len": 64,
        "tokens": [4, 1, 8, 8, 11],
        "token_strs": ["4", "1", "8", "8", "11"],
    }
    assert stand_in.received == [("/tokenize", body | {"model": MODEL})]  # the served model
    chat = {"model": MODEL, "messages": QUESTION, "add_generation_prompt": False, "tools": []}
    assert ok_json(client.post("/tokenize", json=chat))["count"] > 5
    assert stand_in.received[-1] == ("/tokenize", chat)
    assert ok_json(client.get("/v1/models"))["data"][0]["max_model_len"] == 64


def test_on_vllm_detokenize_is_vllms_own_answer(vllm: tuple[StandInVllm, FlaskClient]) -> None:
    stand_in, client = vllm
    assert ok_json(client.post("/detokenize", json={"tokens": [1, 2, 3]})) == {"prompt": "abc"}
    assert stand_in.received == [("/detokenize", {"model": MODEL, "tokens": [1, 2, 3]})]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
        ("/tokenize", {"model": 7, "prompt": "hi"}, 400, "model"),
        ("/tokenize", {"messages": QUESTION, "chat_template": "{{ 7*7 }}"}, 400, "chat_template"),
        ("/tokenize", {"prompt": "hi", "chat_template_kwargs": {}}, 400, None),
        ("/tokenize", {"prompt": "hi", "mm_processor_kwargs": {}}, 400, None),
        ("/tokenize", {"prompt": "hi", "max_tokens": 1}, 400, "max_tokens"),
        ("/detokenize", {"model": "gpt-4", "tokens": [1]}, 404, "model"),
        ("/detokenize", {"tokens": [100]}, 400, "tokens"),  # the vocabulary is 100 here
        ("/detokenize", {"tokens": [2**40]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"tokens": [1] * 65}, 400, "tokens"),  # max_model_len is 64
        ("/detokenize", {"tokens": ["a"]}, 400, "tokens"),
    ],
)
def test_on_vllm_the_front_refuses_before_vllm_sees_the_request(
    vllm: tuple[StandInVllm, FlaskClient],
    path: str,
    body: dict[str, Any],
    status: int,
    param: str | None,
) -> None:
    stand_in, client = vllm
    assert_openai_error(client.post(path, json=body), status, param)
    assert stand_in.received == []


def test_on_vllm_a_count_over_the_context_is_refused_as_completions_would(
    vllm: tuple[StandInVllm, FlaskClient],
) -> None:
    _stand_in, client = vllm
    error = assert_openai_error(client.post("/tokenize", json={"prompt": "x" * 64}), 400, "prompt")
    assert error["code"] == "context_length_exceeded"
    assert ok_json(client.post("/tokenize", json={"prompt": "x" * 63}))["count"] == 63


def test_on_vllm_its_refusals_are_ours_and_its_failures_a_502(
    vllm: tuple[StandInVllm, FlaskClient],
) -> None:
    _stand_in, client = vllm
    refused = assert_openai_error(client.post("/tokenize", json={"prompt": "bad"}), 400, "prompt")
    assert refused["message"] == "vLLM says no"
    failed = assert_openai_error(client.post("/tokenize", json={"prompt": "boom"}), 502)
    assert "secret" not in failed["message"]
