"""A device that lies is caught by the re-execution audit (f = 1 here) and serving stops."""

from __future__ import annotations

import pytest
import torch

from tdllm.engine import Engine, SamplingParams
from tdllm.trusted.crossing import Crossing
from tdllm.trusted.errors import DeviceIntegrityError
from tdllm.untrusted.device import InProcessDevice
from tests.protection.engine_runs import PROMPTS, NoTokenizer, greedy_tokens


class LyingDevice(InProcessDevice):
    """An honest cpu device until call `lie_at`, where `forge` rewrites its answer."""

    def __init__(self, lie_at: int, forge) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.calls, self.lie_at, self.forge = 0, lie_at, forge
        self.history: list[torch.Tensor] = []

    def run_prefix(self, tokens, slots, starts) -> torch.Tensor:  # type: ignore[no-untyped-def]
        hidden = super().run_prefix(tokens, slots, starts)
        self.calls += 1
        out = self.forge(hidden, self.history) if self.calls == self.lie_at else hidden
        self.history.append(hidden.clone())
        return out


def alter_one_value(hidden: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
    hidden = hidden.clone()
    hidden[-1, -1, 7] += 0.01
    return hidden


def replay_old(hidden: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
    same_shape = [h for h in history if h.shape == hidden.shape]
    return same_shape[-1]


def swap_requests(hidden: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
    assert hidden.shape[0] > 1, "a batched decode step"
    return hidden.flip(0)


FORGERIES = {
    "alter_one_value": alter_one_value,
    "replay_old": replay_old,
    "swap_requests": swap_requests,
}
# call numbers: 4 prefills (calls 1-4), then batched decode steps
LIE_AT = {"alter_one_value": 6, "replay_old": 7, "swap_requests": 6}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_a_forged_hidden_state_is_caught_and_serving_stops(
    forgery, private_checkpoint, reference, split_on
) -> None:  # type: ignore[no-untyped-def]
    device = LyingDevice(LIE_AT[forgery], FORGERIES[forgery])
    model = split_on(private_checkpoint, reference, Crossing(device), 1.0)
    with pytest.raises(DeviceIntegrityError, match="re-execution audit failed"):
        greedy_tokens(model)
    engine = Engine(model, NoTokenizer(), max_batch=4, max_seq_len=48)  # type: ignore[arg-type]
    with pytest.raises(DeviceIntegrityError, match="serving stopped"):
        engine.generate([PROMPTS[0]], SamplingParams(max_tokens=2, temperature=0.0))


def test_a_forged_prefill_is_caught_too(private_checkpoint, reference, split_on) -> None:  # type: ignore[no-untyped-def]
    model = split_on(private_checkpoint, reference, Crossing(LyingDevice(1, alter_one_value)), 1.0)
    with pytest.raises(DeviceIntegrityError):
        greedy_tokens(model)


def test_wrong_shapes_from_the_device_are_refused(private_checkpoint, reference, split_on) -> None:  # type: ignore[no-untyped-def]
    def truncate(hidden: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
        return hidden[:, :, :-1]

    model = split_on(private_checkpoint, reference, Crossing(LyingDevice(2, truncate)), 0.0)
    with pytest.raises(DeviceIntegrityError, match="shape"):
        greedy_tokens(model)


def test_partial_audits_pass_an_honest_device_in_mixed_batches(
    private_checkpoint, reference, split_on
) -> None:  # type: ignore[no-untyped-def]
    model = split_on(private_checkpoint, reference, Crossing.open("cpu"), 0.5)
    for _ in range(3):  # some requests audited, some not: sub-batch recomputation
        greedy_tokens(model)
    assert model.prefix.failure is None
