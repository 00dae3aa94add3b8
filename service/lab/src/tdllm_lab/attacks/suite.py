"""The whole suite: every attack against every profile it applies to, and docs/security.md's table.

`tdllm attack --all --write-docs docs/security.md` runs `SUITE` in order and rewrites the
``attack-suite`` section of the doc with what it measured, so the table is never typed by hand.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tdllm_lab.attacks.registry import runner
from tdllm_lab.attacks.result import AttackOptions, AttackResult

SECTION = "attack-suite"  # docs/security.md's generated section (doc_sections.py)

# (attack, profile): every pair the attack has a target in. A1 is not run on `obfuscated`,
# whose device holds (transformed) private weights by design: A2 measures what they give away.
SUITE: tuple[tuple[str, str], ...] = (
    ("A1", "split"),
    ("A1", "masked"),
    ("A2", "split"),
    ("A2", "masked"),
    ("A2", "obfuscated"),
    ("A4", "obfuscated"),
    ("A6", "obfuscated"),
    ("A8", "split"),
    ("A8", "masked"),
    ("A8", "obfuscated"),
    ("A14", "masked"),
    ("A15", "split"),
)


@dataclass(frozen=True)
class SuiteRow:
    result: AttackResult
    seconds: float


def run_suite(
    pairs: Sequence[tuple[str, str]],
    options: AttackOptions,
    progress: Callable[[int, str, str], None] | None = None,
) -> list[SuiteRow]:
    """Run each (attack, profile) in order, with `options` but for the profile."""
    rows = []
    for i, (name, profile) in enumerate(pairs):
        if progress is not None:
            progress(i, name, profile)
        started = time.perf_counter()
        result = runner(name)(dataclasses.replace(options, profile=profile))
        rows.append(SuiteRow(result, round(time.perf_counter() - started, 1)))
    return rows


def verdict(result: AttackResult) -> str:
    if result.passed:
        return "holds"
    if "claim" in result.detail:  # the profile does not claim this (e.g. split shows prompts)
        return "not protected (by design)"
    return "**broken**"


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


def evidence(result: AttackResult) -> str:
    """The measured numbers behind `result`, in one cell."""
    d, name = result.detail, result.attack
    if name == "A1":
        return (
            f"{d['non_public_resident_bytes']} non-public bytes in {d['resident_weights']} "
            f"resident weights; {d['private_window_hits']} of {d['private_windows_searched']} "
            f"private 16-byte windows found in {d['haystack_bytes']:,} device bytes"
        )
    if name == "A2" and "private_rows" not in d:
        return (
            f"{len(d['private_matrices_on_device'])} private matrices among the "
            f"{d['device_matrices']} the device holds"
        )
    if name == "A2":
        return (
            f"{_pct(d['private_rows_recovered'])} of {d['private_rows']:,} private rows "
            f"recovered; median weight error {_pct(d['median_relative_weight_error'])} vs the "
            f"base's {_pct(d['median_base_relative_error'])}; "
            f"{_pct(d['gain_recovered'])} of the fine-tune's delta recovered"
        )
    if name == "A4":
        bits = d["bits_left_per_layer_min"]
        return (
            f"AUC {d['classifier_auc']:.3f} on {d['slots']} pair slots ({d['decoys']} decoys); "
            f"search bits left per layer (min): {bits['frequency_cosine']:.3g} after the "
            "frequency and cosine filters"
        )
    if name == "A6":
        parts = []
        for layer, c in d["layers"].items():
            errors = c["relative_error_by_tokens"]
            most = max(errors, key=int)
            parts.append(
                f"{layer}: error {float(errors[most]):.2g} at {most} tokens "
                f"(base's own {c['base_relative_error']:.2g})"
            )
        return "; ".join(parts)
    if name == "A8":
        return (
            f"{_pct(d['nearest_neighbour_recovery'])} of {d['prompt_tokens']} prompt tokens "
            f"(chance {d['chance_rate']:.2g}); row-space membership F1 "
            f"{d['membership_bag_of_words_f1']:.2f}"
        )
    if name == "A15":
        curves, most = d["curves"], max(d["curves"]["text"], key=int)
        top = f"top-{d['top']}"
        text, logprobs = curves["text"][most], curves[top][most]
        return (
            f"after {most} queries of {d['new_tokens']} tokens: KL {text['kl']:.3g} from text vs "
            f"{logprobs['kl']:.3g} from {top} logprobs (base's tail {d['base']['kl']:.3g}); "
            f"greedy agreement {_pct(text['agreement'])} vs {_pct(logprobs['agreement'])} "
            f"(base {_pct(d['base']['agreement'])})"
        )
    if name == "A14":
        return (
            f"{d['undetected_total']} undetected of {d['trials']:,} forgeries; "
            f"{d['false_alarms']} false alarms in {d['honest_calls']:,} honest calls"
        )
    return ""


def format_section(
    rows: Sequence[SuiteRow], command: str, machine: dict[str, Any], now: datetime
) -> str:
    lines = [
        f"Written by `{command}` on {now:%Y-%m-%d} (do not edit by hand). Machine: "
        f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}.",
        "",
        "| attack | profile | metric | value | evidence | verdict | seconds |",
        "|---|---|---|---:|---|---|---:|",
    ]
    for row in rows:
        r = row.result
        lines.append(
            f"| {r.attack} | `{r.profile}` | {r.metric} | {r.value:.4g} | {evidence(r)} "
            f"| {verdict(r)} | {row.seconds:g} |"
        )
    return "\n".join(lines)
