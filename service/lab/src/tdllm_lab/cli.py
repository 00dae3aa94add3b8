"""The lab's `tdllm` commands, found by the core CLI through the `tdllm.commands` entry point."""

from __future__ import annotations

import click

from tdllm_lab.appliance import appliance
from tdllm_lab.attacks.commands import attack
from tdllm_lab.bench.commands import bench
from tdllm_lab.protection.commands import finetune_tail, prepare, protect
from tdllm_lab.sealing.commands import keygen, seal

COMMANDS: list[click.Command] = [
    appliance,
    attack,
    bench,
    finetune_tail,
    keygen,
    prepare,
    protect,
    seal,
]
