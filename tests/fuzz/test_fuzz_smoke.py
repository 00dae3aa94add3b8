"""A short smoke of every fuzz target (Hypothesis, derandomized), and every crash found, kept as
a regression: only a target's documented errors may escape it (tests/fuzz/targets.py).

`make fuzz` runs the same targets for minutes under atheris; this file takes seconds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings

from tdllm.sealing.format import CHUNK_OVERHEAD
from tests.fuzz.targets import TARGETS, Target

pytestmark = pytest.mark.fuzz

EXAMPLES = {"sealed-manifest": 60, "e2e-server": 100, "openai-request": 150}  # the slower ones
MODEL = "SmolLM2-135M-Instruct"
DIGEST = "ab" * 48


@pytest.fixture(scope="module")
def built() -> Iterator[dict[str, Target]]:
    cache: dict[str, Target] = {}
    yield cache


def _target(built: dict[str, Target], name: str) -> Target:
    if name not in built:
        built[name] = TARGETS[name][1](False)
    return built[name]


@pytest.mark.parametrize("name", TARGETS)
def test_only_documented_errors_escape_the_target(built: dict[str, Target], name: str) -> None:
    target = _target(built, name)
    for seed in target.seeds:
        target.check(seed)

    @settings(
        max_examples=EXAMPLES.get(name, 200),
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(target.strategy)
    def smoke(data: bytes) -> None:
        target.check(data)

    smoke()


# Every crash a target reproduces, as (target, input): each made the previous commit's code raise
# something its parser does not document (the service's 500s were first found by the attack
# tests of tests/api/test_malformed_input.py; the runtime log's by fuzzing and its target).
CRASHES = {
    # parse_runtime_log: json.loads' RecursionError escaped (the client SDK, the broker and
    # /v1/attestation all take this log from outside)
    "runtime log nested past the recursion limit": (
        "runtime-log",
        b'{"events": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ),
    # parse_runtime_log: a \ud800 escape in a description made description.encode() raise
    # UnicodeEncodeError (a 500 on /v1/attestation, a traceback in tdllm-chat)
    "runtime log description with a lone surrogate": (
        "runtime-log",
        b'{"events": [{"digest": "' + DIGEST.encode() + b'", "description": "\\ud800"}]}',
    ),
    # the reported one: protocol.py accepted a lone surrogate, the tokenizer raised TypeError
    "chat content with a lone surrogate": (
        "openai-request",
        b'{"model": "M", "messages": [{"role": "user", "content": "\\ud800"}]}',
    ),
    "completion prompt as CESU-8 surrogate bytes": (
        "openai-request",
        b'{"model": "M", "prompt": "\xed\xa0\x80"}',
    ),
    "request nested past the recursion limit": (
        "openai-request",
        b'{"model": "M", "prompt": "hi", "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ),
    "E2E envelope nested past the recursion limit": (
        "e2e-server",
        b'\x00{"enc": ' + b"[" * 5000 + b"]" * 5000 + b', "ciphertext": "AA"}',
    ),
}


@pytest.mark.parametrize(("name", "data"), CRASHES.values(), ids=CRASHES.keys())
def test_crashes_stay_fixed(built: dict[str, Target], name: str, data: bytes) -> None:
    _target(built, name).check(data.replace(b'"M"', f'"{MODEL}"'.encode()))


def test_an_authenticated_empty_tensor_with_a_dimension_past_int64_is_refused(
    built: dict[str, Target],
) -> None:
    """Found fuzzing: shape [0, 2**64] passes the size checks (no bytes), and torch.empty raised
    TypeError from the tensor stream, outside the reader's one opaque error. Re-MACed (first
    byte 1): what a key holder could write."""
    target = _target(built, "sealed-manifest")
    document = json.loads(target.seeds[0][1:])
    row = document["manifest"]["tensors"][0]
    row |= {"shape": [0, 2**64], "chunks": 1, "length": CHUNK_OVERHEAD}
    target.check(b"\x01" + json.dumps(document).encode())
