"""The fuzz targets: bytes in, one parser run; only the parser's documented errors may escape.

Each target also carries seeds (real inputs: Intel quotes and a CCEL log from
../shared/testvectors, a sealed manifest, valid requests), a Hypothesis strategy of inputs for
the engine-less runs (mutated seeds, structured JSON with lone surrogates, NaN, huge numbers,
deep nests) and, for libFuzzer, a dictionary of tokens. tdllm is imported inside the builders,
so that the atheris worker can import it under coverage instrumentation.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from tests.conftest import TDX_VECTORS

VECTORS = TDX_VECTORS
MODEL = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Target:
    """One target; its builder takes `full` (make fuzz: the slower, more faithful setup)."""

    name: str
    allowed: tuple[type[BaseException], ...]  # the documented errors: these may escape
    run: Callable[[bytes], object]
    seeds: tuple[bytes, ...]
    strategy: st.SearchStrategy[bytes]
    dictionary: tuple[bytes, ...] = field(default=())

    def check(self, data: bytes) -> None:
        """Run one input; raises only for a crash (an error that is not documented)."""
        try:
            self.run(data)
        except self.allowed:
            pass


class ServerError(Exception):
    """A target's oracle: the service answered 5xx where a client mistake must be a 4xx."""


# -- input strategies --------------------------------------------------------------------------

INTERESTING_U32 = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF)
NOT_TEXT = ("\ud800", "\udfff", "\udc00\ud800", "\x00", "a\x00b", "\ufeff", "\U0010ffff")


