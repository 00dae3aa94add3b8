"""Every attack by name, imported lazily (each pulls in a profile and its device)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from tdllm.attacks.result import AttackOptions, AttackResult

# NAME -> (module under tdllm.attacks exposing run(options), one-line description)
ATTACKS: dict[str, tuple[str, str]] = {}


def attack_names() -> list[str]:
    return sorted(ATTACKS, key=lambda name: (len(name), name))


def runner(name: str) -> Callable[[AttackOptions], AttackResult]:
    module_name, _ = ATTACKS[name]
    module = importlib.import_module(f"tdllm.attacks.{module_name}")
    run: Callable[[AttackOptions], AttackResult] = module.run
    return run
