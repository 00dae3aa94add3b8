"""What a fuzz target is (`Target`: bytes in, one parser run, only its documented errors may
escape) and the oracle error of the targets that drive the service (`ServerError`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import strategies as st

MODEL = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Target:
    """One target; its builder takes `full` (make fuzz: the slower, more faithful setup)."""

    name: str
    allowed: tuple[type[BaseException], ...]  # the documented errors: these may escape
    run: Callable[[bytes], object]
    seeds: tuple[bytes, ...]
    strategy: st.SearchStrategy[bytes]
    dictionary: tuple[bytes, ...] = field(default=())

    def check(self, data: bytes) -> None:
        """Run one input; raises only for a crash (an error that is not documented)."""
        try:
            self.run(data)
        except self.allowed:
            pass


class ServerError(Exception):
    """A target's oracle: the service answered 5xx where a client mistake must be a 4xx."""
