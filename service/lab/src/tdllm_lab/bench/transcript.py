"""`tdllm bench transcript`: a digest of everything a profile's device sees and holds, so a
refactor can show that nothing the untrusted side observes changed (compare two commits' digests).

Per profile: SHA-256 over every crossing record (direction, name, payload) of a fixed greedy
generation, and over every tensor the device holds afterwards. `masked`'s one-time-padded
activations and the device's products of them (records ``x`` and ``y``) are fresh OS randomness
in every run, so they are counted, not hashed; everything else is deterministic (obfuscated with
a fixed seed, audits off).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import torch

from tdllm.engine import Engine, SamplingParams
from tdllm.model.checkpoint import Checkpoint
from tdllm.profiles import ProtectionOptions, build_model

PROFILES = ("split", "masked", "obfuscated")
PROMPTS = ("The capital of France is", "Zorblax Dynamics is based in")
PADDED = {"x", "y"}  # masked: padded words and their products, random in every run


def digest(
    checkpoint: Checkpoint, options: ProtectionOptions, new_tokens: int, prompts: list[list[int]]
) -> dict[str, Any]:
    """`options.profile` serving `prompts` greedily on a cpu device that keeps every byte."""
    profile = options.profile
    options = dataclasses.replace(
        options, device="cpu", audit_rate=0.0, freivalds_rate=0.0, keep_payloads=True
    )
    tok = checkpoint.tokenizer
    max_seq = max(len(p) for p in prompts) + new_tokens + 1
    served = build_model(checkpoint, torch.float32, options, len(prompts), max_seq)
    try:
        crossing = served.crossing
        if crossing is None:
            raise RuntimeError(f"{profile} opened no crossing")
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        Engine(served.model, tok, len(prompts), max_seq).generate(prompts, params)
        seen, padded = hashlib.sha256(), 0
        for record in crossing.transcript.records:
            if profile == "masked" and record.name in PADDED:
                padded += 1
                continue
            seen.update(f"{record.direction}|{record.name}|".encode())
            seen.update(record.payload or b"")
        held = hashlib.sha256()
        for name, tensor in sorted(crossing.dump().items()):
            held.update(name.encode())
            held.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
        return {
            "profile": profile,
            "records": len(crossing.transcript.records),
            "padded_records": padded,
            "seen_sha256": seen.hexdigest(),
            "held_sha256": held.hexdigest(),
        }
    finally:
        served.close()


def run_transcript_bench(
    checkpoint: Checkpoint, k: int, new_tokens: int, status: Callable[[str], None]
) -> dict[str, Any]:
    rows = []
    prompts = [checkpoint.tokenizer.encode(text) for text in PROMPTS]
    for profile in PROFILES:
        status(f"transcript: {profile}")
        options = ProtectionOptions(profile, k=k, obfuscation_seed=0)
        rows.append(digest(checkpoint, options, new_tokens, prompts))
    return {"model": checkpoint.name, "k": k, "new_tokens": new_tokens, "rows": rows}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"model {report['model']}, K={report['k']}, {report['new_tokens']} greedy tokens"]
    for r in report["rows"]:
        lines.append(
            f"{r['profile']:<10} {r['records']:>6} records ({r['padded_records']} padded)  "
            f"seen {r['seen_sha256'][:16]}  held {r['held_sha256'][:16]}"
        )
    return "\n".join(lines)
