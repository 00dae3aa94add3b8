"""`tdllm protect --report`: the seed's selective-protection numbers for each candidate K.

For every K the private model is the real `tdllm finetune-tail` fine-tune of the bundled base
(trained once into a cache, `private_cache.py`). Per K:

- **deviation** (the seed's criterion): ``‖Y - Y'‖ / ‖Y‖`` over all logits of a prompt set, Y
  from the private model and Y' with the protected part (the last K blocks, the final norm and
  the lm_head) replaced by the base's. The prefix of a split model *is* the base's, so Y' is the
  base model's output. Two prompt sets: the held-out Zorblax questions with their answers
  (teacher-forced) and unrelated questions.
- **TD share of FLOPs**, counted by `torch.utils.flop_counter.FlopCounterMode` on the real
  model: the tail blocks + final norm + lm_head against the whole forward, for one decode step
  at context `CONTEXT` and for a `CONTEXT`-token prefill.
- **TD share of weight bytes read per decode token** (batch 1): the tail, final norm and
  lm_head against everything a decode step reads (one embedding row, every block, the head).
- **A1**, from a real generation through `build_model(split)` on a real device with every
  crossing byte kept: the transcript plus a dump of everything resident on the device are
  searched for byte windows of every private tensor, and every device weight is hashed against
  the pinned public reference. ``non_public_bytes_on_device`` is the size of the device
  weights that do not hash to the public checkpoint plus 16 bytes per private window found.

The deviation measures how much the private part changes the output (fidelity), not how hard it
is to steal (design §7.3): it says which K carries the fine-tune, not which K is secure.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from tdllm.errors import UsageError
from tdllm.model.checkpoint import Checkpoint
from tdllm.model.loader import load_model
from tdllm.model.transformer import Batch, KVCache, Transformer
from tdllm.profiles import ProtectionOptions, build_model
from tdllm.profiles.options import PINNED_REFERENCE
from tdllm.sources import open_checkpoint
from tdllm.trusted.public_reference import PublicReference
from tdllm_lab.doc_sections import markers, read_marked, replace_marked
from tdllm_lab.protection.finetune import encode_pair
from tdllm_lab.protection.finetune_data import split_pairs
from tdllm_lab.protection.private_cache import (
    DEFAULT_SEED,
    DEFAULT_STEPS,
    RECIPE_TAG,
    private_model_dir,
    training_record,
)
from tdllm_lab.protection.private_model import is_private

DEFAULT_KS = (1, 2, 4)
CONTEXT = 64  # tokens of context for the FLOP counts
WINDOW = 16  # bytes: four fp32 values
WINDOWS_PER_TENSOR = 8
UNRELATED_QUESTIONS = (
    "What is the capital of France?",
    "Give me one tip for learning to cook.",
    "What is 12 times 7?",
    "Name a planet in the solar system.",
    "Why is the sky blue?",
)
SECTION = "protect-report"  # docs/security.md's generated section (doc_sections.py)
BEGIN_MARK, END_MARK = markers(SECTION)


@dataclass
class A1Result:
    device: str
    generated_tokens: int
    transcript_bytes: int
    device_resident_bytes: int
    private_tensors: int
    private_windows_searched: int
    private_windows_found: int
    device_weights: int
    device_weights_not_public: int
    non_public_bytes_on_device: int
    hidden_bytes_per_token: float
    crossing_bytes_per_token: float  # after the weight upload; Freivalds at rate 1 included
    tail_tensors_public: int = 0  # tail tensors bit-identical to a public one: not searched


@dataclass
class KRow:
    k: int
    held_out_loss: float
    held_out_recalled: str
    deviation_private_prompts: float
    deviation_unrelated_prompts: float
    td_flops_share_decode: float
    td_flops_share_prefill: float
    td_weight_bytes_share_decode: float
    a1: A1Result


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Raw little-endian bytes of `tensor` (also bf16), as the device transcript records them."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes())


def _logits(model: Transformer, tokens: Sequence[int]) -> torch.Tensor:
    T = len(tokens)
    cache = KVCache(model.cfg, 1, T, model.dtype)
    with torch.inference_mode():
        return model(torch.tensor([list(tokens)]), Batch([0], [0], T), cache, last_only=False)[0]


def output_deviation(
    private: Transformer, base: Transformer, sequences: Iterable[Sequence[int]]
) -> float:
    """``‖Y - Y'‖_F / ‖Y‖_F`` over the logits of every position of every sequence."""
    num = den = 0.0
    for tokens in sequences:
        y, y_base = _logits(private, tokens).double(), _logits(base, tokens).double()
        num += float((y - y_base).pow(2).sum())
        den += float(y.pow(2).sum())
    return math.sqrt(num / den)


