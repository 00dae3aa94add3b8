"""`split` computes exactly what `td-only` computes, on every device we can run here."""

from __future__ import annotations

import pytest
import torch

from tdllm.model.transformer import Batch, KVCache
from tdllm.trusted.crossing import Crossing
from tests.protection.conftest import CFG, MAX_BATCH, MAX_SEQ, K, td_only
from tests.protection.engine_runs import greedy_tokens


def test_device_prefix_is_bit_identical_to_the_td_models_own_blocks(
    private_checkpoint, reference, split_on
) -> None:  # type: ignore[no-untyped-def]
    reference_model = td_only(private_checkpoint)
    split = split_on(private_checkpoint, reference, Crossing.open("cpu"), 0.0)
    cache = KVCache(CFG, MAX_BATCH, MAX_SEQ, torch.float32)
    tokens = torch.tensor([[4, 8, 15, 16, 23, 42]])
    batch = Batch([1], [0], 6)
    with torch.inference_mode():
        honest = reference_model.forward_blocks(
            reference_model.embed_tokens(tokens), batch, cache, 0, CFG.num_layers - K
        )
        offloaded = split.prefix(tokens, batch)
    assert torch.equal(honest, offloaded)


@pytest.mark.parametrize("device", ["cpu", "process"])
def test_split_greedy_tokens_equal_td_only_with_batched_decode(
    device, private_checkpoint, reference, split_on
) -> None:  # type: ignore[no-untyped-def]
    expected = greedy_tokens(td_only(private_checkpoint))
    split = split_on(private_checkpoint, reference, Crossing.open(device), 1.0)
    assert greedy_tokens(split) == expected
    assert split.prefix.audit.checked_rows > 0  # audits ran and passed on an honest device


def test_split_logits_equal_td_only_bit_for_bit(private_checkpoint, reference, split_on) -> None:  # type: ignore[no-untyped-def]
    plain = td_only(private_checkpoint)
    split = split_on(private_checkpoint, reference, Crossing.open("cpu"), 0.0)
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    outs = []
    for model in (plain, split):
        cache = KVCache(CFG, MAX_BATCH, MAX_SEQ, torch.float32)
        with torch.inference_mode():
            outs.append(model(tokens, Batch([0], [0], 8), cache, last_only=False))
    assert torch.equal(outs[0], outs[1])


def test_the_private_tail_differs_from_the_base(base_tensors, private_tensors) -> None:  # type: ignore[no-untyped-def]
    tail = f"model.layers.{CFG.num_layers - 1}.mlp.down_proj.weight"
    assert not torch.equal(base_tensors[tail], private_tensors[tail])
    assert torch.equal(
        base_tensors["model.layers.0.mlp.down_proj.weight"],
        private_tensors["model.layers.0.mlp.down_proj.weight"],
    )
    assert not torch.equal(private_tensors["lm_head.weight"], base_tensors["lm_head.weight"])


def test_without_checks_the_td_keeps_only_the_tail_norm_and_head(
    private_checkpoint, reference, split_on
) -> None:  # type: ignore[no-untyped-def]
    expected = greedy_tokens(td_only(private_checkpoint))
    split = split_on(private_checkpoint, reference, Crossing.open("cpu"), 0.0)
    held = {n: p for n, p in split.named_parameters() if p.numel() > 0}
    tail = tuple(f"layers.{i}." for i in range(CFG.num_layers - K, CFG.num_layers))
    assert held and all(n.startswith((*tail, "norm.", "lm_head.")) for n in held)
    assert split.embed_tokens.weight.numel() == 0
    assert greedy_tokens(split) == expected


def test_with_audits_on_the_td_keeps_the_public_prefix_it_re_executes(
    private_checkpoint, reference, split_on
) -> None:  # type: ignore[no-untyped-def]
    split = split_on(private_checkpoint, reference, Crossing.open("cpu"), 0.5)
    assert split.embed_tokens.weight.numel() == CFG.vocab_size * CFG.hidden_size
    assert any(n.startswith("layers.0.") for n, _ in split.named_parameters())


def test_split_builds_from_a_sealed_checkpoint_that_streams_only_once(
    private_tensors, base_tensors, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    import secrets

    from tdllm.profiles import ProtectionOptions, build_model
    from tdllm.sealing.reader import open_sealed
    from tdllm.trusted.public_reference import PublicReference
    from tdllm_lab.sealing.writer import seal_checkpoint
    from tests.protection.conftest import MAX_BATCH, checkpoint_of
    from tests.sealing.synthetic import tiny_tokenizer

    source = checkpoint_of("tiny-private", private_tensors)
    source.tokenizer = tiny_tokenizer()
    key = secrets.token_bytes(32)
    seal_checkpoint(source, tmp_path / "sealed", data_key=key, key_id="test/1")
    ref = tmp_path / "public-prefix.json"
    PublicReference.build("tiny-base", base_tensors.items()).save(ref)
    options = ProtectionOptions("split", "cpu", K, ref, audit_rate=1.0)
    sealed = open_sealed(tmp_path / "sealed", data_key=key)
    served = build_model(sealed, torch.float32, options, MAX_BATCH, MAX_SEQ)
    model = served.model
    try:
        assert greedy_tokens(model) == greedy_tokens(td_only(source))
    finally:
        served.close()
