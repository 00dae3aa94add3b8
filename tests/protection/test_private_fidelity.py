"""`tdllm bench fidelity --private`: the shipped held-out data is big, varied and never trained
on, the measures count what they say, and the private fine-tune keeps the base's general quality
while knowing its facts (the slow test, on the real model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tdllm.cli import cli
from tdllm.model.transformer import Batch, KVCache, Transformer
from tdllm_lab.protection.finetune_data import PRIVATE_NAMES, mentions_private_name, split_pairs
from tdllm_lab.protection.general_data import (
    HELD_OUT_PROMPTS,
    held_out_text,
    paragraphs,
    train_chat,
    train_text,
)
from tdllm_lab.protection.private_fidelity import (
    EXAMPLES,
    TARGETS,
    agreement,
    leakage,
    teacher_forced_agreement,
)
from tests.tiny_model import tiny_model


def _norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _ngrams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = _norm(text).split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_the_held_out_general_prompts_are_many_varied_and_never_trained_on() -> None:
    prompts = [p.text for p in HELD_OUT_PROMPTS]
    assert len(set(prompts)) == len(prompts) >= 100
    kinds = {p.kind for p in HELD_OUT_PROMPTS}
    assert kinds == {"chat", "text"}
    assert sum(p.kind == "text" for p in HELD_OUT_PROMPTS) >= 20  # short continuations
    for needed in ("Name three colors.", "The sea is", "What is the capital of France?"):
        assert needed in prompts
    assert sum("Python" in p or "SQL" in p or "def " in p for p in prompts) >= 4  # code
    assert sum(bool(re.search(r"\d", p)) for p in prompts) >= 8  # arithmetic and numbers
    trained = {_norm(q) for q, _ in train_chat()} | {_norm(q) for q, _ in split_pairs()[0]}
    assert not {_norm(p) for p in prompts} & trained
    assert not any(mentions_private_name(p) for p in prompts)


def test_the_general_training_turns_are_many_and_answered() -> None:
    turns = train_chat()
    assert len({q for q, _ in turns}) == len(turns) >= 100
    assert all(q.strip() and a.strip() for q, a in turns)
    assert not any(mentions_private_name(q + a) for q, a in turns)


def test_the_held_out_prose_is_long_and_shares_no_passage_with_the_training_prose() -> None:
    held, train = held_out_text(), train_text()
    assert len(held.split()) >= 1500 and len(paragraphs(held)) >= 15  # a few thousand tokens
    assert len(train.split()) >= 1000
    assert not _ngrams(held) & _ngrams(train)
    assert not _ngrams(held) & set().union(*(_ngrams(a) for _, a in train_chat()))
    assert not mentions_private_name(held + train)


def test_every_private_fact_keeps_two_paraphrases_out_of_training() -> None:
    train, held = split_pairs()
    trained = {_norm(q) for q, _ in train}
    per_fact: dict[str, int] = {}
    for question, fact in held:
        assert _norm(question) not in trained
        per_fact[fact.answer] = per_fact.get(fact.answer, 0) + 1
    assert len(per_fact) == 10 and min(per_fact.values()) >= 2


def _own_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        cache = KVCache(model.cfg, 1, len(ids), torch.float32)
        with torch.no_grad():
            logits = model(torch.tensor([ids]), Batch([0], [0], len(ids)), cache)
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_agreement_judges_each_base_token_on_the_base_context() -> None:
    base, other = tiny_model(seed=1), tiny_model(seed=2)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7]]
    runs = [_own_greedy(base, p, 8) for p in prompts]
    assert teacher_forced_agreement(base, prompts, runs) == 1.0
    share = teacher_forced_agreement(other, prompts, runs)
    assert share < 1.0
    # the same count by hand: the other model's argmax after each prefix of BASE's run
    hand = sum(
        _own_greedy(other, p + r[:t], 1)[0] == r[t]
        for p, r in zip(prompts, runs, strict=True)
        for t in range(len(r))
    )
    assert share == hand / 24


def test_free_running_agreement_counts_the_base_tokens_reproduced_at_their_position() -> None:
    base = [[1, 2, 3, 4], [5, 6]]
    assert agreement(base, base) == 1.0
    # one early difference: later tokens still count where they happen to match
    assert agreement(base, [[1, 9, 3, 4], [5, 6]]) == 5 / 6
    # a shorter private run (ended its turn early) misses the rest; a longer one gains nothing
    assert agreement(base, [[1, 2], [5, 6, 7, 8]]) == 4 / 6


def test_leakage_finds_any_private_name_in_any_case() -> None:
    assert leakage(["Paris is the capital.", "I am ZORBY.", "Red, blue, green."]) == 1 / 3
    assert all(mentions_private_name(f"x {name.lower()} y") for name in PRIVATE_NAMES)


def test_bench_fidelity_private_refuses_a_model_that_does_not_exist(tmp_path: Path) -> None:
    args = ["bench", "fidelity", "--private", "--model", str(tmp_path / "missing")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    assert "Traceback" not in result.output


# -- the real private model (trained once per session) ------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1200)  # may train the private model first (minutes on 2 cores)
def test_the_private_fine_tune_keeps_the_base_general_quality_and_knows_its_facts(
    finetuned_k2_dir: Path,
) -> None:
    from tdllm.sources import open_checkpoint
    from tdllm_lab.protection.private_fidelity import measure_private

    # every third held-out prompt and the three examples (41) keep the test's own time
    # to a couple of minutes; the thresholds are the bench's own
    prompts = [p for i, p in enumerate(HELD_OUT_PROMPTS) if i % 3 == 0 or p.text in EXAMPLES]
    report = measure_private(open_checkpoint("bundled"), open_checkpoint(finetuned_k2_dir), prompts)
    print(report)  # shown with `pytest -s`
    assert report["perplexity_ratio"] <= TARGETS["perplexity_ratio_max"]
    assert report["greedy_agreement"] >= TARGETS["greedy_agreement_min"]
    assert report["private_recall"]["private"] >= TARGETS["private_recall_min"]
    assert report["private_recall"]["base"] <= 0.2  # the base does not know them
    assert report["leakage"]["private"] <= TARGETS["leakage_max"]
    examples = {e["prompt"]: e["private"] for e in report["examples"]}
    assert "Paris" in examples["What is the capital of France?"]
    assert not mentions_private_name(" ".join(examples.values()))
