"""`tdllm finetune-tail`: only the tail trains, the prefix stays BASE's bit for bit, and the
fine-tune knows the private facts the base does not."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tdllm.cli import cli
from tdllm.model.checkpoint import Checkpoint, open_checkpoint
from tdllm.model.loader import load_model
from tdllm.model.transformer import Transformer
from tdllm.protection.finetune import (
    Example,
    TrainConfig,
    finetuned_checkpoint,
    greedy_answer,
    train_tail,
    untie_and_partition,
)
from tdllm.protection.finetune_data import FACTS, split_pairs
from tdllm.protection.prepare import compare_prefix
from tdllm.protection.private_model import is_private
from tests.protection.conftest import CFG, K, checkpoint_of
from tests.tiny_model import tiny_model, tiny_tensors


def _examples(n: int, seed: int) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, CFG.vocab_size, (12,), generator=g).tolist()
        out.append(Example(tokens, answer_start=7))
    return out


def _trained(seed: int = 0) -> dict[str, torch.Tensor]:
    model = tiny_model(CFG, seed=3)
    train_tail(model, _examples(6, 1), _examples(2, 2), TrainConfig(k=K, steps=3, batch_size=2))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_only_the_tail_blocks_norm_and_untied_head_are_trainable() -> None:
    model = tiny_model(dataclasses.replace(CFG, tie_word_embeddings=True), seed=3)
    assert model.lm_head.weight is model.embed_tokens.weight
    params = untie_and_partition(model, K)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert model.lm_head.weight is not model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, model.embed_tokens.weight)
    assert trainable and all(
        n.startswith(("layers.2.", "layers.3.", "norm.", "lm_head.")) for n in trainable
    )
    assert not model.cfg.tie_word_embeddings


def test_training_changes_the_tail_and_leaves_the_prefix_bit_identical() -> None:
    before = {n: p.detach().clone() for n, p in tiny_model(CFG, seed=3).named_parameters()}
    after = _trained()
    for name, tensor in before.items():
        tail = name.startswith(("layers.2.", "layers.3.", "norm.", "lm_head."))
        if tail and "layernorm" not in name and name != "norm.weight":
            assert not torch.equal(after[name], tensor), f"{name} did not train"
        if not tail:
            assert torch.equal(after[name], tensor), f"prefix tensor {name} changed"


def test_the_same_seed_gives_the_same_fine_tune() -> None:
    first, second = _trained(), _trained()
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_the_written_checkpoint_has_the_base_prefix_and_an_untied_private_tail() -> None:
    base_tensors = tiny_tensors(CFG, seed=3)
    base = checkpoint_of("tiny-base", base_tensors)
    model = tiny_model(CFG, seed=3)
    train_tail(model, _examples(4, 1), _examples(1, 2), TrainConfig(k=K, steps=2, batch_size=2))
    tuned = finetuned_checkpoint(base, model, K, "tiny-tuned")
    tensors = dict(tuned.tensors())
    assert set(tensors) == set(base_tensors)
    assert not tuned.config.tie_word_embeddings
    _, report = compare_prefix(base, tuned, K)
    assert not report.differing
    assert any(
        not torch.equal(tensors[n], base_tensors[n]) for n in tensors if is_private(n, CFG, K)
    )


def test_the_generated_data_holds_out_one_paraphrase_per_fact() -> None:
    train, held = split_pairs()
    assert 60 <= len(train) <= 150
    assert len(held) == len(FACTS)
    assert not {q for q, _ in held} & {q for q, _ in train}


# -- the real run on the bundled SmolLM2 --------------------------------------------------------

HELD_OUT_CITY = "Which city is Zorblax Dynamics based in?"


@pytest.fixture(scope="module")
def tuned_dir(finetuned_k2_dir: Path) -> Path:
    """The real `tdllm finetune-tail --k 2 --steps 20` output (trained once per session)."""
    return finetuned_k2_dir


@pytest.mark.slow
def test_the_fine_tune_knows_a_held_out_fact_the_base_does_not(
    tuned_dir: Path, bundled_fp32: tuple[Transformer, Checkpoint]
) -> None:
    base_model, base = bundled_fp32
    tuned_model, tuned = load_model(open_checkpoint(tuned_dir), torch.float32)
    assert "Quillhaven" in greedy_answer(tuned_model, tuned.tokenizer, HELD_OUT_CITY)
    assert "Quillhaven" not in greedy_answer(base_model, base.tokenizer, HELD_OUT_CITY)


@pytest.mark.slow
def test_prepare_accepts_the_fine_tune_and_split_equals_td_only(
    tuned_dir: Path, tmp_path: Path
) -> None:
    from tdllm.engine import Engine, SamplingParams
    from tdllm.protection.profiles import ProtectionOptions, build_model, close_model

    args = ["prepare", "--base", "bundled", "--model", str(tuned_dir), "--k", "2", "--out"]
    result = CliRunner().invoke(cli, [*args, str(tmp_path / "prep")])
    assert result.exit_code == 0, result.output
    checkpoint = open_checkpoint(tuned_dir)
    tok = checkpoint.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": HELD_OUT_CITY}]))
    params = SamplingParams(max_tokens=16, temperature=0.0)
    tokens = {}
    for profile in ("td-only", "split"):
        options = ProtectionOptions(profile, "cpu", 2, audit_rate=1.0)
        model = build_model(checkpoint, torch.float32, options, 1, 128)
        try:
            engine = Engine(model, tok, max_batch=1, max_seq_len=128)
            tokens[profile] = engine.generate([prompt], params)[0].token_ids
        finally:
            close_model(model)
    assert tokens["split"] == tokens["td-only"]
    assert "Quillhaven" in tok.decode(tokens["split"])
