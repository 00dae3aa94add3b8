"""`masked`: every pad is used once, masked words look nothing like the activation, and the
Freivalds check over prime fields accepts honest products and rejects forged ones."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from tdllm.api.runner import EngineRunner
from tdllm.engine import Engine, SamplingParams
from tdllm.model.checkpoint import Checkpoint
from tdllm.model.linear import Linear
from tdllm.profiles import ProtectionOptions, build_model
from tdllm.trusted.crossing import Crossing
from tdllm.trusted.masked_linear import MaskedLinearMethod
from tdllm.trusted.masked_ring import exact_product, quantize_weight, wide_chunks, wrap32
from tdllm.trusted.modular_freivalds import PRIMES, ModularFreivalds
from tdllm.trusted.pads import IDLE_RESERVE, PadPool, mask, unmask
from tdllm.trusted.public_reference import PublicReference
from tdllm_lab.attacks.device_view import NoTokenizer
from tests.protection.conftest import checkpoint_of
from tests.protection.engine_runs import masked_method


def _masked_layer(crossing: Crossing, out_f: int = 24, in_f: int = 40) -> Linear:
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(5))
    name = "model.layers.0.mlp.down_proj"
    method = MaskedLinearMethod(crossing, reference=PublicReference.build("w", [(name, w)]))
    layer = Linear(name, in_f, out_f, method, torch.float32)
    layer.load_weight(w)
    method.install(layer, {name: w}, None, pad_batch=4)
    return layer


def test_pads_are_fresh_for_every_row_and_never_handed_out_twice() -> None:
    q, _ = quantize_weight(torch.randn(8, 16))
    pool = PadPool(wide_chunks(q), batch=5)
    taken = [pool.take(n)[0] for n in (1, 3, 7, 2, 5)]
    rows = torch.cat(taken)
    assert pool.taken == 18 and pool.generated >= 18
    assert len({tuple(r.tolist()) for r in rows}) == rows.shape[0]


def test_pad_products_unmask_to_the_exact_product() -> None:
    g = torch.Generator().manual_seed(1)
    q, _ = quantize_weight(torch.randn(12, 64, generator=g))
    pool = PadPool(wide_chunks(q))
    x = torch.randint(-2000, 2000, (3, 64), generator=g, dtype=torch.int32)
    pads, products = pool.take(3)
    masked = mask(x, pads)
    device_answer = exact_product(masked, wide_chunks(q))  # what an honest device returns
    assert torch.equal(unmask(device_answer, products), wrap32(exact_product(x, wide_chunks(q))))


def test_the_same_activation_crosses_as_different_words_every_time() -> None:
    crossing = Crossing.open("cpu", keep_payloads=True)
    try:
        layer = _masked_layer(crossing)
        x = torch.randn(2, 40)
        out = [layer(x) for _ in range(3)]
        assert all(torch.equal(out[0], o) for o in out[1:])  # the TD's result is the same
        sent = [
            torch.frombuffer(bytearray(r.payload or b""), dtype=torch.int32).reshape(2, 40)
            for r in crossing.transcript.records
            if r.name == "x" and r.direction == "to_device"
        ]
        assert len(sent) == 3
        rows = torch.cat(sent)
        assert len({tuple(r.tolist()) for r in rows}) == 6  # no row repeats, even for equal x
        # differences between two crossings of the same x are pad differences: not constant
        assert len(set((sent[0] - sent[1]).flatten().tolist())) > 40
    finally:
        crossing.close()


def test_freivalds_accepts_honest_products_and_rejects_single_word_forgeries() -> None:
    g = torch.Generator().manual_seed(2)
    q, _ = quantize_weight(torch.randn(30, 50, generator=g))
    check = ModularFreivalds(q)
    x = torch.randint(-(2**31), 2**31, (4, 50), generator=g, dtype=torch.int64).to(torch.int32)
    y = exact_product(x, wide_chunks(q))
    assert check.verify(x, y)
    for change in (1, -1, 1 << 31, 1 << 32, PRIMES[0], PRIMES[1], PRIMES[0] * PRIMES[1]):
        forged = y.clone()
        forged[2, 7] += change
        assert not check.verify(x, forged), change
    forged = y.clone()
    forged[0, 0] = -(2**63)  # out of range; abs() would have wrapped
    assert not check.verify(x, forged)
    assert not check.verify(x, y[:, :29])  # wrong shape
    assert check.verify(x, y)  # still accepts the honest product afterwards


def test_top_up_adds_one_batch_at_a_time_until_the_reserve() -> None:
    q, _ = quantize_weight(torch.randn(8, 16))
    pool = PadPool(wide_chunks(q), batch=5)
    steps = 0
    while pool.top_up(12):
        steps += 1
    assert steps == 3 and pool.ready == 12 and pool.generated == 12  # 5 + 5 + 2
    pool.take(12)
    assert pool.ready == 0 and pool.taken == 12


def test_an_idle_engine_precomputes_pads_so_a_request_needs_no_refill(
    private_checkpoint: Checkpoint,
    base_tensors: dict[str, torch.Tensor],
    reference: PublicReference,
    tmp_path: Path,
) -> None:
    base = checkpoint_of("tiny-base", base_tensors)
    reference.save(pinned := tmp_path / "reference.json")
    options = ProtectionOptions("masked", "cpu", public_reference=pinned, masked_base=base)
    served = build_model(private_checkpoint, torch.float32, options, 1, 32)
    try:
        pools = [p for p in (s.pads for s in masked_method(served.model).states.values()) if p]
        engine = Engine(served.model, NoTokenizer(), 1, 32)  # type: ignore[arg-type]
        runner = EngineRunner(engine, model_name="tiny", served=served)
        runner.start()
        try:
            deadline = time.monotonic() + 60
            while any(p.ready < IDLE_RESERVE for p in pools):  # no request was ever sent
                assert time.monotonic() < deadline and runner.alive, runner.failed
                time.sleep(0.05)
            params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
            handle = runner.submit(list(range(5, 17)), params)
            tokens = [o.token_id for o in handle.outputs(timeout_s=60)]
        finally:
            runner.stop()
        assert len(tokens) == 3
        # 12 prompt rows + 2 decode rows per projection, all from the idle-time reserve
        assert all(p.taken == 14 for p in pools)
        assert all(p.misses == 0 for p in pools)
    finally:
        served.close()
