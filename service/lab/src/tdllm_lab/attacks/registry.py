"""Every attack by name, imported lazily (each pulls in a profile and its device)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from tdllm_lab.attacks.result import AttackOptions, AttackResult

# NAME -> (module under tdllm_lab.attacks exposing run(options), one-line description)
ATTACKS: dict[str, tuple[str, str]] = {
    "A1": ("a1_private_bytes", "non-public bytes on the device (split, masked)"),
    "A8": ("a8_prompt_recovery", "prompt tokens recovered from device-visible activations"),
    "A2": ("a2_weight_matching", "device weights matched to the public base (obfuscated)"),
    "A4": ("a4_decoy_separation", "decoy vs real RoPE pairs told apart (obfuscated)"),
    "A6": ("a6_least_squares", "secret maps fitted from device input/output (obfuscated)"),
    "A14": ("a14_tampering", "undetected tampering with device results (masked)"),
    "A15": ("a15_tail_distillation", "an API user distils split's private tail (logprobs or not)"),
}


def attack_names() -> list[str]:
    return sorted(ATTACKS, key=lambda name: (len(name), name))


def runner(name: str) -> Callable[[AttackOptions], AttackResult]:
    module_name, _ = ATTACKS[name]
    module = importlib.import_module(f"tdllm_lab.attacks.{module_name}")
    run: Callable[[AttackOptions], AttackResult] = module.run
    return run
