"""A4: tell the decoy RoPE pairs of Wq/Wk from the real ones (design §7.2, §9 A4).

The device holds, per layer, the padded q|k weights and the RoPE frequency of every padded
pair (it must rotate them). For every pair slot of every KV group the attacker computes:

- **frequency multiplicity**: how often the slot's frequency occurs in the group's table. The
  real table is public and has distinct frequencies, so decoys either add a new frequency or
  duplicate a real one (this profile duplicates); only duplicated frequencies stay ambiguous.
- **cosine to base**: the largest ``|cos|`` between the slot's q/k rows and the public base's
  q/k rows of the same layer (scales fold away); real rows are near copies of base rows.
- **distribution**: excess kurtosis of the slot's (row-standardized) weights; decoys are drawn
  from a normal, real rows are heavier-tailed.

A logistic regression (scikit-learn) is trained on the attacker's own obfuscation of the public
base (the algorithm is public; only the secrets are not, so the attacker makes labelled
instances at will) and applied to the device's slots. Reported: the AUC of each feature and of
the classifier against the TD's truth, and the search bits left per head (KV group):
``log2 C(pairs + decoys, decoys)`` with no information, ``Σ log2 m_f`` over frequency groups
after the frequency filter, and ``Σ log2 rank`` of the real pair inside each group after
ranking by cosine (0 when the top choice is always the real pair). The design's bar to ship
decoys: AUC ≤ 0.55 and ≥ 80 bits left per layer.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]
from sklearn.metrics import roc_auc_score  # type: ignore[import-untyped]

from tdllm.errors import UsageError
from tdllm.trusted.obfuscation import DEFAULT_ETA, generator, pad_qk
from tdllm_lab.attacks.a2_weight_matching import PROMPTS
from tdllm_lab.attacks.device_view import Observation, base_checkpoint, observe
from tdllm_lab.attacks.result import AttackOptions, AttackResult

AUC_BAR, BITS_BAR = 0.55, 80.0
ATTACKER_SEED = 12345  # the attacker's own obfuscation of the base (training data)


@dataclass
class Slots:
    """Per-slot features and labels of one layer's padded q|k (all KV groups)."""

    features: np.ndarray  # [n, 3]: multiplicity, max |cos| to base, excess kurtosis
    decoy: np.ndarray  # [n] bool (truth; for the attacker's own instances, its labels)
    group: np.ndarray  # [n] KV group of the slot
    freq: np.ndarray  # [n] the slot's frequency


def slot_features(
    q_dev: torch.Tensor,
    k_dev: torch.Tensor,
    freq: torch.Tensor,
    base_q: torch.Tensor,
    base_k: torch.Tensor,
    heads: int,
    kv_heads: int,
    decoy_slots: list[set[int]],
) -> Slots:
    units = freq.shape[1]
    dim = 2 * units
    group = heads // kv_heads
    bq = _unit_rows(base_q.double())
    bk = _unit_rows(base_k.double())
    qn = _unit_rows(q_dev.double())
    kn = _unit_rows(k_dev.double())
    q_cos = (qn @ bq.T).abs().amax(dim=1).view(heads, dim)
    k_cos = (kn @ bk.T).abs().amax(dim=1).view(kv_heads, dim)
    q_std = _standardized(q_dev.double()).view(heads, dim, -1)
    k_std = _standardized(k_dev.double()).view(kv_heads, dim, -1)
    rows = []
    for g in range(kv_heads):
        table = Counter(freq[g].tolist())
        members = range(g * group, (g + 1) * group)
        for j in range(units):
            cols = [j, j + units]
            cos = torch.cat([k_cos[g, cols]] + [q_cos[h, cols] for h in members]).mean()
            weights = torch.cat(
                [k_std[g, cols].flatten()] + [q_std[h, cols].flatten() for h in members]
            )
            kurt = float(((weights - weights.mean()) ** 4).mean() / weights.var() ** 2 - 3)
            value = float(freq[g, j])
            rows.append((table[value], float(cos), kurt, j in decoy_slots[g], g, value))
    data = np.array(rows, dtype=np.float64)
    return Slots(data[:, :3], data[:, 3].astype(bool), data[:, 4].astype(int), data[:, 5])


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)


def _standardized(w: torch.Tensor) -> torch.Tensor:
    return (w - w.mean(dim=1, keepdim=True)) / w.std(dim=1, keepdim=True).clamp_min(1e-30)


def device_slots(obs: Observation, layer: int) -> Slots:
    ob = obs.obfuscation
    if ob is None:
        raise ValueError("scoring A4 needs the TD's secrets of an obfuscated run")
    cfg, name = obs.cfg, f"model.layers.{layer}"
    freq = obs.dump[f"{name}.inv_freq"].double()
    dim = 2 * freq.shape[1]
    qkv = obs.dump[f"{name}.qkv"]
    q_rows, k_rows = cfg.num_heads * dim, cfg.num_kv_heads * dim
    secret = ob.qk[name]
    return slot_features(
        qkv[:q_rows],
        qkv[q_rows : q_rows + k_rows],
        freq,
        obs.base[f"{name}.self_attn.q_proj.weight"],
        obs.base[f"{name}.self_attn.k_proj.weight"],
        cfg.num_heads,
        cfg.num_kv_heads,
        [set(secret.decoy_slots(g)) for g in range(cfg.num_kv_heads)],
    )


