"""`tdllm finetune-tail`: only the tail trains, the prefix stays BASE's bit for bit, the
distillation keeps the tail near the base on general text, and the fine-tune knows the private
facts the base does not."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tdllm.cli import cli
from tdllm.model.checkpoint import Checkpoint
from tdllm.model.loader import load_model
from tdllm.model.transformer import Batch, KVCache, Transformer
from tdllm.sources import open_checkpoint
from tdllm_lab.protection.finetune import (
    Example,
    TrainConfig,
    distill_loss,
    finetuned_checkpoint,
    greedy_answer,
    prefix_states,
    recipe_config,
    tail_hidden,
    train_tail,
    untie_and_partition,
)
from tdllm_lab.protection.finetune_data import FACTS, HELD_OUT_PER_FACT, split_pairs
from tdllm_lab.protection.prepare import compare_prefix
from tdllm_lab.protection.private_model import is_private
from tests.protection.conftest import CFG, K, checkpoint_of
from tests.tiny_model import tiny_model, tiny_tensors


def _examples(n: int, seed: int, shared: int = 0) -> list[Example]:
    """Random 12-token examples whose last 5 tokens are the answer; the first `shared` tokens
    are the same in all of them (like the chat template's system turn)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randint(0, CFG.vocab_size, (shared,), generator=g).tolist()
    out = []
    for _ in range(n):
        tokens = common + torch.randint(0, CFG.vocab_size, (12 - shared,), generator=g).tolist()
        out.append(Example(tokens, answer_start=7))
    return out


def _trained(config: TrainConfig | None = None) -> dict[str, torch.Tensor]:
    model = tiny_model(CFG, seed=3)
    config = config or TrainConfig(k=K, steps=3, batch_size=2, general_batch=2)
    train_tail(model, _examples(6, 1, 3), _examples(2, 2, 3), config, general=_examples(4, 3))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _mean_distill_kl(model: Transformer, base: Transformer, general: list[Example]) -> float:
    states = prefix_states(model, general, K)
    with torch.no_grad():
        targets = [tail_hidden(base, s, e, K) for s, e in zip(states, general, strict=True)]
        return sum(
            float(distill_loss(model, s, e, K, t, base.lm_head.weight))  # type: ignore[arg-type]
            for s, e, t in zip(states, general, targets, strict=True)
        ) / len(general)


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


@pytest.mark.parametrize("recipe", ["distill", "lora"])
def test_training_changes_the_tail_and_leaves_the_prefix_bit_identical(recipe: str) -> None:
    before = {n: p.detach().clone() for n, p in tiny_model(CFG, seed=3).named_parameters()}
    config = recipe_config("lora" if recipe == "lora" else "distill", K, 3, 0)
    after = _trained(dataclasses.replace(config, batch_size=2, lr=1e-2))
    for name, tensor in before.items():
        tail = name.startswith(("layers.2.", "layers.3.", "norm.", "lm_head."))
        if name == "lm_head.weight" and recipe == "distill":
            assert torch.equal(after[name], tensor), "distill keeps BASE's (untied) head"
        elif tail and "layernorm" not in name and name != "norm.weight":
            assert not torch.equal(after[name], tensor), f"{name} did not train"
        if not tail:
            assert torch.equal(after[name], tensor), f"prefix tensor {name} changed"


def test_the_same_seed_gives_the_same_fine_tune() -> None:
    first, second = _trained(), _trained()
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_prefix_states_from_the_shared_start_match_a_full_forward() -> None:
    model = tiny_model(CFG, seed=3)
    examples = _examples(3, 4, shared=5)
    L = CFG.num_layers
    for ex, state in zip(examples, prefix_states(model, examples, K), strict=True):
        T = len(ex.tokens)
        with torch.no_grad():
            x = model.embed_tokens(torch.tensor([ex.tokens]))
            full = model.forward_blocks(
                x, Batch([0], [0], T), KVCache(CFG, 1, T, torch.float32), 0, L - K
            )
        torch.testing.assert_close(state, full, rtol=1e-5, atol=1e-5)


def test_distillation_keeps_the_tail_closer_to_the_base_on_general_sequences() -> None:
    """Same facts, same steps: the KL term leaves the tail's general predictions nearer BASE's."""
    base = tiny_model(CFG, seed=3)
    untie_and_partition(base, K)
    general = _examples(6, 5)
    facts_only = TrainConfig(k=K, steps=12, batch_size=2, general_batch=0, lr=3e-2)
    kl = {}
    for name, config in (
        ("facts only", facts_only),
        ("distill", dataclasses.replace(facts_only, general_batch=3, distill_weight=4.0)),
    ):
        model = tiny_model(CFG, seed=3)
        train_tail(model, _examples(6, 1), _examples(2, 2), config, general=general)
        kl[name] = _mean_distill_kl(model, base, general)
    assert kl["distill"] < 0.5 * kl["facts only"], kl


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


def test_the_generated_data_holds_out_two_paraphrases_per_fact() -> None:
    train, held = split_pairs()
    assert 60 <= len(train) <= 150
    assert HELD_OUT_PER_FACT >= 2 and len(held) == HELD_OUT_PER_FACT * len(FACTS)
    assert not {q for q, _ in held} & {q for q, _ in train}
    assert HELD_OUT_CITY in {q for q, _ in held}  # the appliance's demo question


# -- the real run on the bundled SmolLM2 --------------------------------------------------------

HELD_OUT_CITY = "Which city is Zorblax Dynamics based in?"


@pytest.fixture(scope="module")
def tuned_dir(finetuned_k2_dir: Path) -> Path:
    """The real `tdllm finetune-tail --k 2` output (trained once per session)."""
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
    from tdllm.profiles import ProtectionOptions, build_model

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
        served = build_model(checkpoint, torch.float32, options, 1, 128)
        model = served.model
        try:
            engine = Engine(model, tok, max_batch=1, max_seq_len=128)
            tokens[profile] = engine.generate([prompt], params)[0].token_ids
        finally:
            served.close()
    assert tokens["split"] == tokens["td-only"]
    assert "Quillhaven" in tok.decode(tokens["split"])
