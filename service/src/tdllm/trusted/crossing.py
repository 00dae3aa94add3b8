"""`Crossing`: the one class through which TD code talks to an untrusted device.

Reviewers audit this file to know what can leave the TD: a public prefix shape, cache placements
(slots, positions), op names and plain parameters (names and numbers, never a tensor), and
tensors only as `Publishable` values (publishable.py: public weights checked against the pinned
reference, what is derived from them, one-time-padded words, split's token ids, the obfuscated
profile's transformed weights and plaintext activations); anything else is a `TypeError`.
What comes back (hidden states) is checked for shape and dtype here and copied out of the
device's memory before the TD uses it; its values are checked by `audit.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tdllm.model.config import ModelConfig
from tdllm.trusted.errors import DeviceIntegrityError
from tdllm.trusted.publishable import Publishable
from tdllm.untrusted.device import DEVICE_KINDS, UntrustedDevice, available_kinds, open_device
from tdllm.untrusted.prefix import PrefixShape
from tdllm.untrusted.transcript import Transcript

__all__ = ["DEVICE_KINDS", "Crossing", "available_devices"]


def available_devices() -> list[str]:
    return available_kinds()


class Crossing:
    def __init__(self, device: UntrustedDevice) -> None:
        self.device = device
        self.shape: PrefixShape | None = None

    @classmethod
    def open(cls, kind: str, keep_payloads: bool = False) -> Crossing:
        """A crossing to a fresh device of `kind`; `keep_payloads` keeps every byte (tests)."""
        return cls(open_device(kind, keep_payloads))

    @property
    def kind(self) -> str:
        return self.device.kind

    @property
    def transcript(self) -> Transcript:
        return self.device.transcript

    def install_prefix(
        self,
        cfg: ModelConfig,
        num_layers: int,
        public_weights: Mapping[str, Publishable],
        max_batch: int,
        max_seq_len: int,
        dtype: torch.dtype,
        keep_gemm_io: bool = False,
    ) -> None:
        """Send the prefix's public shape and weights (cast to `dtype`) to the device."""
        self.shape = PrefixShape(
            num_layers=num_layers,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=cfg.rope_theta,
            max_batch=max_batch,
            max_seq_len=max_seq_len,
            rope_positions=cfg.max_position_embeddings,
            dtype=str(dtype),
            keep_gemm_io=keep_gemm_io,
        )
        expected = set(self.shape.weight_names())
        if set(public_weights) != expected:
            raise ValueError("install_prefix takes exactly the prefix's public weights")
        weights = {n: _tensor_of(p).to(dtype) for n, p in public_weights.items()}
        self.device.load(self.shape, weights)

    def run_prefix(self, tokens: Publishable, slots: list[int], starts: list[int]) -> torch.Tensor:
        """Hidden states from the device, shape- and dtype-checked, in TD-owned memory."""
        if self.shape is None:
            raise RuntimeError("install_prefix() before run_prefix()")
        ids = _tensor_of(tokens)
        hidden = self.device.run_prefix(ids, _ints(slots), _ints(starts))
        want = (*ids.shape, self.shape.hidden_size)
        if not isinstance(hidden, torch.Tensor) or tuple(hidden.shape) != want:
            raise DeviceIntegrityError(
                f"device returned hidden states of shape {_shape(hidden)}, expected {want}"
            )
        if hidden.dtype != self.shape.torch_dtype:
            raise DeviceIntegrityError(
                f"device returned {hidden.dtype}, expected {self.shape.dtype}"
            )
        # one copy into TD memory, whatever the device: a device-resident tensor (or, in process,
        # one the device still references) must not be what the tail reads.
        return hidden.to("cpu", copy=True)

    def gemm_io(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The last step's projection inputs/outputs the TD asked for, copied into TD memory."""
        out = self.device.gemm_io(list(names))
        if not isinstance(out, dict):
            raise DeviceIntegrityError("device returned no projection records")
        return {
            str(n): t.to("cpu", copy=True) for n, t in out.items() if isinstance(t, torch.Tensor)
        }

    def put(self, name: str, value: Publishable) -> None:
        """Leave `value` resident on the device under `name`."""
        self.device.put(str(name), _tensor_of(value))

    def call(
        self,
        op: str,
        args: Mapping[str, Publishable],
        expect: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
        params: Mapping[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run offloaded op `op`; its outputs must be exactly `expect` (name -> shape, dtype).

        They are copied into TD memory; their values are for the caller to check.
        """
        tensors = {str(n): _tensor_of(a) for n, a in args.items()}
        out = self.device.call(str(op), tensors, _plain(params or {}))
        if not isinstance(out, dict) or set(out) != set(expect):
            raise DeviceIntegrityError(f"device answered {op} with the wrong outputs")
        checked: dict[str, torch.Tensor] = {}
        for name, (shape, dtype) in expect.items():
            tensor = out[name]
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(shape):
                raise DeviceIntegrityError(
                    f"device returned {name} of shape {_shape(tensor)}, expected {tuple(shape)}"
                )
            if tensor.dtype != dtype:
                raise DeviceIntegrityError(f"device returned {name} as {tensor.dtype}, not {dtype}")
            checked[name] = tensor.to("cpu", copy=True)
        return checked

    def dump(self) -> dict[str, torch.Tensor]:
        """Everything the device holds (for the A1 test and `tdllm protect`)."""
        return self.device.dump()

    def close(self) -> None:
        self.device.close()


def _tensor_of(value: object) -> torch.Tensor:
    """The tensor of a `Publishable`; anything else never reaches the device."""
    if not isinstance(value, Publishable):
        raise TypeError(
            f"only a Publishable crosses to the device, not {type(value).__name__} "
            "(trusted/publishable.py says what may leave and why)"
        )
    return value.tensor


def _ints(values: list[int]) -> list[int]:
    return [int(v) for v in values]


def _plain(params: Mapping[str, Any]) -> dict[str, Any]:
    """An op's parameters: names, numbers and lists of them; a tensor must be a `Publishable`
    argument, never a parameter."""
    scalars = (str, int, float, bool, type(None))

    def check(value: object) -> None:
        if isinstance(value, list | tuple):
            for item in value:
                check(item)
        elif not isinstance(value, scalars):
            raise TypeError(f"an op parameter is a name or a number, not {type(value).__name__}")

    for value in params.values():
        check(value)
    return dict(params)


def _shape(value: object) -> object:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
