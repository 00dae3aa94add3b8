"""A real run of a profile, and what its untrusted device held and saw (for A2, A4, A6).

`observe` builds the profile for a private model derived from the bundled public base, serves
prompts through the real engine, then returns the device's dump (everything resident) and the
offload calls it received (op, params, argument and output tensors, parsed back from the
transcript bytes). The attacker's inputs are `dump`, `calls` and the public `base`; `private`
and `obfuscation` (the TD's secrets) are kept only to score the attack.

Private model: with `quick`, the perturbed stand-in (`privatize`: the last K blocks and the
head differ from the base by 5% noise) so the fast tests need no training; otherwise the real
`tdllm finetune-tail` fine-tune (trained once into the cache, `private_cache.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from tdllm.engine import Engine, SamplingParams
from tdllm.model.checkpoint import Checkpoint
from tdllm.model.config import ModelConfig
from tdllm.profiles import ProtectionOptions, build_model
from tdllm.profiles.obfuscated import Obfuscated
from tdllm.sources import open_checkpoint
from tdllm.trusted.obfuscated_methods import Obfuscation
from tdllm_lab.attacks.result import AttackOptions
from tdllm_lab.protection.private_model import is_private, stand_in_checkpoint


@dataclass
class Call:
    op: str
    params: dict[str, Any]
    args: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Observation:
    profile: str
    cfg: ModelConfig  # the architecture (public: the base's)
    base: dict[str, torch.Tensor]  # the public base, fp32 (the attacker holds it, G2)
    dump: dict[str, torch.Tensor]  # everything resident on the device after the run (G1)
    calls: list[Call]  # offload calls the device answered during the run (G1)
    private: dict[str, torch.Tensor]  # ground truth: scoring only
    private_names: list[str]  # which private tensors differ from the base: scoring only
    obfuscation: Obfuscation | None  # the TD's secrets: scoring only
    model_name: str

    def private_layers(self) -> list[int]:
        """Blocks the fine-tune changed (scoring: which layers hold secrets)."""
        layers = {int(n.split(".")[2]) for n in self.private_names if n.startswith("model.layers.")}
        return sorted(layers)


def base_checkpoint() -> Checkpoint:
    return open_checkpoint("bundled")


def private_checkpoint(options: AttackOptions, base: Checkpoint) -> Checkpoint:
    if options.quick:
        return stand_in_checkpoint(base, options.k, options.seed)
    from tdllm_lab.protection.private_cache import DEFAULT_CACHE, private_model_dir

    return open_checkpoint(str(private_model_dir(DEFAULT_CACHE, options.k)))


class NoTokenizer:
    """For checkpoints without one (tiny test models): no stop tokens, no text."""

    stop_token_ids: frozenset[int] = frozenset()

    def decode(self, ids: list[int]) -> str:
        return ""


def observe(
    options: AttackOptions,
    prompts: list[list[int]],
    max_tokens: int,
    record_calls: bool = False,
    base: Checkpoint | None = None,
    private: Checkpoint | None = None,
) -> Observation:
    """Serve `prompts` (token ids) greedily through `options.profile`; what the device got.

    `base` defaults to the bundled model and `private` to `private_checkpoint` of it.
    """
    base = base or base_checkpoint()
    private_ckpt = private or private_checkpoint(options, base)
    base_tensors = {n: t.float() for n, t in base.tensors()}
    if "lm_head.weight" not in base_tensors:  # a tied base: its head is the embedding
        base_tensors["lm_head.weight"] = base_tensors["model.embed_tokens.weight"]
    private_tensors = {n: t.float() for n, t in private_ckpt.tensors()}
    cfg = private_ckpt.config
    max_seq = max(len(p) for p in prompts) + max_tokens + 1
    protection = ProtectionOptions(
        options.profile, options.device, options.k, obfuscation_seed=options.seed
    )
    served = build_model(private_ckpt, torch.float32, protection, 4, max_seq)
    try:
        crossing = served.crossing
        if crossing is None:
            raise ValueError(f"profile {options.profile} offloads nothing to a device")
        # recording starts when serving does: the weights put at build time are in the dump
        crossing.transcript.keep_payloads = record_calls
        tokenizer = private_ckpt.tokenizer or NoTokenizer()
        engine = Engine(served.model, tokenizer, max_batch=4, max_seq_len=max_seq)  # type: ignore[arg-type]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        engine.generate(prompts, params)
        dump = crossing.dump()
        calls = parse_calls(crossing.transcript.records) if record_calls else []
        profile = served.profile
        obfuscation = profile.obfuscation if isinstance(profile, Obfuscated) else None
    finally:
        served.close()
    private_names = [
        n
        for n, t in private_tensors.items()
        if is_private(n, cfg, options.k)
        and n in base_tensors
        and not torch.equal(t, base_tensors[n])
    ]
    return Observation(
        options.profile,
        cfg,
        base_tensors,
        dump,
        calls,
        private_tensors,
        private_names,
        obfuscation,
        private_ckpt.name,
    )


def parse_calls(records: list[Any]) -> list[Call]:
    """Offload calls from a transcript kept with payloads (cpu and process devices)."""
    calls: list[Call] = []
    for record in records:
        if record.dtype == "bytes":
            if record.name == "call" and record.payload is not None:
                header = json.loads(record.payload)
                calls.append(Call(str(header.get("call", header.get("op"))), header["params"]))
            continue
        if not calls or record.payload is None:
            continue
        dtype = getattr(torch, record.dtype.removeprefix("torch."))
        data = bytearray(record.payload)
        flat = (
            torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        )
        tensor = flat.view(dtype).reshape(record.shape)
        target = calls[-1].args if record.direction == "to_device" else calls[-1].outputs
        target[record.name] = tensor
    return calls


def fused_base(base: dict[str, torch.Tensor], layer: int, parts: tuple[str, ...]) -> torch.Tensor:
    return torch.cat([base[f"model.layers.{layer}.{p}.weight"] for p in parts])