@st.composite
def _mutated(draw: st.DrawFn, seeds: Sequence[bytes]) -> bytes:
    """A seed with a few byte-level edits: flips, overwrites, cuts, inserts, 32-bit fields."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        op = draw(st.sampled_from(("flip", "byte", "truncate", "delete", "insert", "u32")))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "u32":
            data[pos : pos + 4] = draw(st.sampled_from(INTERESTING_U32)).to_bytes(4, "little")
    return bytes(data)


def mutated(seeds: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    return _mutated(seeds)


TEXT = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=12),  # surrogates included
    st.sampled_from(NOT_TEXT),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from((0, 1, -1, 2**63, 2**64, 10**20, -(10**25), 10**300)),
    st.floats(),  # NaN and infinities too: json.dumps writes them as NaN / Infinity
    TEXT,
)
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4)
)


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _paths(item, (*path, i))
    return out


def _replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    copy: Any = dict(value) if isinstance(value, dict) else list(value)
    copy[head] = _replaced(value[head], rest, new)
    return copy


@st.composite
def _json_mutated(draw: st.DrawFn, docs: Sequence[Any], keys: Sequence[str]) -> bytes:
    """A seed document with values swapped for arbitrary JSON (or extra keys added), encoded
    as JSON text that may hold NaN, CESU-8 surrogates or a deep nest."""
    doc = draw(st.sampled_from(docs))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        target = doc
        for step in path:
            target = target[step]
        if isinstance(target, dict) and draw(st.booleans()):
            key = draw(st.sampled_from(keys) | TEXT)
            doc = _replaced(doc, path, target | {key: draw(JSON_VALUES)})
        else:
            doc = _replaced(doc, path, draw(JSON_VALUES))
    if draw(st.integers(0, 9)) == 0:  # a deep nest where the chosen value was
        depth = draw(st.sampled_from((31, 32, 33, 1000, 50_000)))
        nest = "[" * depth + "]" * depth
        text = json.dumps(doc).replace("null", nest, 1)
    else:
        text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")


def json_mutated(docs: Sequence[Any], keys: Sequence[str] = ()) -> st.SearchStrategy[bytes]:
    return _json_mutated(docs, keys)


def _json_inputs(docs: Sequence[Any], keys: Sequence[str] = ()) -> st.SearchStrategy[bytes]:
    seeds = [json.dumps(d).encode() for d in docs]
    return st.one_of(json_mutated(docs, keys), mutated(seeds), st.binary(max_size=64))


JSON_TOKENS = (
    b"{",
    b"}",
    b"[",
    b"]",
    b'"',
    b":",
    b",",
    b"null",
    b"true",
    b"false",
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1e400",
    b"-0",
    b"99999999999999999999999",
    b"\\ud800",
    b"\\udc00",
    b"\\u0000",
    b"\\ud83d\\ude00",
    b"\xed\xa0\x80",
    b"\xc0\xaf",
    b"\xef\xbb\xbf",
)


def _json_dictionary(keys: Sequence[str]) -> tuple[bytes, ...]:
    return JSON_TOKENS + tuple(json.dumps(k).encode() for k in keys)


# -- quote parser --------------------------------------------------------------------------------


def quote_target(full: bool = False) -> Target:
    from tdllm_attest.abi import parse_quote
    from tdllm_attest.errors import QuoteParseError

    def run(data: bytes) -> None:
        quote = parse_quote(data)
        _ = quote.signed_region
        quote.td_report.registers()
        _ = (quote.td_report.debug, quote.td_report.sept_ve_disable)
        chain = quote.signature_data.pck_chain
        _ = (chain.leaf_der, chain.intermediate_der, chain.root_der)

    seeds = tuple(p.read_bytes() for p in sorted(VECTORS.glob("*quote*.bin")))
    if not seeds:  # without the shared vectors: a simulated quote has the same framing
        from datetime import UTC, datetime

        from tdllm_attest.testing.platform import SimulatedTdxPlatform

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seeds = (SimulatedTdxPlatform(datetime.now(UTC)).quote(),)
    strategy = st.one_of(mutated(seeds), st.binary(max_size=256))
    return Target("quote", (QuoteParseError,), run, seeds, strategy)


# -- event logs ----------------------------------------------------------------------------------


def ccel_target(full: bool = False) -> Target:
    """First byte even: the 56-byte ACPI table; odd: the TCG2 log, replayed into RTMRs."""
    from tdllm_attest.errors import EventLogError
    from tdllm_attest.eventlog import parse_ccel_log, parse_ccel_table, replay

    def run(data: bytes) -> None:
        if not data:
            return
        if data[0] % 2 == 0:
            parse_ccel_table(data[1:])
        else:
            replay(parse_ccel_log(data[1:]))

    seeds: tuple[bytes, ...] = ()
    if (VECTORS / "gotdxguest_cos113_ccel_table.bin").is_file():
        table = (VECTORS / "gotdxguest_cos113_ccel_table.bin").read_bytes()
        log = (VECTORS / "gotdxguest_cos113_ccel_data.bin").read_bytes().rstrip(b"\xff\x00")
        seeds = (b"\x00" + table, b"\x01" + log + bytes(8))
    else:
        seeds = (b"\x01" + bytes(64),)
    strategy = st.one_of(mutated(seeds), st.binary(max_size=128))
    return Target(
        "ccel",
        (EventLogError,),
        run,
        seeds,
        strategy,
    )


def runtime_log_target(full: bool = False) -> Target:
    """JSON text as a caller holds it: from a file (strict UTF-8) or out of a JSON document,
    where escapes can make any code point, lone surrogates included."""
    from tdllm_attest.errors import EventLogError
    from tdllm_attest.eventlog import parse_runtime_log, replay

    def run(data: bytes) -> None:
        try:
            text = data.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return  # no caller hands the parser bytes that are not text
        replay(parse_runtime_log(text))

    docs = [
        {"events": []},
        {"events": [{"digest": "ab" * 48, "description": "tdllm model"}]},
        {"events": [{"digest": "00" * 48}, {"digest": "ff" * 48, "description": "x"}]},
    ]
    keys = ("events", "digest", "description")
    return Target(
        "runtime-log",
        (EventLogError,),
        run,
        tuple(json.dumps(d).encode() for d in docs),
        _json_inputs(docs, keys),
        _json_dictionary(keys),
    )


# -- sealed manifest -----------------------------------------------------------------------------


def sealed_manifest_target(full: bool = False) -> Target:
    """The manifest file of a real (tiny) sealed model, rewritten per input; its data files stay.

    First byte, bit 0: re-MAC the manifest with the model's key first, so that the code after
    the MAC check (tensor table, config, tokenizer, streaming) is reached too (that is what a
    key holder could write); bit 1: open with the recipient's private key (the JWE unwrap)
    instead of the raw data key; bit 2: expect another model version; bit 3: two threads.
    """
    from cryptography.hazmat.primitives import hashes, hmac

    from tdllm.sealing import format as fmt
    from tdllm.sealing.errors import SealedModelError
    from tdllm.sealing.reader import open_sealed
    from tdllm.sealing.recipients import load_public_key, write_key_pair
    from tdllm_lab.sealing.writer import seal_checkpoint
    from tests.sealing.synthetic import SMALL_CHUNK, synthetic_checkpoint

    work = Path(tempfile.mkdtemp(prefix="tdllm-fuzz-sealed-"))
    atexit.register(shutil.rmtree, work, True)
    public, private = write_key_pair(work / "owner", "X25519")
    data_key = bytes(range(32))
    folder = work / "sealed"
    seal_checkpoint(
        synthetic_checkpoint(),
        folder,
        [load_public_key(public)],
        data_key=data_key,
        chunk_size=SMALL_CHUNK,
    )
    manifest_path = folder / fmt.MANIFEST_NAME
    seed = manifest_path.read_bytes()
    other_version = fmt.ModelVersion("tiny", 2)

    def remac(document: bytes) -> bytes:
        try:
            doc = json.loads(document)
            model_id = doc["manifest"]["model_id"]
            mac = hmac.HMAC(fmt.derive_key(data_key, model_id, fmt.MAC_KEY), hashes.SHA256())
            mac.update(fmt.canonical_json(doc["manifest"]))
            doc["mac"] = mac.finalize().hex()
            return fmt.canonical_json(doc)
        except Exception:  # the harness's own failure: feed the input unchanged
            return document

    def run(data: bytes) -> None:
        flags, document = (data[0], data[1:]) if data else (0, b"")
        manifest_path.write_bytes(remac(document) if flags & 1 else document)
        checkpoint = open_sealed(
            folder,
            private if flags & 2 else None,
            data_key=None if flags & 2 else data_key,
            expect=other_version if flags & 4 else None,
            threads=2 if flags & 8 else 1,
        )
        for _ in checkpoint.tensors():
            pass

    seed_doc = json.loads(seed)
    keys = (*seed_doc, *seed_doc["manifest"], "tensors", "shape", "dtype", "offset", "length")
    strategy = st.builds(
        lambda flags, doc: bytes([flags]) + doc,
        st.integers(0, 15),
        st.one_of(json_mutated([seed_doc], keys), mutated([seed])),
    )
    return Target(
        "sealed-manifest",
        (SealedModelError,),
        run,
        tuple(bytes([f]) + seed for f in (0, 1, 3, 9)),
        strategy,
        _json_dictionary(keys),
    )


# -- the E2E envelope ----------------------------------------------------------------------------


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
        EXPORTER_LABEL,
        INFO,
        SUITE,
        E2eDecryptError,
        ExchangeKeys,
        StreamOpener,
        open_response,
        pad,
    )
    from tdllm_attest.wire import b64url

    missing = Path(tempfile.gettempdir()) / f"tdllm-fuzz-no-model-{os.getpid()}.gguf"
    settings = Settings(model=str(missing), max_body_bytes=1 << 20, e2e_record_interval_ms=0)
    app = create_app(settings)
    client = app.test_client()
    identity = app.extensions["tdllm"].identity
    public = identity.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    signing = identity.signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def seal(plaintext: bytes) -> tuple[bytes, ExchangeKeys]:
        enc, context = SUITE.create_sender_context(SUITE.kem.deserialize_public_key(public), INFO)
        ciphertext = context.seal(pad(plaintext))
        keys = ExchangeKeys(
            request_sha256=hashlib.sha256(enc + ciphertext).digest(),
            enc_sha256=hashlib.sha256(enc).digest(),
            secret=context.export(EXPORTER_LABEL, 32),
        )
        return json.dumps({"enc": b64url(enc), "ciphertext": b64url(ciphertext)}).encode(), keys

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
        st.builds(lambda b: b"\x01" + b, _json_inputs(docs, keys_)),
        st.builds(lambda b: b"\x00" + b, _json_inputs(outer, ("enc", "ciphertext"))),
    )
    return Target(
        "e2e-server",
        (),
        run,
        (*plain, b"\x00" + json.dumps(outer[0]).encode()),
        strategy,
        _json_dictionary(keys_),
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
        st.builds(lambda b: b"\x00" + b, _json_inputs([whole], fields)),
        st.builds(lambda b: b"\x01" + b, _json_inputs(records, fields)),
        mutated(seeds),
    )
    return Target(
        "e2e-client",
        (E2eDecryptError,),
        run,
        seeds,
        strategy,
        _json_dictionary(fields),
    )


# -- the OpenAI request validation ---------------------------------------------------------------

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_tokenizer() -> Any:
    from tdllm.model.tokenizer import Tokenizer
    from tests.sealing.synthetic import tiny_tokenizer

    tiny = tiny_tokenizer()
    return Tokenizer(tiny.backend, bos_token_id=0, eos_token_id=1, chat_template=CHATML)


def openai_request_target(full: bool = False) -> Target:
    """decode_body, then parse_completion, parse_chat, parse_tokenize and parse_detokenize,
    then what the handlers do next with an accepted request before the engine: tokenize it (the
    chat template first). Accepted
    requests must hold only what later code can take (checked: Unicode text without NUL,
    numbers in range). `full` (make fuzz): the bundled model's tokenizer and chat template (7 s
    to load); else a tiny one with a ChatML template (the same `tokenizers` library, so the same
    input contract)."""
    import math

    from tdllm.api.errors import ApiError
    from tdllm.api.openai.protocol import (
        decode_body,
        parse_chat,
        parse_completion,
        parse_detokenize,
        parse_tokenize,
    )
    from tdllm.api.openai.request_fields import (
        CHAT_FIELDS,
        COMPLETION_FIELDS,
        DETOKENIZE_FIELDS,
        MAX_SEED,
        TOKENIZE_CHAT_FIELDS,
        TOKENIZE_COMPLETION_FIELDS,
    )
    from tdllm.errors import UsageError

    if full:
        from tdllm.sources import open_checkpoint

        tokenizer = open_checkpoint("bundled").tokenizer
    else:
        tokenizer = _tiny_tokenizer()

    def text(value: str) -> str:
        value.encode("utf-8")  # UnicodeEncodeError: a lone surrogate got through
        if "\x00" in value:
            raise AssertionError("a NUL got through")
        return value

    def sampling_ok(s: Any) -> None:
        assert 0 <= s.temperature <= 2 and 0 < s.top_p <= 1, s
        assert math.isfinite(s.temperature) and math.isfinite(s.top_p), s
        assert s.seed is None or 0 <= s.seed <= MAX_SEED, s
        assert s.max_tokens is None or s.max_tokens >= 1, s
        assert all(isinstance(x, str) and x for x in s.stop) and len(s.stop) <= 4, s
        for value in (s.model, *s.stop):
            text(value)

    def run(data: bytes) -> None:
        body = decode_body(data)
        for parse in (parse_completion, parse_chat):
            try:
                parsed = parse(body)
            except ApiError:
                continue
            sampling_ok(parsed.sampling)
            if hasattr(parsed, "messages"):
                rendered = tokenizer.apply_chat_template(parsed.messages)
                tokenizer.encode(text(rendered))
            else:
                assert parsed.prompts
                for prompt in parsed.prompts:
                    if isinstance(prompt, str):
                        tokenizer.encode(text(prompt))
                    else:
                        assert prompt and all(type(t) is int and 0 <= t < 10**20 for t in prompt)
        try:
            tokenize = parse_tokenize(body)
        except ApiError:
            pass
        else:
            assert tokenize.model is None or text(tokenize.model)
            if tokenize.messages is not None:
                rendered = tokenizer.apply_chat_template(
                    tokenize.messages, tokenize.add_generation_prompt
                )
                tokenizer.encode(text(rendered), tokenize.add_special_tokens)
            else:
                tokenizer.encode(text(tokenize.prompt or ""), tokenize.add_special_tokens)
        try:
            detokenize = parse_detokenize(body)
        except ApiError:
            pass
        else:
            assert all(type(t) is int and 0 <= t < 10**20 for t in detokenize.tokens)

    docs = [
        {"model": MODEL, "prompt": "The three primary colors are", "max_tokens": 8},
        {"model": MODEL, "prompt": [1, 2, 3], "stream": True, "stream_options": {}},
        {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "a"},
            ],
            "temperature": 0.7,
            "top_p": 0.9,
            "seed": 7,
            "stop": ["\n", "."],
            "metadata": {"k": "v"},
            "max_completion_tokens": 5,
        },
    ]
    docs += [
        {"model": MODEL, "prompt": "hi", "add_special_tokens": False, "return_token_strs": True},
        {"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": False},
        {"model": MODEL, "tokens": [1, 2, 3]},
    ]
    requests = CHAT_FIELDS | COMPLETION_FIELDS | TOKENIZE_COMPLETION_FIELDS | TOKENIZE_CHAT_FIELDS
    keys = (*sorted(requests | DETOKENIZE_FIELDS), "role", "content", "type", "text")
    return Target(
        "openai-request",
        (ApiError, UsageError),
        run,
        tuple(json.dumps(d).encode() for d in docs),
        _json_inputs(docs, keys),
        _json_dictionary(keys),
    )


# name -> (the code under test, its builder)
TARGETS: dict[str, tuple[str, Callable[[bool], Target]]] = {
    "quote": ("tdllm_attest.abi.parse_quote", quote_target),
    "ccel": ("tdllm_attest.eventlog CCEL table, log, replay", ccel_target),
    "runtime-log": ("tdllm_attest.eventlog.parse_runtime_log", runtime_log_target),
    "sealed-manifest": ("tdllm.sealing.reader.open_sealed", sealed_manifest_target),
    "e2e-server": ("tdllm.api.e2e through the app", e2e_server_target),
    "e2e-client": ("tdllm_attest.client.e2e_protocol", e2e_client_target),
    "openai-request": ("tdllm.api.openai.protocol + tokenizer", openai_request_target),
}
