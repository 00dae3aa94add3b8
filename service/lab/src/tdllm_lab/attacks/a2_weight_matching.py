"""A2: match the device's weight rows to the public base's, undo scales, read off the private rows.

Design §9 A2 against what the device holds after a real run. For each device-resident matrix
the attacker knows which base matrix it stands for (the resident names and shapes say so), folds
each row's scale and sign away (cosine on unit rows), and solves the assignment problem between
base rows and device rows (`scipy.optimize.linear_sum_assignment`, Hungarian; for the 49k-row
lm_head, nearest neighbour by cosine instead). Unassigned device rows are the decoys. Each
recovered row is then rescaled by least squares onto its base row (``a = ⟨d, b⟩ / ⟨b, b⟩``) —
a fine-tune is a small change of the base, so the scale of the matched base row is the scale
of the private row — and ``d / a`` is the attacker's estimate of the private row.

Scored against the TD's secrets (never seen by the attack):

- **rows recovered** (the reported value): private rows whose estimate is closer to the private
  row than half the base row's distance to it — the attacker learned that row beyond the base;
- **rows assigned**: base row i assigned to the device row that really holds private row i;
- **relative weight error** ``‖Ŵ - W‖ / ‖W‖`` of the recovered private matrices, next to the
  base's own error ``‖B - W‖ / ‖W‖`` (what an attacker has without the device);
- **gain recovered** ``1 - ‖Ŵ - W‖² / ‖B - W‖²``: the share of the fine-tune (the delta from the
  base) the attacker now holds (1: all of it; 0: nothing beyond the base).

The claim under test (the seed's: the device cannot separate and recover the real weights) holds
only if rows recovered stay at chance. For `split` the device holds no private matrix at all
(only the public prefix), so nothing is recovered by construction, and that is what is reported.
For `masked` the device holds the public base quantized to int8 under each projection's name;
the same matching and rescaling runs on it, and the estimate can be no better than the base.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment  # type: ignore[import-untyped]

from tdllm.errors import UsageError
from tdllm_lab.attacks.device_view import Observation, fused_base, observe
from tdllm_lab.attacks.result import AttackOptions, AttackResult

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Tell me about Zorblax."]
ASSIGNMENT_LIMIT = 6000  # rows: above this, nearest neighbour instead of the Hungarian solver
QUICK_HEAD_ROWS = 2048  # --quick: lm_head rows scored (a seeded sample)
CHANCE_MARGIN = 0.05  # the claim holds if at most this share of private rows is recovered
METRIC = "fraction of private weight rows recovered (estimate within half the base's distance)"


@dataclass
class Match:
    name: str
    rows: int
    assigned: int  # rows assigned to the device row that truly holds them
    recovered: int  # rows estimated within half the base's distance of the private row
    private: bool
    error: float | None = None  # ‖Ŵ - W‖/‖W‖ (private matrices)
    base_error: float | None = None  # ‖B - W‖/‖W‖


def match_rows(device: torch.Tensor, base: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """For each base row, the device row assigned to it and the estimate of that row."""
    d = device.double()
    b = base.double()
    dn = d / d.norm(dim=1, keepdim=True).clamp_min(1e-30)
    bn = b / b.norm(dim=1, keepdim=True).clamp_min(1e-30)
    if max(d.shape[0], b.shape[0]) <= ASSIGNMENT_LIMIT:
        cost = -(bn @ dn.T).abs().numpy()
        rows, cols = linear_sum_assignment(cost)
        assigned = np.empty(b.shape[0], dtype=np.int64)
        assigned[rows] = cols
    else:
        assigned = np.empty(b.shape[0], dtype=np.int64)
        for start in range(0, b.shape[0], 1024):
            sims = (bn[start : start + 1024] @ dn.T).abs()
            assigned[start : start + 1024] = sims.argmax(dim=1).numpy()
    picked = d[torch.from_numpy(assigned)]
    alpha = (picked * b).sum(1) / (b * b).sum(1).clamp_min(1e-30)
    return assigned, picked / alpha[:, None]


def attack_obfuscated(obs: Observation, layers: list[int], head_rows: int | None) -> list[Match]:
    ob = obs.obfuscation
    if ob is None:
        raise ValueError("scoring A2 needs the TD's secrets of an obfuscated run")
    cfg, dump = obs.cfg, obs.dump
    heads, kv = cfg.num_heads, cfg.num_kv_heads
    hd = cfg.head_dim
    matches: list[Match] = []
    for i in layers:
        layer = f"model.layers.{i}"
        qkv = dump[f"{layer}.qkv"]
        dim = 2 * dump[f"{layer}.inv_freq"].shape[1]  # padded head dim: public to the device
        blocks = {
            "q_proj": qkv[: heads * dim],
            "k_proj": qkv[heads * dim : (heads + kv) * dim],
            "v_proj": qkv[(heads + kv) * dim :],
        }
        qk = ob.qk[layer]
        truth = {
            "q_proj": [qk.q_row(h, r) for h in range(heads) for r in range(hd)],
            "k_proj": [qk.k_row(g, r) for g in range(kv) for r in range(hd)],
            "v_proj": ob.shadow[f"{layer}.v"].index.tolist(),
        }
        for part, block in blocks.items():
            name = f"{layer}.self_attn.{part}.weight"
            matches.append(score(name, block, obs.base[name], obs.private[name], truth[part]))
        for resident, parts, module in (
            ("o", ("o_proj",), "self_attn"),
            ("gate_up", ("gate_proj", "up_proj"), "mlp"),
            ("down", ("down_proj",), "mlp"),
        ):
            names = tuple(f"{module}.{p}" for p in parts)
            base = fused_base(obs.base, i, names)
            private = fused_base(obs.private, i, names)
            name = f"{layer}.{module}.{'_'.join(parts)}.weight"
            truth_rows = ob.shadow[f"{layer}.{resident}"].index.tolist()
            matches.append(score(name, dump[f"{layer}.{resident}"], base, private, truth_rows))
    if head_rows != 0:
        base, private = obs.base["lm_head.weight"], obs.private["lm_head.weight"]
        head_truth = ob.shadow["lm_head"].index
        if head_rows is not None and head_rows < base.shape[0]:
            pick = torch.randperm(base.shape[0], generator=torch.Generator().manual_seed(0))
            pick = pick[:head_rows].sort().values
            base, private, head_truth = base[pick], private[pick], head_truth[pick]
        matches.append(score("lm_head.weight", dump["lm_head"], base, private, head_truth.tolist()))
    return matches


def score(
    name: str,
    device: torch.Tensor,
    base: torch.Tensor,
    private: torch.Tensor,
    truth: list[int],
) -> Match:
    assigned, estimate = match_rows(device, base)
    w = private.double()
    closer = (estimate - w).norm(dim=1) < 0.5 * (base.double() - w).norm(dim=1)
    return Match(
        name,
        base.shape[0],
        int((assigned == np.asarray(truth)).sum()),
        int(closer.sum()),
        not torch.equal(private, base),  # the fine-tune changed this matrix
        float((estimate - w).norm() / w.norm()),
        float((base.double() - w).norm() / w.norm()),
    )


def run(options: AttackOptions) -> AttackResult:
    if options.profile not in ("obfuscated", "split", "masked"):
        raise UsageError("A2 attacks the device weights of obfuscated, masked and split")
    from tdllm_lab.attacks.device_view import base_checkpoint

    started = time.perf_counter()
    base = base_checkpoint()
    obs = observe(options, [base.tokenizer.encode(p) for p in PROMPTS], max_tokens=4, base=base)
    if options.profile == "split":
        return split_result(obs, obs.private_layers())
    layers = obs.private_layers() if options.quick else list(range(obs.cfg.num_layers))
    detail = measure(obs, layers, QUICK_HEAD_ROWS if options.quick else None)
    detail["seconds"] = round(time.perf_counter() - started, 1)
    recovered = float(detail["private_rows_recovered"])
    return AttackResult(
        "A2",
        options.profile,
        METRIC,
        recovered,
        recovered <= CHANCE_MARGIN,
        detail,
    )


def measure(obs: Observation, layers: list[int], head_rows: int | None) -> dict[str, Any]:
    """A2 on a run's dump: per-matrix matches and the totals over private ones."""
    if obs.obfuscation is not None:
        matches = attack_obfuscated(obs, layers, head_rows)
    else:
        matches = attack_by_name(obs, layers)
    if not any(m.private for m in matches):
        raise ValueError("the device holds no matrix standing for a private one")
    private = [m for m in matches if m.private]
    rows = sum(m.rows for m in private)
    errors = [(m.error or 0.0) ** 2 for m in private]
    base_errors = [(m.base_error or 0.0) ** 2 for m in private]
    gain = 1.0 - sum(errors) / sum(base_errors) if sum(base_errors) > 0 else 0.0
    return {
        "model": obs.model_name,
        "layers_attacked": layers,
        "private_layers": obs.private_layers(),
        "private_rows_recovered": sum(m.recovered for m in private) / rows,
        "private_rows_assigned": sum(m.assigned for m in private) / rows,
        # public matrices too: every device row put back in its place (the whole model)
        "rows_assigned_all_matrices": sum(m.assigned for m in matches)
        / sum(m.rows for m in matches),
        "private_rows": rows,
        "median_relative_weight_error": float(np.median([m.error for m in private])),
        "median_base_relative_error": float(np.median([m.base_error for m in private])),
        "gain_recovered": gain,
        "matrices": [
            {
                "name": m.name,
                "rows": m.rows,
                "assigned": m.assigned,
                "recovered": m.recovered,
                "private": m.private,
                "error": round(m.error or 0.0, 6),
                "base_error": round(m.base_error or 0.0, 6),
            }
            for m in matches
        ],
    }


