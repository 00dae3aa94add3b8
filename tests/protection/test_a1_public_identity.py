"""A1: everything a device held or received during a generation is public.

The dump is the device's transcript (every crossing byte, both ways) plus everything resident
on it (weights and KV caches). It must contain zero bytes of non-public weights (distinctive
byte windows of every private tensor are searched for), and every device weight must hash to
the pinned public checkpoint.
"""

from __future__ import annotations

import pytest
import torch

from tdllm.trusted.crossing import Crossing
from tdllm.untrusted.transcript import tensor_bytes
from tdllm_lab.protection.private_model import is_private
from tests.protection.conftest import CFG, K
from tests.protection.engine_runs import greedy_tokens

WINDOW = 16  # bytes: four fp32 values


def windows(tensor: torch.Tensor, count: int = 8) -> list[bytes]:
    data = tensor_bytes(tensor.float())
    step = max(1, (len(data) - WINDOW) // count) // 4 * 4
    return [data[i : i + WINDOW] for i in range(0, len(data) - WINDOW, step)][:count]


@pytest.mark.parametrize("device", ["cpu", "process"])
def test_device_never_holds_or_receives_a_private_weight_byte(
    device, private_tensors, reference, split_on
) -> None:  # type: ignore[no-untyped-def]
    from tests.protection.conftest import checkpoint_of

    crossing = Crossing.open(device, keep_payloads=True)
    model = split_on(checkpoint_of("tiny-private", private_tensors), reference, crossing)
    greedy_tokens(model)
    held = crossing.dump()
    haystack = b"".join(r.payload or b"" for r in crossing.transcript.records)
    haystack += b"".join(tensor_bytes(t) for t in held.values())
    assert len(haystack) > 100_000

    private = {n: t for n, t in private_tensors.items() if is_private(n, CFG, K)}
    assert len(private) == 9 * K + 2
    leaked = [n for n, t in private.items() for w in windows(t) if w in haystack]
    assert leaked == []

    weights = {n: t for n, t in held.items() if not n.startswith("kv.")}
    assert weights, "the device holds the public prefix"
    assert {n: reference.mismatches(n, t) for n, t in weights.items()} == dict.fromkeys(weights)
    sent = set(crossing.transcript.names("to_device"))
    assert sent - set(weights) <= {"shape", "load", "placement", "tokens"}


def test_the_byte_window_search_finds_a_planted_private_tensor(private_tensors) -> None:  # type: ignore[no-untyped-def]
    secret = private_tensors["lm_head.weight"]
    haystack = b"noise" + tensor_bytes(secret[3:5]) + b"noise"
    assert any(w in haystack for w in windows(secret[3:5]))
