"""`masked`: a device that tampers with a product is caught, and serving stops for good."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tdllm.model.checkpoint import Checkpoint
from tdllm.profiles.masked import build_masked
from tdllm.trusted.crossing import Crossing
from tdllm.trusted.errors import DeviceIntegrityError
from tests.protection.conftest import checkpoint_of
from tests.protection.engine_runs import greedy_tokens, masked_method


class _OneBitFlipper:
    """An honest device until its `after`-th masked product, which gets its top ring bit set."""

    def __init__(self, inner: Any, after: int) -> None:
        self.inner, self.after, self.calls = inner, after, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def call(self, op: str, args: dict[str, torch.Tensor], params: dict[str, Any]) -> Any:
        out = self.inner.call(op, args, params)
        self.calls += 1
        if self.calls == self.after:
            out["y"][0, 0] += 1 << 31
        return out


@pytest.mark.parametrize("device", ["cpu", "process"])
def test_a_tampered_product_mid_generation_stops_serving(
    device: str, private_checkpoint: Checkpoint, base_tensors: dict[str, torch.Tensor]
) -> None:
    inner = Crossing.open(device)
    crossing = Crossing(_OneBitFlipper(inner.device, after=37))
    try:
        model, _ = build_masked(
            private_checkpoint, checkpoint_of("tiny-base", base_tensors), torch.float32, crossing
        )
        with pytest.raises(DeviceIntegrityError, match="Freivalds"):
            greedy_tokens(model, n=4)
        with pytest.raises(DeviceIntegrityError, match="serving stopped"):
            greedy_tokens(model, n=1)
        assert masked_method(model).failure is not None
    finally:
        crossing.close()
