"""`tdllm bench tolerance`: how far an honest device's results sit from the TD's own, which is
what `split`'s audit tolerance and Freivalds factor per device kind are set from
(`tdllm.trusted.device_rounding`).

For each device and dtype, `split` is built with every check on every step (audit and Freivalds
rate 1) but unbounded tolerances, so nothing stops; greedy generation over a few prompts, batched
(so audits replay whole batches and single rows) then reports the largest relative hidden-state
deviation the audits saw and the largest Freivalds residual in units of its rounding bound, next
to the tolerances configured now, and whether the greedy tokens equal td-only's on the TD CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tdllm.engine import Engine, SamplingParams
from tdllm.model.checkpoint import Checkpoint
from tdllm.profiles import ProtectionOptions, build_model
from tdllm.trusted.device_rounding import DeviceRounding, rounding_of
from tdllm.trusted.split import OffloadedPrefix

UNBOUNDED = DeviceRounding(
    exact_replay=False,
    audit_tolerance={torch.float32: float("inf"), torch.bfloat16: float("inf")},
    freivalds_factor=float("inf"),
)


def prompts(count: int, length: int) -> list[list[int]]:
    """Fixed token ids of varied lengths (deterministic; real vocabulary range)."""
    return [
        [(i * 7919 + j * 104729) % 20000 + 100 for j in range(length + 3 * i)] for i in range(count)
    ]


def run_tolerance_bench(
    checkpoint: Checkpoint,
    devices: tuple[str, ...],
    dtypes: tuple[torch.dtype, ...],
    k: int,
    num_prompts: int,
    prompt_tokens: int,
    new_tokens: int,
    status: Callable[[str], None],
) -> dict[str, Any]:
    batch = prompts(num_prompts, prompt_tokens)
    max_seq = max(len(p) for p in batch) + new_tokens + 1
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    rows: list[dict[str, Any]] = []
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        status(f"tolerance: td-only {name} ...")
        reference = _greedy(checkpoint, dtype, ProtectionOptions("td-only"), batch, params, max_seq)
        for device in devices:
            status(f"tolerance: split on {device}, {name} ...")
            options = ProtectionOptions(
                "split", device, k, audit_rate=1.0, freivalds_rate=1.0, rounding=UNBOUNDED
            )
            served = build_model(checkpoint, dtype, options, len(batch), max_seq)
            try:
                engine = Engine(served.model, checkpoint.tokenizer, len(batch), max_seq)
                tokens = [c.token_ids for c in engine.generate(batch, params)]
                placement = served.model.prefix
                if not isinstance(placement, OffloadedPrefix) or placement.audit is None:
                    raise RuntimeError("split was built without its checks")
                audit, freivalds = placement.audit, placement.freivalds
                configured = rounding_of(device)
                rows.append(
                    {
                        "device": device,
                        "dtype": name,
                        "audited_rows": audit.checked_rows,
                        "max_audit_deviation": audit.max_deviation,
                        "audit_tolerance": configured.audit_tolerance_for(dtype),
                        "exact_replay": configured.exact_replay,
                        "freivalds_products": freivalds.checked if freivalds else 0,
                        "max_freivalds_ratio": freivalds.max_ratio if freivalds else None,
                        "freivalds_factor": configured.freivalds_factor,
                        "greedy_tokens_equal_td_only": sum(
                            a == b for a, b in zip(tokens, reference, strict=True)
                        ),
                        "sequences": len(batch),
                    }
                )
            finally:
                served.close()
    return {
        "model": checkpoint.name,
        "k": k,
        "prompts": num_prompts,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def _greedy(
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    options: ProtectionOptions,
    batch: list[list[int]],
    params: SamplingParams,
    max_seq: int,
) -> list[list[int]]:
    served = build_model(checkpoint, dtype, options, len(batch), max_seq)
    try:
        engine = Engine(served.model, checkpoint.tokenizer, len(batch), max_seq)
        return [c.token_ids for c in engine.generate(batch, params)]
    finally:
        served.close()


def format_tolerance_report(report: dict[str, Any]) -> str:
    lines = [
        f"model {report['model']}, K={report['k']}, {report['prompts']} prompts of "
        f"{report['prompt_tokens']}+ tokens, {report['new_tokens']} new, every step checked",
        f"{'device':<8} {'dtype':<9} {'rows':>6} {'audit max':>11} {'tolerance':>10} "
        f"{'products':>9} {'Freivalds max':>14} {'factor':>7} {'greedy = td-only':>17}",
    ]
    for r in report["rows"]:
        ratio = r["max_freivalds_ratio"]
        lines.append(
            f"{r['device']:<8} {r['dtype']:<9} {r['audited_rows']:>6} "
            f"{r['max_audit_deviation']:>11.3g} {r['audit_tolerance']:>10.3g} "
            f"{r['freivalds_products']:>9} {'-' if ratio is None else f'{ratio:.3g}':>14} "
            f"{r['freivalds_factor']:>7.3g} "
            f"{r['greedy_tokens_equal_td_only']:>10}/{r['sequences']}"
        )
    return "\n".join(lines)
