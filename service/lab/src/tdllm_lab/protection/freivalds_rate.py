"""Detection rate of Freivalds checks against forged GEMM outputs (issue 6: 1,000 forgeries).

Why a separate measurement: the check's guarantee depends on float tolerance, so "caught with
probability 1" holds only above it. This forges single entries of honest products at a chosen
size relative to the row's largest output and counts how many `FreivaldsCheck.verify` rejects.
"""

from __future__ import annotations

import torch

from tdllm.trusted.freivalds import FreivaldsCheck


def forge_one_entry(y: torch.Tensor, relative: float, generator: torch.Generator) -> torch.Tensor:
    """`y` with one random entry moved by ``relative`` x that row's largest magnitude."""
    forged = y.clone().reshape(-1, y.shape[-1])
    row = int(torch.randint(forged.shape[0], (1,), generator=generator))
    col = int(torch.randint(forged.shape[1], (1,), generator=generator))
    sign = 1.0 if float(torch.rand(1, generator=generator)) < 0.5 else -1.0
    forged[row, col] += sign * relative * float(forged[row].abs().max())
    return forged.reshape(y.shape)


def detection_rate(
    check: FreivaldsCheck,
    records: dict[str, tuple[torch.Tensor, torch.Tensor]],
    relative: float,
    trials: int,
    seed: int,
) -> float:
    """Fraction of `trials` one-entry forgeries (random projection, row, column) rejected."""
    g = torch.Generator().manual_seed(seed)
    names = sorted(records)
    caught = 0
    for _ in range(trials):
        name = names[int(torch.randint(len(names), (1,), generator=g))]
        x, y = records[name]
        caught += not check.verify(name, x, forge_one_entry(y, relative, g))
    return caught / trials
