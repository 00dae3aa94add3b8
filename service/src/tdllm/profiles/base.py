"""What a protection profile is: the one object that decides how a served model runs.

A `Profile` answers, for one model, in the order `build_model` (registry.py) asks:

1. `source`: how the checkpoint is read (split streams it once and keeps its public prefix);
2. `linear_methods`: which `LinearMethod` each projection gets (masked, obfuscated, plain);
3. `after_load`: what it installs once every weight is in (the prefix on the device, secrets);
4. `prefix_placement` and `attention_core`: who computes the prefix and each layer's attention;
5. `idle_work`: one slice of background work while no request runs (masked: pads);
6. `close`: what it holds besides the crossing, which `ServedModel` closes.

The model file knows none of this: it asks its `LinearMethodTable` per projection and takes what
`Transformer.place` is given. A profile never sets attributes on model modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

from tdllm.model.checkpoint import Checkpoint
from tdllm.model.config import ModelConfig
from tdllm.model.linear import LinearMethodTable
from tdllm.model.transformer import AttentionCore, PrefixPlacement, Transformer
from tdllm.profiles.options import ProtectionOptions
from tdllm.trusted.crossing import Crossing

IdleWork = Callable[[], bool]  # one slice of work; True while more remains


class Profile(Protocol):
    name: ClassVar[str]

    def source(self, checkpoint: Checkpoint) -> Checkpoint: ...

    def linear_methods(self, cfg: ModelConfig) -> LinearMethodTable: ...

    def after_load(self, model: Transformer, checkpoint: Checkpoint) -> None: ...

    def prefix_placement(self) -> PrefixPlacement | None: ...

    def attention_core(self, layer: int) -> AttentionCore | None: ...

    def idle_work(self) -> IdleWork | None: ...

    def close(self) -> None: ...


class ProfileBase:
    """Every verb's td-only answer; a profile overrides the ones it changes. `uses_device`:
    whether `build_model` opens a crossing for it."""

    name: ClassVar[str]
    uses_device: ClassVar[bool] = False

    def __init__(
        self,
        options: ProtectionOptions,
        crossing: Crossing | None,
        max_batch: int,
        max_seq_len: int,
    ) -> None:
        self.options, self.max_batch, self.max_seq_len = options, max_batch, max_seq_len
        self._crossing = crossing

    @property
    def crossing(self) -> Crossing:
        """The crossing of a device profile (`uses_device`)."""
        if self._crossing is None:
            raise RuntimeError(f"{self.name} was built without a device")
        return self._crossing

    def source(self, checkpoint: Checkpoint) -> Checkpoint:
        return checkpoint

    def linear_methods(self, cfg: ModelConfig) -> LinearMethodTable:
        return LinearMethodTable()

    def after_load(self, model: Transformer, checkpoint: Checkpoint) -> None:
        pass

    def prefix_placement(self) -> PrefixPlacement | None:
        return None

    def attention_core(self, layer: int) -> AttentionCore | None:
        return None

    def idle_work(self) -> IdleWork | None:
        return None

    def close(self) -> None:
        pass


@dataclass
class ServedModel:
    """A model ready to serve: the `Transformer` the engine runs, the profile that shaped it,
    and the crossing to its device (None for td-only). `close` releases both."""

    model: Transformer
    profile: Profile
    crossing: Crossing | None

    def idle_work(self) -> IdleWork | None:
        return self.profile.idle_work()

    def close(self) -> None:
        try:
            self.profile.close()
        finally:
            if self.crossing is not None:
                self.crossing.close()
