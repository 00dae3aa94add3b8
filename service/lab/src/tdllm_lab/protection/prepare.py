"""`tdllm prepare`: check that a private model's prefix is the public base, pin its reference.

The split is only black-box-equivalent if every tensor the device gets is public, so preparation
refuses a model whose embedding or blocks ``0..L-K-1`` differ from BASE in a single bit, and
says which layers differ. It writes ``public-prefix.json`` (sha256 of BASE's prefix tensors, the
reference `generate --profile split --public-ref` verifies against) and ``split.json``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tdllm.errors import TdllmError
from tdllm.model.checkpoint import Checkpoint
from tdllm.model.transformer import prefix_names
from tdllm.trusted.public_reference import PublicReference, tensor_sha256

REFERENCE_FILE = "public-prefix.json"
MANIFEST_FILE = "split.json"


class PrepareRefusedError(TdllmError):
    """MODEL's prefix is not bit-identical to BASE: it cannot be split safely."""

    exit_code = 2


@dataclass
class LayerReport:
    """Per prefix layer ("embedding" or "layer N"): the tensors that differ from BASE."""

    differing: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def lines(self) -> list[str]:
        return [f"{layer}: {', '.join(names)}" for layer, names in sorted(self.differing.items())]


def _layer_of(name: str) -> str:
    return f"layer {name.split('.')[2]}" if name.startswith("model.layers.") else "embedding"


def compare_prefix(
    base: Checkpoint, model: Checkpoint, k: int
) -> tuple[PublicReference, LayerReport]:
    """BASE's prefix reference and the per-layer differences of MODEL from it."""
    if (
        base.config.num_layers != model.config.num_layers
        or base.config.hidden_size != model.config.hidden_size
    ):
        raise PrepareRefusedError("MODEL and BASE have different shapes")
    if not 1 <= k < model.config.num_layers:
        raise PrepareRefusedError(f"K must be in [1, {model.config.num_layers - 1}]")
    names = set(prefix_names(model.config.num_layers - k))
    reference = PublicReference.build(base.name, ((n, t) for n, t in base.tensors() if n in names))
    report = LayerReport()
    seen = set()
    for name, tensor in model.tensors():
        if name not in names:
            continue
        seen.add(name)
        if reference.mismatches(name, tensor) is not None:
            short = name.removeprefix("model.").removesuffix(".weight").split(".", 2)[-1]
            report.differing[_layer_of(name)].append(short)
    for name in sorted(names - seen):
        report.differing[_layer_of(name)].append(f"{name} missing")
    return reference, report


def prepare_split(base: Checkpoint, model: Checkpoint, k: int, out: Path) -> Path:
    """Write the public-prefix reference for MODEL split at K; refuse if its prefix is not BASE."""
    reference, report = compare_prefix(base, model, k)
    if report.differing:
        raise PrepareRefusedError(
            f"MODEL's prefix (embedding, layers 0..{model.config.num_layers - k - 1}) differs "
            f"from BASE in {len(report.differing)} place(s): " + "; ".join(report.lines())
        )
    out.mkdir(parents=True, exist_ok=True)
    reference.save(out / REFERENCE_FILE)
    manifest = {
        "profile": "split",
        "k": k,
        "base": base.name,
        "model": model.name,
        "public_reference": REFERENCE_FILE,
        "tail_tensors_hashes": {
            n: tensor_sha256(t) for n, t in model.tensors() if n not in reference.hashes
        },
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return out / REFERENCE_FILE
