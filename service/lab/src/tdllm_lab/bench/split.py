"""`tdllm bench split`: td-only against split, masked and obfuscated on the cpu and process
devices, in one run.

The model is the real private fine-tune of the bundled base (`tdllm finetune-tail`, 20 steps,
seed 0, trained once into a cache: `private_cache.py`), fp32, batch 1, greedy, configurations
interleaved round-robin. Audits are off while timing (their cost is f x
the prefix time); crossing bytes exclude the one-time weight upload. `--quant` is repeatable:
every quant's rows join the one round-robin; a row's ratio is to td-only with its quant, and
`time_vs_quant_none` to its own profile and device without one (where that row ran too).

TD FLOPs: after timing, one more run of td-only and of every `process` row under torch's
`FlopCounterMode`. With the `process` device the device's work runs in another process, so
what the counter sees is exactly what the TD computed (pads, checks, restores, decoy scores and
its own layers included); it is reported as a share of td-only's count. (`cpu` rows run the
device's ops in the same process, so they are not counted.)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from tdllm.engine import Engine, SamplingParams
from tdllm.model.checkpoint import Checkpoint
from tdllm.profiles import ProtectionOptions, ServedModel, build_model
from tdllm.sources import open_checkpoint
from tdllm_lab.protection.private_cache import private_model_dir
from tdllm_lab.protection.private_model import stand_in_checkpoint

# masked checks every device product (its Freivalds cost is part of the profile); obfuscated has
# no integrity checks to turn off: their rows are the schemes as they are
DEVICE_PROFILES = ("split", "masked", "obfuscated")
DEFAULT_DEVICES = ("cpu", "process")
TAILS = ("finetuned", "stand-in")


def configs(
    devices: tuple[str, ...], quants: tuple[str, ...] = ("none",)
) -> list[tuple[str, str, str]]:
    """``(profile, device, quant)``: per quant, td-only first (that quant's ratios are to it),
    then each device profile on each device (with a quant, split and masked: obfuscated refuses
    one)."""
    rows = []
    for quant in quants:
        profiles = DEVICE_PROFILES if quant == "none" else ("split", "masked")
        rows += [("td-only", "cpu", quant)] + [(p, d, quant) for p in profiles for d in devices]
    return rows


def private_checkpoint(cache: Path, k: int, tail: str, status: Callable[[str], None]) -> Checkpoint:
    """The real fine-tune (trained once into `cache`), or the bundled base's perturbed stand-in
    (same shapes and arithmetic; for machines where no fine-tune can be trained or carried)."""
    if tail == "stand-in":
        return stand_in_checkpoint(open_checkpoint("bundled"), k)
    return open_checkpoint(private_model_dir(cache, k, log=status))


def run_split_bench(
    k: int,
    prompt_tokens: int,
    new_tokens: int,
    repeats: int,
    status: Callable[[str], None],
    cache: Path,
    devices: tuple[str, ...] = DEFAULT_DEVICES,
    tail: str = "finetuned",
    dtype: torch.dtype = torch.float32,
    quants: tuple[str, ...] = ("none",),
) -> dict[str, Any]:
    """All configurations built first, then timed round-robin, so load on shared cores hits
    every row alike instead of whichever configuration happened to run during a burst (several
    quants: all of their rows in one round-robin)."""
    checkpoint = private_checkpoint(cache, k, tail, status)
    prompt = [(i * 7919) % 1000 + 100 for i in range(prompt_tokens)]
    max_seq = prompt_tokens + new_tokens + 1
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    runs: list[_Run] = []
    try:
        for profile, device, quant in configs(devices, quants):
            status(f"bench: building {profile} on {device}, quant {quant} ...")
            options = ProtectionOptions(
                profile, device, k, audit_rate=0.0, freivalds_rate=0.0, quant=quant
            )
            served = build_model(checkpoint, dtype, options, 1, max_seq)
            engine = Engine(served.model, checkpoint.tokenizer, 1, max_seq)
            runs.append(_Run(profile, device, quant, served, engine))
        for run in runs:
            run.time(prompt, params)  # warm-up, not recorded
            run.seconds.clear()
        # greedy: a profile gives the same tokens on every device as on the reference `cpu`
        # device (masked's are its quantized reference's, not td-only's: docs/security.md)
        on_cpu = {(r.profile, r.quant): r.tokens for r in runs if r.device == "cpu"}
        for run in runs:
            reference = on_cpu.get((run.profile, run.quant), on_cpu[("td-only", run.quant)])
            run.same_tokens = run.tokens == reference
        before = [_crossed(r.served) for r in runs]
        for i in range(repeats):
            status(f"bench: round {i + 1}/{repeats}")
            for run in runs:
                run.time(prompt, params)
        rows = [
            run.row(len(prompt), (_crossed(run.served) - b) / repeats)
            for run, b in zip(runs, before, strict=True)
        ]
        if "none" in quants:  # the counter does not see the int8/int4 kernels: none counted
            status("bench: counting the TD's FLOPs (td-only and the process rows)")
        for run, row in zip(runs, rows, strict=True):
            if run.quant == "none" and (run.profile == "td-only" or run.device == "process"):
                row["td_flops"] = run.count_flops(prompt, params)
    finally:
        for run in runs:
            run.served.close()
    add_ratios(rows)
    return {
        "model": checkpoint.name,
        "dtype": str(dtype).removeprefix("torch."),
        "quants": list(quants),
        "k": k,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's time against td-only with its quant, and against its own profile and device
    without a quant where that row was run too."""
    td_only = {r["quant"]: r for r in rows if r["profile"] == "td-only"}
    plain = {(r["profile"], r["device"]): r for r in rows if r["quant"] == "none"}
    for row in rows:
        base = td_only[row["quant"]]
        row["time_vs_td_only"] = round(row["seconds"] / base["seconds"], 3)
        if "td_flops" in row and base.get("td_flops"):  # 0: oneDNN's prepacked bf16 ops
            row["td_flops_vs_td_only"] = round(row["td_flops"] / base["td_flops"], 4)
        unquantized = plain.get((row["profile"], row["device"]))
        if row["quant"] != "none" and unquantized is not None:
            row["time_vs_quant_none"] = round(row["seconds"] / unquantized["seconds"], 3)


@dataclass
class _Run:
    profile: str
    device: str
    quant: str
    served: ServedModel
    engine: Engine
    seconds: list[float] = field(default_factory=list)
    new_tokens: int = 0
    tokens: list[int] = field(default_factory=list)
    same_tokens: bool = True

    def time(self, prompt: list[int], params: SamplingParams) -> None:
        start = time.perf_counter()
        out = self.engine.generate([prompt], params)[0]
        self.seconds.append(time.perf_counter() - start)
        self.new_tokens = len(out.token_ids)
        self.tokens = list(out.token_ids)

    def count_flops(self, prompt: list[int], params: SamplingParams) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            self.engine.generate([prompt], params)
        return int(counter.get_total_flops())

    def row(self, prompt_tokens: int, crossed: float) -> dict[str, Any]:
        best = min(self.seconds)
        return {
            "profile": self.profile,
            "device": self.device,
            "quant": self.quant,
            "seconds": round(best, 4),
            "median_seconds": round(statistics.median(self.seconds), 4),
            "tokens_per_s": round(self.new_tokens / best, 2),
            "crossing_bytes_per_token": round(crossed / (prompt_tokens + self.new_tokens), 1),
            "tokens_equal_cpu": self.same_tokens,
        }


def _crossed(served: ServedModel) -> int:
    crossing = served.crossing
    return crossing.transcript.bytes_crossed() if crossing else 0


def format_split_report(report: dict[str, Any]) -> str:
    head = (
        f"model {report['model']}, K={report['k']}, prompt {report['prompt_tokens']} + "
        f"{report['new_tokens']} new tokens, batch 1, {report.get('dtype', 'float32')}, "
        f"{report['threads']} threads (x td-only: td-only with the row's quant)"
    )
    lines = [
        head,
        f"{'profile':<10} {'device':<8} {'quant':<11} {'s/run':>8} {'median':>8} {'tok/s':>8} "
        f"{'x td-only':>9} {'bytes/token':>12} {'vs cpu':>7} {'TD FLOPs':>9}",
    ]
    for r in report["rows"]:
        same = "same" if r.get("tokens_equal_cpu", True) else "DIFFER"
        lines.append(
            f"{r['profile']:<10} {r['device']:<8} {r.get('quant', 'none'):<11} "
            f"{r['seconds']:>8.3f} {r['median_seconds']:>8.3f} {r['tokens_per_s']:>8.2f} "
            f"{r['time_vs_td_only']:>9.3f} {r['crossing_bytes_per_token']:>12.1f} {same:>7} "
            + (f"{100 * r['td_flops_vs_td_only']:>8.1f}%" if "td_flops_vs_td_only" in r else "")
        )
    return "\n".join(lines)
