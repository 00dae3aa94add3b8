"""A1: non-public bytes on the device, for `split` and `masked`.

The adversary's haystack is everything the device held (its dump after serving) and everything
that crossed in either direction (the transcript's payloads) while a few prompts were prefilled
and decoded. Two measurements:

1. resident weights: every weight the device holds must be public, i.e. bit-identical to the
   pinned public tensor (`split`: sha256 against the public reference) or to the deterministic
   int8 quantization of the public base weight (`masked`); the bytes of any that are not are
   counted;
2. byte search: distinctive 16-byte windows of every private tensor (those that equal no base
   tensor), both as fp32 and as its int8 per-row quantization (where that differs from the base's
   quantization), are searched for in the haystack.

``value`` = non-public resident bytes + 16 x windows found; the claim holds at 0.
`open_target` (which also opens `obfuscated`, whose device holds transformed private weights by
design, for A8) and `prefill_and_decode` are shared with A8.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

from tdllm.errors import UsageError
from tdllm.model.checkpoint import Checkpoint
from tdllm.model.loader import load_model
from tdllm.model.transformer import Batch, KVCache, Transformer
from tdllm.profiles.masked import build_masked, fused_base_weight, masked_linears
from tdllm.profiles.options import ProtectionOptions
from tdllm.profiles.registry import build_model
from tdllm.sources import open_checkpoint
from tdllm.trusted.crossing import Crossing
from tdllm.trusted.masked_ring import quantize_weight
from tdllm.trusted.public_reference import PublicReference
from tdllm.trusted.split import offload_public_prefix
from tdllm_lab.attacks.result import AttackOptions, AttackResult
from tdllm_lab.protection.private_cache import DEFAULT_CACHE, private_model_dir

WINDOW = 16
WINDOWS_PER_TENSOR = 8
PROFILES = ("split", "masked")  # A1's targets; the other profiles put private bytes there
TARGETS = (*PROFILES, "obfuscated")


@dataclasses.dataclass
class Target:
    profile: str
    model: Transformer
    crossing: Crossing
    base: dict[str, torch.Tensor]
    private: dict[str, torch.Tensor]
    max_seq: int

    def close(self) -> None:
        self.crossing.close()


def default_checkpoints(k: int) -> tuple[Checkpoint, Checkpoint]:
    """(private, base): the bundled SmolLM2 as the public base and its private fine-tune
    (`tdllm finetune-tail`, trained once into the project's cache)."""
    return open_checkpoint(private_model_dir(DEFAULT_CACHE, k)), open_checkpoint("bundled")


def open_target(
    profile: str, device: str, private: Checkpoint, base: Checkpoint, k: int, max_seq: int
) -> Target:
    """`private` served by `profile` on a fresh `device` that keeps every crossing byte."""
    if profile not in TARGETS:
        raise UsageError(f"this attack targets {', '.join(TARGETS)}, not {profile!r}")
    base_tensors = {n: t.float() for n, t in base.tensors()}
    private_tensors = {n: t.float() for n, t in private.tensors()}
    if profile == "obfuscated":
        options = ProtectionOptions(profile, device, k, keep_payloads=True)
        served = build_model(private, torch.float32, options, 1, max_seq)
        if served.crossing is None:  # obfuscated always offloads; a build that did not is a bug
            raise RuntimeError("the obfuscated build opened no crossing")
        return Target(
            profile, served.model, served.crossing, base_tensors, private_tensors, max_seq
        )
    crossing = Crossing.open(device, keep_payloads=True)
    try:
        if profile == "split":
            model, _ = load_model(private, torch.float32)
            reference = PublicReference.build(base.name, base_tensors.items())
            model.place(
                offload_public_prefix(model, private, reference, crossing, k, 1, max_seq, 0.0)
            )
        else:
            model, _ = build_masked(private, base, torch.float32, crossing)
    except BaseException:
        crossing.close()
        raise
    return Target(profile, model, crossing, base_tensors, private_tensors, max_seq)


def prefill_and_decode(target: Target, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy: prefill `prompt` into slot 0 of a fresh cache, then decode `new_tokens`."""
    model = target.model
    cache = KVCache(model.cfg, 1, target.max_seq, torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), Batch([0], [0], len(prompt)), cache)
        out: list[int] = []
        for step in range(new_tokens):
            token = int(logits[0, -1].argmax())
            out.append(token)
            if step + 1 < new_tokens:
                batch = Batch([0], [len(prompt) + step], 1)
                logits = model(torch.tensor([[token]]), batch, cache)
    return out


def raw_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes())


def _windows(data: bytes, stride: int, count: int = WINDOWS_PER_TENSOR) -> list[bytes]:
    step = max(stride, (len(data) - WINDOW) // count // stride * stride)
    return [data[i : i + WINDOW] for i in range(0, len(data) - WINDOW, step)][:count]


def private_windows(
    private: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
) -> Iterator[tuple[str, bytes]]:
    """(tensor name, 16 bytes) of every private tensor, as fp32 and as int8 per-row quantized.

    A private tensor equal to any public one (the same name, or an untied head kept as the
    base's embedding) is skipped: the attacker holds those bytes already."""
    reference = PublicReference.build("base", base.items())
    for name, tensor in sorted(private.items()):
        public = base.get(name)
        if reference.holds(tensor):
            continue
        for window in _windows(raw_bytes(tensor), 4):
            yield name, window
        if tensor.dim() == 2 and public is not None and public.shape == tensor.shape:
            mine, theirs = quantize_weight(tensor)[0], quantize_weight(public)[0]
            differs = (mine != theirs).reshape(-1)
            flat = raw_bytes(mine)
            starts = [i for i in range(0, len(flat) - WINDOW, 97) if differs[i : i + WINDOW].any()]
            for i in starts[:: max(1, len(starts) // WINDOWS_PER_TENSOR)][:WINDOWS_PER_TENSOR]:
                yield name + ":int8", flat[i : i + WINDOW]


def public_resident(target: Target) -> dict[str, torch.Tensor]:
    """The weights the device may hold under each name, as the profile's public derivation."""
    if target.profile == "masked":
        return {
            linear.name: quantize_weight(fused_base_weight(target.base, linear.name))[0]
            for linear in masked_linears(target.model)
        }
    return dict(target.base)


def measure(target: Target, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    for prompt in prompts:
        prefill_and_decode(target, prompt, new_tokens)
    held = target.crossing.dump()
    haystack = b"".join(r.payload or b"" for r in target.crossing.transcript.records)
    haystack += b"".join(raw_bytes(t) for t in held.values())
    allowed = public_resident(target)
    weights = {n: t for n, t in held.items() if not n.startswith("kv.")}
    non_public = {
        n: t.numel() * t.element_size()
        for n, t in weights.items()
        if n not in allowed
        or allowed[n].shape != t.shape
        or not torch.equal(allowed[n].to(t.dtype), t)
    }
    windows = list(private_windows(target.private, target.base))
    found = sorted({name for name, w in windows if w in haystack})
    return {
        "haystack_bytes": len(haystack),
        "resident_weights": len(weights),
        "non_public_resident_bytes": sum(non_public.values()),
        "non_public_resident": sorted(non_public),
        "private_windows_searched": len(windows),
        "private_tensors_found": found,
        "private_window_hits": sum(1 for _, w in windows if w in haystack),
    }


def run(options: AttackOptions) -> AttackResult:
    if options.profile not in PROFILES:
        raise UsageError(f"A1 targets {' or '.join(PROFILES)}, not {options.profile!r}")
    private, base = default_checkpoints(options.k)
    prompts = [[(i * 7919 + j * 104729) % 40000 + 100 for j in range(24)] for i in range(4)]
    prompts = prompts[:1] if options.quick else prompts
    target = open_target(options.profile, options.device, private, base, options.k, 40)
    try:
        detail = measure(target, prompts, 4 if options.quick else 8)
    finally:
        target.close()
    value = detail["non_public_resident_bytes"] + WINDOW * detail["private_window_hits"]
    return AttackResult(
        "A1", options.profile, "non-public bytes on the device", value, value == 0, detail
    )
