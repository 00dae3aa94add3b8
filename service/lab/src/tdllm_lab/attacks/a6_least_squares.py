"""A6: fit a secret map by least squares from what the device sees going in and coming out.

Against `obfuscated` (design §7.2 attack 5: x is in plaintext). The device computes the padded,
permuted, scaled v rows ``v̂ = x·Ŵvᵀ`` itself, and the TD later sends it the o_proj input
``a = softmax(qkᵀ)·v`` in plaintext, where ``v = R(v̂)`` is the TD's secret restore (row
selection and scales). For the first token of a sequence the softmax has one entry, so
``a = R(v̂)`` exactly (per query head, the v of its KV group): every single-token prompt is one
exact input/output pair of the secret map R. An API user (G3) sends N single-token prompts of
its choosing; the device (G1) records (v̂, a) per layer; ``X = lstsq(V̂, A)`` estimates R, and
``Xᵀ·Ŵv`` the private v_proj rows (per query head). No public base is needed.

Reported: the relative error ``‖Ŵ - W‖/‖W‖`` of the recovered private v_proj against the number
of tokens observed, the tokens needed to reach 10%, and the base's own error for comparison.
The claim (decoys and permutations hide the weights) holds only if the error stays at or above
the base's however many tokens are observed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from tdllm.errors import UsageError
from tdllm.model.checkpoint import Checkpoint
from tdllm_lab.attacks.device_view import Call, Observation, observe
from tdllm_lab.attacks.result import AttackOptions, AttackResult

TOKENS, QUICK_TOKENS = 512, 256
COUNTS = (16, 32, 64, 128, 192, 224, 256, 384, 512)


def pairs_of(calls: list[Call], layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(v̂, a) rows of every first-position token of `layer` in the recorded calls."""
    outputs, inputs = [], []
    pending: torch.Tensor | None = None
    for call in calls:
        if call.op == "obfuscated_ops.attention_scores" and call.params.get("layer") == layer:
            x = call.args["x"]
            first = x.shape[1] == 1 and all(int(s) == 0 for s in call.params["starts"])
            pending = call.outputs["v"][:, 0] if first else None
        elif call.op == "obfuscated_ops.linear" and call.params.get("weight") == f"{layer}.o":
            if pending is not None:
                outputs.append(pending)
                inputs.append(call.args["x"][:, 0])
            pending = None
    if not outputs:
        raise ValueError(f"no first-position pairs of {layer} were observed")
    return torch.cat(outputs).double(), torch.cat(inputs).double()


def recover_v(v_hat: torch.Tensor, a: torch.Tensor, w_v_dev: torch.Tensor) -> torch.Tensor:
    """Least-squares restore map from (v̂, a) rows, applied to the device's v rows."""
    solution = torch.linalg.pinv(v_hat) @ a  # min-norm: [v_rows, heads*head_dim]
    return solution.T @ w_v_dev.double()


def true_v_per_query_head(obs: Observation, layer: str) -> torch.Tensor:
    cfg = obs.cfg
    w = obs.private[f"{layer}.self_attn.v_proj.weight"].double()
    per_kv = w.view(cfg.num_kv_heads, cfg.head_dim, -1)
    group = cfg.num_heads // cfg.num_kv_heads
    return per_kv.repeat_interleave(group, dim=0).reshape(cfg.num_heads * cfg.head_dim, -1)


def observe_first_tokens(
    options: AttackOptions, n: int, base: Checkpoint, private: Checkpoint | None = None
) -> Observation:
    """The attacker's N single-token prompts (distinct chosen tokens), served for real."""
    vocab = base.config.vocab_size
    chosen = torch.randperm(vocab, generator=torch.Generator().manual_seed(options.seed))[:n]
    prompts = [[int(t)] for t in chosen]
    return observe(options, prompts, max_tokens=1, record_calls=True, base=base, private=private)


@dataclass
class Curve:
    """One layer's recovery: relative error of the fitted private v_proj per token count."""

    observed_tokens: int
    unknowns_per_output: int  # device v rows (real + decoy): the least-squares unknowns
    errors: dict[int, float]
    base_error: float  # ‖B - W‖/‖W‖: the public base's own error

    @property
    def tokens_to_10_percent(self) -> int | None:
        reached = [n for n, e in self.errors.items() if e <= 0.10]
        return min(reached) if reached else None

    def to_json(self) -> dict[str, Any]:
        return {
            "observed_tokens": self.observed_tokens,
            "unknowns_per_output": self.unknowns_per_output,
            "relative_error_by_tokens": self.errors,
            "tokens_to_10_percent": self.tokens_to_10_percent,
            "base_relative_error": self.base_error,
        }


def curve(obs: Observation, layer: str, counts: list[int]) -> Curve:
    cfg = obs.cfg
    v_hat, a = pairs_of(obs.calls, layer)
    qkv = obs.dump[f"{layer}.qkv"]
    dim = 2 * obs.dump[f"{layer}.inv_freq"].shape[1]
    w_v_dev = qkv[(cfg.num_heads + cfg.num_kv_heads) * dim :]
    truth = true_v_per_query_head(obs, layer)
    base = obs.base[f"{layer}.self_attn.v_proj.weight"].double()
    group = cfg.num_heads // cfg.num_kv_heads
    base_q = base.view(cfg.num_kv_heads, cfg.head_dim, -1).repeat_interleave(group, 0)
    base_error = float((base_q.reshape_as(truth) - truth).norm() / truth.norm())
    errors = {}
    for n in counts:
        if n > v_hat.shape[0]:
            break
        estimate = recover_v(v_hat[:n], a[:n], w_v_dev)
        errors[n] = float((estimate - truth).norm() / truth.norm())
    return Curve(v_hat.shape[0], w_v_dev.shape[0], errors, base_error)


def measure(obs: Observation, counts: list[int]) -> dict[str, Curve]:
    """A6 per private layer of a run that served single-token prompts (`observe_first_tokens`)."""
    return {
        f"model.layers.{i}": curve(obs, f"model.layers.{i}", counts) for i in obs.private_layers()
    }


def run(options: AttackOptions) -> AttackResult:
    if options.profile != "obfuscated":
        raise UsageError("A6 fits the obfuscated profile's secret restore maps")
    started = time.perf_counter()
    n = QUICK_TOKENS if options.quick else TOKENS
    from tdllm_lab.attacks.device_view import base_checkpoint

    obs = observe_first_tokens(options, n, base_checkpoint())
    counts = [c for c in COUNTS if c <= n]
    curves = measure(obs, counts)
    final = max(c.errors[max(c.errors)] for c in curves.values())
    base_error = min(c.base_error for c in curves.values())
    return AttackResult(
        "A6",
        options.profile,
        f"relative error of the private v_proj fitted from {n} device-observed tokens",
        final,
        final >= base_error,
        {
            "model": obs.model_name,
            "layers": {name: c.to_json() for name, c in curves.items()},
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
