"""Which prompt tokens one engine step prefills, and which prompts share a padded pass.

Without a budget every admitted prompt is prefilled whole in the step that admits it. With a
per-step budget (`prefill_chunk` tokens), a step prefills at most that many prompt tokens, so the
sequences already decoding get their next token after at most one budget's prefill, whatever
arrives: prompts that fit what is left of the budget are prefilled whole (and grouped, as
without a budget); a prompt longer than the whole budget is prefilled in chunks over several
steps, each chunk a continuation of the last (`Batch` with one sequence from any start). Prompts
are served in order of admission: a short prompt that does not fit what is left waits for the
next step rather than being cut, and nothing overtakes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from tdllm.errors import UsageError

# the most padded prompt tokens one prefill pass takes: prompts arriving together share a pass
# (one walk over the weights) without one long prompt making a huge padded batch
PREFILL_TOKENS = 2048


class Prefilling(Protocol):
    """A request as the planner sees it: its prompt and how much of it is in the cache."""

    @property
    def prompt(self) -> list[int]: ...

    @property
    def prefilled(self) -> int: ...


R = TypeVar("R", bound=Prefilling)


@dataclass
class PrefillPlan(Generic[R]):
    """One step's prefill work: prompts prefilled whole from position 0 (`whole`, grouped into
    padded passes) and chunks, one pass each: (request, tokens) from `request.prefilled` on."""

    whole: list[R] = field(default_factory=list)
    chunks: list[tuple[R, int]] = field(default_factory=list)


def check_budget(prefill_chunk: int) -> None:
    if prefill_chunk < 0:
        raise UsageError(
            f"prefill_chunk is {prefill_chunk}; it must be 0 (whole prompts) or a token count"
        )


def plan_prefill(queue: Sequence[R], budget: int) -> PrefillPlan[R]:
    """The prefill work of one step for `queue` (admitted, not fully prefilled, in order);
    `budget` 0 means no budget: every prompt whole."""
    if budget == 0:
        return PrefillPlan(whole=list(queue))
    plan: PrefillPlan[R] = PrefillPlan()
    left = budget
    for request in queue:
        if left == 0:
            break
        remaining = len(request.prompt) - request.prefilled
        fresh = request.prefilled == 0
        if fresh and remaining <= left:
            plan.whole.append(request)
            left -= remaining
        elif fresh and remaining <= budget:  # fits a step of its own: whole, next step
            break
        else:  # longer than the budget: the next chunk, as much as is left
            take = min(remaining, left)
            plan.chunks.append((request, take))
            left -= take
    return plan


def prefill_groups(requests: Sequence[R], together: bool) -> list[list[R]]:
    """Prompts that share one padded forward pass: similar lengths (padding at most half of
    a row) and at most `PREFILL_TOKENS` padded tokens; one prompt per pass where the model
    cannot batch them (`together` false: `Transformer.prefills_together`)."""
    if not together:
        return [[r] for r in requests]
    groups: list[list[R]] = []
    for request in sorted(requests, key=lambda r: len(r.prompt)):
        group = groups[-1] if groups else None
        longest = len(request.prompt)
        if (
            group is not None
            and longest <= 2 * len(group[0].prompt)
            and longest * (len(group) + 1) <= PREFILL_TOKENS
        ):
            group.append(request)
        else:
            groups.append([request])
    return groups