def attacker_slots(obs: Observation, layer: int, seed: int) -> Slots:
    """The attacker obfuscates the public base's layer itself: labelled training instances."""
    cfg, name = obs.cfg, f"model.layers.{layer}"
    wq = obs.base[f"{name}.self_attn.q_proj.weight"]
    wk = obs.base[f"{name}.self_attn.k_proj.weight"]
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    q_dev, k_dev, secret = pad_qk(
        wq,
        wk,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        inv_freq,
        DEFAULT_ETA,
        generator(seed),
    )
    return slot_features(
        q_dev,
        k_dev,
        secret.device_freq,
        wq,
        wk,
        cfg.num_heads,
        cfg.num_kv_heads,
        [set(secret.decoy_slots(g)) for g in range(cfg.num_kv_heads)],
    )


def bits_left(slots: Slots, decoys_per_group: int) -> dict[str, list[float]]:
    """Search bits per KV group: none, after the frequency filter, after frequency + cosine."""
    out: dict[str, list[float]] = {
        "naive": [],
        "naive_columns": [],
        "frequency": [],
        "frequency_cosine": [],
    }
    for g in np.unique(slots.group):
        mine = slots.group == g
        units = int(mine.sum())
        out["naive"].append(math.log2(math.comb(units, decoys_per_group)))
        out["naive_columns"].append(math.log2(math.comb(2 * units, 2 * decoys_per_group)))
        freq_bits = cos_bits = 0.0
        for value in np.unique(slots.freq[mine]):
            members = np.flatnonzero(mine & (slots.freq == value))
            if len(members) < 2:
                continue
            freq_bits += math.log2(len(members))
            cos = slots.features[members, 1]
            real = members[~slots.decoy[members]]
            if len(real) != 1:  # more than one real pair on a frequency: not this profile
                cos_bits += math.log2(len(members))
                continue
            rank = 1 + int((cos > slots.features[real[0], 1]).sum())
            cos_bits += math.log2(rank)
        out["frequency"].append(freq_bits)
        out["frequency_cosine"].append(cos_bits)
    return out


def run(options: AttackOptions) -> AttackResult:
    if options.profile != "obfuscated":
        raise UsageError("A4 separates the decoys of the obfuscated profile (others have none)")
    started = time.perf_counter()
    base = base_checkpoint()
    obs = observe(options, [base.tokenizer.encode(p) for p in PROMPTS], max_tokens=4, base=base)
    layers = obs.private_layers() if options.quick else list(range(obs.cfg.num_layers))
    detail = measure(obs, layers)
    detail["seconds"] = round(time.perf_counter() - started, 1)
    auc, bits = float(detail["classifier_auc"]), detail["bits_left_per_layer_min"]
    return AttackResult(
        "A4",
        options.profile,
        "AUC of decoy-vs-real RoPE pairs (classifier trained on the attacker's own decoys)",
        auc,
        auc <= AUC_BAR and bits["frequency_cosine"] >= BITS_BAR,
        detail,
    )


def measure(obs: Observation, layers: list[int]) -> dict[str, Any]:
    """A4 on an obfuscated run's dump: AUCs against the TD's truth and search bits left."""
    ob = obs.obfuscation
    if ob is None:
        raise ValueError("the obfuscated run kept no secrets to score against")
    device = [device_slots(obs, i) for i in layers]
    own = [attacker_slots(obs, i, ATTACKER_SEED + i) for i in layers]
    x_train = np.concatenate([s.features for s in own])
    y_train = np.concatenate([s.decoy for s in own])
    x_test = np.concatenate([s.features for s in device])
    y_test = np.concatenate([s.decoy for s in device])
    mean, std = x_train.mean(0), x_train.std(0) + 1e-12
    classifier = LogisticRegression(max_iter=1000).fit((x_train - mean) / std, y_train)
    auc = float(roc_auc_score(y_test, classifier.predict_proba((x_test - mean) / std)[:, 1]))
    feature_auc = {
        "frequency_multiplicity": float(roc_auc_score(y_test, x_test[:, 0])),
        "cosine_to_base": float(roc_auc_score(y_test, -x_test[:, 1])),
        "excess_kurtosis": float(roc_auc_score(y_test, -x_test[:, 2])),
    }
    pairs = next(iter(ob.qk.values())).pairs
    per_layer = [bits_left(s, pairs) for s in device]
    per_head = {k: float(np.mean([v for b in per_layer for v in b[k]])) for k in per_layer[0]}
    layer_bits = {k: float(min(sum(b[k]) for b in per_layer)) for k in per_layer[0]}
    return {
        "model": obs.model_name,
        "classifier_auc": auc,
        "layers_attacked": layers,
        "decoy_pairs_per_head": pairs,
        "slots": len(y_test),
        "decoys": int(y_test.sum()),
        "feature_auc": feature_auc,
        "bits_left_per_head_mean": per_head,
        "bits_left_per_layer_min": layer_bits,
        "real_pairs_ranked_first_by_cosine": _first_rate(device),
    }


def _first_rate(device: list[Slots]) -> float:
    """Share of ambiguous frequency groups whose most base-like slot is the real pair."""
    hits = total = 0
    for slots in device:
        for g in np.unique(slots.group):
            mine = slots.group == g
            for value in np.unique(slots.freq[mine]):
                members = np.flatnonzero(mine & (slots.freq == value))
                if len(members) < 2:
                    continue
                total += 1
                best = members[int(np.argmax(slots.features[members, 1]))]
                hits += int(not slots.decoy[best])
    return hits / total if total else float("nan")