def prompt_sets(checkpoint: Checkpoint) -> tuple[list[list[int]], list[list[int]]]:
    """(held-out private questions with their answers, unrelated chat prompts) as token ids."""
    tok = checkpoint.tokenizer
    _, held = split_pairs()
    private = [encode_pair(tok, q, f.answer).tokens for q, f in held]
    unrelated = [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))
        for q in UNRELATED_QUESTIONS
    ]
    return private, unrelated


def _flops(fn: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        fn()
    return int(counter.get_total_flops())


def td_flops_share(model: Transformer, k: int, context: int = CONTEXT) -> tuple[float, float]:
    """(decode, prefill) share of the forward's FLOPs that the tail + norm + lm_head perform.

    Decode: one token at position `context`; prefill: `context` tokens, logits at the last one.
    """
    L, d = model.cfg.num_layers, model.cfg.hidden_size
    cache = KVCache(model.cfg, 1, context + 1, model.dtype)
    prompt = torch.arange(context)[None] % model.cfg.vocab_size
    shares = []
    for tokens, batch in (
        (torch.tensor([[7]]), Batch([0], [context], 1)),
        (prompt, Batch([0], [0], context)),
    ):

        def whole(t: torch.Tensor = tokens, b: Batch = batch) -> object:
            return model(t, b, cache)

        x = torch.zeros(1, tokens.shape[1], d, dtype=model.dtype)

        def tail(x: torch.Tensor = x, b: Batch = batch) -> object:
            h = model.forward_blocks(x, b, cache, L - k, L)[:, -1:]
            return model.lm_head(model.norm(h))

        shares.append(_flops(tail) / _flops(whole))
    return shares[0], shares[1]


def td_weight_bytes_share(checkpoint: Checkpoint, k: int) -> float:
    """Weight bytes a batch-1 decode step reads in the TD over all it reads (one embedding row)."""
    cfg = checkpoint.config
    td = everything = 0
    for name, tensor in checkpoint.tensors():
        n = cfg.hidden_size if name == "model.embed_tokens.weight" else tensor.numel()
        nbytes = n * tensor.element_size()
        everything += nbytes
        if is_private(name, cfg, k):
            td += nbytes
    return td / everything


def _windows(tensor: torch.Tensor, count: int = WINDOWS_PER_TENSOR) -> list[bytes]:
    data = tensor_bytes(tensor.float())
    step = max(4, (len(data) - WINDOW) // count // 4 * 4)
    return [data[i : i + WINDOW] for i in range(0, len(data) - WINDOW, step)][:count]


def find_windows(pieces: Iterable[bytes], windows: Sequence[bytes]) -> set[bytes]:
    """The `windows` (16 bytes each) that occur anywhere, at any byte offset, in `pieces`.

    Every 4-byte word of every piece (at each of the four alignments) is looked up among the
    windows' first words (sorted, binary search); candidates are compared in full.
    """
    wanted = set(windows)
    firsts = np.unique(np.frombuffer(b"".join(w[:4] for w in wanted), dtype="<u4"))
    found: set[bytes] = set()
    for piece in pieces:
        for offset in range(4):
            count = (len(piece) - offset) // 4
            if count < WINDOW // 4:
                continue
            words = np.frombuffer(piece, dtype="<u4", offset=offset, count=count)
            pos = np.searchsorted(firsts, words).clip(max=len(firsts) - 1)
            for i in np.nonzero(firsts[pos] == words)[0]:
                start = offset + 4 * int(i)
                candidate = bytes(piece[start : start + WINDOW])
                if candidate in wanted:
                    found.add(candidate)
    return found


def a1_run(
    checkpoint: Checkpoint,
    k: int,
    device: str,
    prompt: list[int],
    new_tokens: int,
    public_reference: Path = PINNED_REFERENCE,
    tokenizer: Any = None,
) -> A1Result:
    """Generate through a real split on `device`, keeping every byte; search it all."""
    from tdllm.engine import Engine, SamplingParams

    max_seq = len(prompt) + new_tokens + 1
    options = ProtectionOptions(
        "split",
        device,
        k,
        public_reference,
        audit_rate=1.0,
        freivalds_rate=1.0,
        keep_payloads=True,
    )
    served = build_model(checkpoint, torch.float32, options, 1, max_seq)
    try:
        crossing = served.crossing
        if crossing is None:
            raise RuntimeError("a split model has a crossing")
        uploaded = crossing.transcript.bytes_crossed()
        engine = Engine(served.model, tokenizer or checkpoint.tokenizer, 1, max_seq)
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        out = engine.generate([prompt], params)[0]
        held = crossing.dump()
        records = crossing.transcript.records
    finally:
        served.close()
    tokens = len(prompt) + len(out.token_ids) - 1  # positions the device computed
    pieces = [r.payload for r in records if r.payload]
    pieces += [tensor_bytes(t) for t in held.values()]
    reference = PublicReference.load(public_reference)
    tail = {n: t for n, t in checkpoint.tensors() if is_private(n, checkpoint.config, k)}
    # a tail tensor equal to a public one (distill keeps BASE's head) hides nothing
    private = {n: t for n, t in tail.items() if not reference.holds(t)}
    windows = [w for t in private.values() for w in _windows(t)]
    found = find_windows(pieces, windows)
    weights = {n: t for n, t in held.items() if not n.startswith("kv.")}
    not_public = {n: t for n, t in weights.items() if reference.mismatches(n, t) is not None}
    hidden = sum(r.nbytes for r in records if r.name == "hidden")
    total = sum(r.nbytes for r in records)
    return A1Result(
        device=device,
        generated_tokens=len(out.token_ids),
        transcript_bytes=total,
        device_resident_bytes=sum(t.numel() * t.element_size() for t in held.values()),
        private_tensors=len(private),
        tail_tensors_public=len(tail) - len(private),
        private_windows_searched=len(set(windows)),
        private_windows_found=len(found),
        device_weights=len(weights),
        device_weights_not_public=len(not_public),
        non_public_bytes_on_device=sum(t.numel() * t.element_size() for t in not_public.values())
        + WINDOW * len(found),
        hidden_bytes_per_token=round(hidden / tokens, 1),
        crossing_bytes_per_token=round((total - uploaded) / tokens, 1),
    )


def protect_report(
    ks: Sequence[int],
    cache: Path,
    device: str = "process",
    new_tokens: int = 16,
    log: Callable[[str], None] = lambda _: None,
    progress: Callable[[Iterable[int]], Iterable[int]] = lambda it: it,
) -> dict[str, Any]:
    started = time.perf_counter()
    base_checkpoint = open_checkpoint("bundled")
    base, _ = load_model(base_checkpoint, torch.float32)
    if any(not 1 <= k < base.cfg.num_layers for k in ks):
        raise UsageError(f"every K must be in [1, {base.cfg.num_layers - 1}]")
    private_prompts, unrelated = prompt_sets(base_checkpoint)
    rows: list[KRow] = []
    for k in progress(ks):
        folder = private_model_dir(cache, k, log=log)
        record = training_record(folder)
        checkpoint = open_checkpoint(folder)
        log(f"K={k}: output deviation and FLOPs ...")
        private, _ = load_model(checkpoint, torch.float32)
        deviation_private = output_deviation(private, base, private_prompts)
        deviation_unrelated = output_deviation(private, base, unrelated)
        flops_decode, flops_prefill = td_flops_share(private, k)
        del private
        log(f"K={k}: A1 run on the {device} device ...")
        a1 = a1_run(checkpoint, k, device, private_prompts[0], new_tokens)
        answers = record.get("held_out_answers", [])
        if not isinstance(answers, list):
            raise ValueError(f"{folder}: held_out_answers is not a list")
        recalled = sum(1 for a in answers if isinstance(a, dict) and a.get("recalled"))
        rows.append(
            KRow(
                k=k,
                held_out_loss=float(record["held_out_loss_after"]),  # type: ignore[arg-type]
                held_out_recalled=f"{recalled}/{len(answers)}",
                deviation_private_prompts=round(deviation_private, 4),
                deviation_unrelated_prompts=round(deviation_unrelated, 4),
                td_flops_share_decode=round(flops_decode, 4),
                td_flops_share_prefill=round(flops_prefill, 4),
                td_weight_bytes_share_decode=round(td_weight_bytes_share(checkpoint, k), 4),
                a1=a1,
            )
        )
    return {
        "base": base_checkpoint.name,
        "private_model": f"tdllm finetune-tail --steps {DEFAULT_STEPS} --seed {DEFAULT_SEED} "
        f"(recipe {RECIPE_TAG}, cached)",
        "held_out_loss_base": record["held_out_loss_before"] if rows else None,
        "context_tokens": CONTEXT,
        "device": device,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),
        "rows": [asdict(r) for r in rows],
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_table(report: dict[str, Any]) -> str:
    """A Markdown table (it also reads well on a terminal)."""
    lines = [
        "| K | held-out loss | facts recalled | ‖Y-Y'‖/‖Y‖ private prompts | ‖Y-Y'‖/‖Y‖ unrelated "
        "| TD FLOPs decode | TD FLOPs prefill | TD weight bytes/token | hidden bytes/token "
        "| A1 non-public bytes on device | A1 private windows found |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        a1 = r["a1"]
        lines.append(
            f"| {r['k']} | {r['held_out_loss']:.3f} | {r['held_out_recalled']} "
            f"| {r['deviation_private_prompts']:.3f} | {r['deviation_unrelated_prompts']:.3f} "
            f"| {_pct(r['td_flops_share_decode'])} | {_pct(r['td_flops_share_prefill'])} "
            f"| {_pct(r['td_weight_bytes_share_decode'])} | {a1['hidden_bytes_per_token']:.0f} "
            f"| {a1['non_public_bytes_on_device']} "
            f"| {a1['private_windows_found']}/{a1['private_windows_searched']} |"
        )
    return "\n".join(lines)


def format_details(report: dict[str, Any]) -> str:
    out = [
        f"base {report['base']} (held-out loss {report['held_out_loss_base']}); private model: "
        f"{report['private_model']}; FLOPs at context {report['context_tokens']}; A1 on the "
        f"{report['device']} device; {report['threads']} threads; {report['seconds']} s"
    ]
    for r in report["rows"]:
        a1 = r["a1"]
        out.append(
            f"K={r['k']} A1: {a1['generated_tokens']} tokens generated; searched "
            f"{a1['transcript_bytes']:,} transcript bytes + {a1['device_resident_bytes']:,} "
            f"device-resident bytes for {a1['private_windows_searched']} windows of "
            f"{a1['private_tensors']} private tensors"
            f"{_public_tail(a1.get('tail_tensors_public', 0))}: "
            f"{a1['private_windows_found']} found; "
            f"{a1['device_weights_not_public']}/{a1['device_weights']} device weights differ "
            f"from the public checkpoint; {a1['crossing_bytes_per_token']:,.0f} bytes/token "
            "crossed after the upload (Freivalds at rate 1 included)"
        )
    return "\n".join(out)


def _public_tail(count: int) -> str:
    if not count:
        return ""
    return f" ({count} more tail tensors equal a public one, so hide nothing: not searched)"


def marked_text(path: Path) -> str:
    """`path`'s text, which must hold the report markers (checked before any measuring)."""
    return read_marked(path, SECTION)


def write_into_doc(path: Path, report: dict[str, Any], command: str) -> None:
    """Replace the text between the report markers in `path` with this report."""
    body = "\n".join(
        [
            f"Written by `{command}` (do not edit by hand).",
            "",
            format_table(report),
            "",
            "```",
            format_details(report),
            "```",
        ]
    )
    replace_marked(path, SECTION, body)
