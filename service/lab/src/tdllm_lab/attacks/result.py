"""What one attack run measured, in the shape `tdllm attack --json` prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AttackOptions:
    profile: str
    device: str = "cpu"
    seed: int = 0
    k: int = 2  # tail layers kept in the TD by `split`
    quick: bool = False  # fewer prompts/trials: for the fast test suite, not for docs


@dataclass(frozen=True)
class AttackResult:
    attack: str  # "A1", "A2", ...
    profile: str
    metric: str  # what `value` is, in words, e.g. "non-public bytes on the device"
    value: float
    passed: bool  # the profile's claim against this attack holds (for this measurement)
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "attack": self.attack,
            "profile": self.profile,
            "metric": self.metric,
            "value": self.value,
            "pass": self.passed,
            "detail": self.detail,
        }

    def line(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        return f"{self.attack} {self.profile}: {self.metric} = {self.value:.6g} ({verdict})"