def attack_by_name(obs: Observation, layers: list[int]) -> list[Match]:
    """Devices that hold projections under their own names (masked: the public base in int8)."""
    matches = []
    for i in layers:
        for fused, parts in PROJECTIONS:
            device = obs.dump.get(f"model.layers.{i}.{fused}")
            if device is None:
                continue
            module = fused.split(".")[0]
            names = tuple(f"{module}.{p}" for p in parts)
            base = fused_base(obs.base, i, names)
            private = fused_base(obs.private, i, names)
            rows = list(range(base.shape[0]))  # stored in order: the truth is the identity
            matches.append(score(f"model.layers.{i}.{fused}", device.float(), base, private, rows))
    return matches


PROJECTIONS = (
    ("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
    ("self_attn.o_proj", ("o_proj",)),
    ("mlp.gate_up_proj", ("gate_proj", "up_proj")),
    ("mlp.down_proj", ("down_proj",)),
)


def split_result(obs: Observation, private_layers: list[int]) -> AttackResult:
    """Split: the device holds only the public prefix; no private matrix to match."""
    held = {n for n in obs.dump if not n.startswith("kv.")}
    private_on_device = [n for n in obs.private_names if n in held]
    return AttackResult(
        "A2",
        obs.profile,
        METRIC,
        0.0 if not private_on_device else float("nan"),
        not private_on_device,
        {
            "model": obs.model_name,
            "private_layers": private_layers,
            "private_matrices_on_device": private_on_device,
            "device_matrices": len(held),
            "gain_recovered": 0.0,
        },
    )
