"""Offloaded operations: tensors kept resident on a device under names, and named ops over them.

`split` ships a whole prefix (`prefix.py`). Profiles that offload single operations instead
(`masked`: one-time-pad linear ops; `obfuscated`: padded, permuted weights) put their device-side
tensors with `put` and run ops with `call`. An op is a function in a module of this package,
named ``"module.function"`` (e.g. ``"masked_ops.gemm_mod32"``), marked with `@offload_op`; a
device runs only marked functions of `OP_MODULES`, so an op name that crossed cannot make it run
anything else. Ops see only what was put on the device and what the call carries: they are
device code and everything they touch is published.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

# Modules whose marked functions a device may run. A profile adding ops adds its module here.
OP_MODULES = ("masked_ops", "obfuscated_ops")

OpFunction = Callable[
    [Mapping[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]], dict[str, torch.Tensor]
]
_MARK = "__tdllm_offload_op__"


def offload_op(function: OpFunction) -> OpFunction:
    """Mark `function(resident, args, params) -> outputs` as callable by a device."""
    setattr(function, _MARK, True)
    return function


def resolve(op: str) -> OpFunction:
    """The marked function named `op`; ValueError for anything else."""
    module_name, _, function_name = op.partition(".")
    if module_name not in OP_MODULES or not function_name:
        raise ValueError(f"unknown offload op {op!r}")
    try:
        module = importlib.import_module(f"tdllm.untrusted.{module_name}")
    except ModuleNotFoundError as exc:
        raise ValueError(f"unknown offload op {op!r}") from exc
    function = getattr(module, function_name, None)
    if function is None or not getattr(function, _MARK, False):
        raise ValueError(f"unknown offload op {op!r}")
    result: OpFunction = function
    return result


class OffloadStore:
    """The named tensors a device holds for offloaded ops, in its own memory (`where`)."""

    def __init__(self, where: str = "cpu") -> None:
        self.where = where
        self.resident: dict[str, torch.Tensor] = {}

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self.resident[name] = tensor.to(self.where, copy=True)

    def call(
        self, op: str, args: dict[str, torch.Tensor], params: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        function = resolve(op)
        on_device = {name: t.to(self.where) for name, t in args.items()}
        out = function(self.resident, on_device, params)
        return {name: t.to("cpu") for name, t in out.items()}

    def held(self) -> dict[str, torch.Tensor]:
        return {name: t.to("cpu") for name, t in self.resident.items()}

    def clear(self) -> None:
        self.resident.clear()
