"""Fuzz targets for the E2E envelope: the service's side (a sealed request through the app) and
the client's (`tdllm_attest.client.e2e_protocol` opening a sealed answer)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from tests.fuzz.inputs import json_dictionary, json_inputs, mutated
from tests.fuzz.target import MODEL, ServerError, Target


def _e2e_request(content: str = "hi", **options: Any) -> dict[str, Any]:
    request = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    return {"api_key": None, "request": request | options}


def e2e_server_target(full: bool = False) -> Target:
    """POST /v1/e2e/chat/completions on the real app (its engine not running, so every request
    that gets through validation ends in a sealed 503 `not_ready`). First byte even: the input
    is the outer body; odd: it is the plaintext, sealed to the service key here. Oracle: the
    outer status is never 5xx, and neither is the sealed one, but for that 503."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from tdllm.api.app import create_app
    from tdllm.settings import Settings
    from tdllm_attest.client.e2e_protocol import (
        E2eDecryptError,
        ExchangeKeys,
        StreamOpener,
        open_response,
        seal_plaintext,
    )

    missing = Path(tempfile.gettempdir()) / f"tdllm-fuzz-no-model-{os.getpid()}.gguf"
    settings = Settings(model=str(missing), max_body_bytes=1 << 20, e2e_record_interval_ms=0)
    app = create_app(settings)
    client = app.test_client()
    identity = app.extensions["tdllm"].identity
    public = identity.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    signing = identity.signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def seal(plaintext: bytes) -> tuple[bytes, ExchangeKeys]:
        envelope, keys = seal_plaintext(public, plaintext)
        return json.dumps(envelope).encode(), keys

    def sealed_status(response: Any, keys: ExchangeKeys) -> int:
        if response.mimetype != "text/event-stream":
            status, _ = open_response(keys, signing, response.get_json())
            return status
        opener = StreamOpener(keys, signing)
        status = 200
        for line in response.get_data(as_text=True).splitlines():
            if line.startswith("data: "):
                final, value = opener.open(json.loads(line[len("data: ") :]))
                if final:
                    status = value["status"]
        opener.finish()
        return status

    def run(data: bytes) -> None:
        if not data:
            return
        keys = None
        body = data[1:]
        if data[0] % 2:
            body, keys = seal(data[1:])
        response = client.post(
            "/v1/e2e/chat/completions", data=body, content_type="application/json"
        )
        if response.status_code >= 500:
            raise ServerError(f"the E2E endpoint answered {response.status_code}")
        if keys is not None and response.status_code == 200:
            try:
                status = sealed_status(response, keys)
            except E2eDecryptError as exc:  # our own answer must open
                raise ServerError(f"the sealed answer does not open: {exc}") from None
            if status >= 500 and status != 503:
                raise ServerError(f"the sealed answer says {status}")

    docs = [
        _e2e_request(),
        _e2e_request("hello", stream=True, max_tokens=2),
        _e2e_request("x", temperature=0.5, stop=["a"], metadata={"k": "v"}),
        {"api_key": "k" * 24, "request": _e2e_request()["request"]},
    ]
    outer = [{"enc": "A" * 43, "ciphertext": "B" * 64}]
    plain = [b"\x01" + json.dumps(d).encode() for d in docs]
    keys_ = ("api_key", "request", "model", "messages", "role", "content", "stream", "enc")
    strategy = st.one_of(
        st.builds(lambda b: b"\x01" + b, json_inputs(docs, keys_)),
        st.builds(lambda b: b"\x00" + b, json_inputs(outer, ("enc", "ciphertext"))),
    )
    return Target(
        "e2e-server",
        (),
        run,
        (*plain, b"\x00" + json.dumps(outer[0]).encode()),
        strategy,
        json_dictionary(keys_),
    )


def e2e_client_target(full: bool = False) -> Target:
    """What a client opens from the host: a whole sealed answer (first byte even) or a stream of
    records, one JSON per line (odd). Only E2eDecryptError may escape."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from tdllm_attest.client.e2e_protocol import (
        E2eDecryptError,
        ExchangeKeys,
        StreamOpener,
        StreamSealer,
        open_response,
        seal_response,
    )

    keys = ExchangeKeys(request_sha256=bytes(32), enc_sha256=bytes(32), secret=bytes(range(32)))
    signer = Ed25519PrivateKey.from_private_bytes(bytes(32))
    signing = signer.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def run(data: bytes) -> None:
        if not data:
            return
        lines = data[1:].split(b"\n")
        try:
            values = [json.loads(line) for line in lines]
        except (ValueError, RecursionError):
            return  # the transport's JSON decoding, not the protocol
        if data[0] % 2 == 0:
            open_response(keys, signing, values[0])
            return
        opener = StreamOpener(keys, signing)
        for value in values:
            opener.open(value)
        opener.finish()

    sealer = StreamSealer(keys, signer)
    records = [sealer.record([{"x": 1}]), sealer.final(200, None)]
    whole = seal_response(keys, signer, 200, {"ok": True})
    seeds = (
        b"\x00" + json.dumps(whole).encode(),
        b"\x01" + b"\n".join(json.dumps(r).encode() for r in records),
    )
    fields = ("salt", "nonce", "ciphertext", "signature", "final")
    strategy = st.one_of(
        st.builds(lambda b: b"\x00" + b, json_inputs([whole], fields)),
        st.builds(lambda b: b"\x01" + b, json_inputs(records, fields)),
        mutated(seeds),
    )
    return Target(
        "e2e-client",
        (E2eDecryptError,),
        run,
        seeds,
        strategy,
        json_dictionary(fields),
    )
