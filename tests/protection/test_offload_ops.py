"""The generic offload channel: resident tensors, marked ops only, checked outputs."""

from __future__ import annotations

import pytest
import torch

from tdllm.trusted import publishable
from tdllm.trusted.crossing import Crossing
from tdllm.trusted.errors import DeviceIntegrityError
from tdllm.trusted.public_reference import PublicReference


@pytest.fixture(params=["cpu", "process"])
def crossing(request: pytest.FixtureRequest):
    crossing = Crossing.open(request.param, keep_payloads=True)
    yield crossing
    crossing.close()


def test_device_refuses_an_op_that_is_not_a_marked_offload_op(crossing: Crossing) -> None:
    with pytest.raises((ValueError, RuntimeError), match="unknown offload op"):
        crossing.call("os.system", {}, {})
    with pytest.raises((ValueError, RuntimeError), match="unknown offload op"):
        crossing.call("offload.resolve", {}, {})


def test_put_tensors_are_resident_recorded_and_dumped(crossing: Crossing) -> None:
    weight = torch.arange(12, dtype=torch.int8).reshape(3, 4)
    crossing.put(
        "w", publishable.public({"w": weight}, PublicReference.build("w", [("w", weight)]))["w"]
    )
    assert torch.equal(crossing.dump()["w"], weight)
    assert "w" in crossing.transcript.names("to_device")


class _LyingDevice:
    """Answers every call with whatever it was built to return."""

    kind = "cpu"

    def __init__(self, answer: object) -> None:
        self.answer = answer

    def call(self, op: str, args: dict, params: dict) -> object:
        return self.answer


@pytest.mark.parametrize(
    "answer",
    [
        {},  # missing output
        {"y": torch.zeros(2, dtype=torch.int32), "z": torch.zeros(1)},  # extra output
        {"y": torch.zeros(3, dtype=torch.int32)},  # wrong shape
        {"y": torch.zeros(2, dtype=torch.int64)},  # wrong dtype
        {"y": [0, 0]},  # not a tensor
        None,
    ],
)
def test_crossing_rejects_outputs_it_did_not_expect(answer: object) -> None:
    crossing = Crossing(_LyingDevice(answer))  # type: ignore[arg-type]
    with pytest.raises(DeviceIntegrityError):
        crossing.call("masked_ops.any", {}, {"y": ((2,), torch.int32)})
