"""The fuzz targets: bytes in, one parser run; only the parser's documented errors may escape.

Each target also carries seeds (real inputs: Intel quotes and a CCEL log from
../shared/testvectors, a sealed manifest, valid requests), a Hypothesis strategy of inputs for
the engine-less runs (mutated seeds, structured JSON with lone surrogates, NaN, huge numbers,
deep nests) and, for libFuzzer, a dictionary of tokens. tdllm is imported inside the builders,
so that the atheris worker can import it under coverage instrumentation. `TARGETS` names them
all; what a target is lives in `target.py`, the input strategies in `inputs.py`, the E2E
envelope's two targets in `e2e_targets.py`.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from tests.conftest import TDX_VECTORS
from tests.fuzz.e2e_targets import e2e_client_target, e2e_server_target
from tests.fuzz.inputs import json_dictionary, json_inputs, json_mutated, mutated
from tests.fuzz.target import MODEL, Target

VECTORS = TDX_VECTORS


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
        json_inputs(docs, keys),
        json_dictionary(keys),
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
        json_dictionary(keys),
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
        json_inputs(docs, keys),
        json_dictionary(keys),
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
