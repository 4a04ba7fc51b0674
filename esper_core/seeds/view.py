"""A read-only picture of every seed slot: what the policy is allowed to see.

The policy decides from this view and returns decisions; it never holds the SeedManager, the
model or the optimizer, so it cannot change them by accident (GradMax's split of "when" from "how").
A view is a copy taken when the controller asks the policy for a decision.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from esper_core.seeds.lifecycle import SeedState


@dataclass(frozen=True)
class SlotView:
    state: SeedState
    blueprint: str | None
    params: int
    steps_in_state: int
    germinated_at: int | None
    merged: bool = False  # folded into the host: no parameters, no FLOPs

    @property
    def holds(self) -> bool:
        """Occupies the slot with parameters now or soon (live or fossilized): what budgets count."""
        return self.state.live or self.state == SeedState.FOSSILIZED


@dataclass(frozen=True)
class LayerView:
    kind: str
    slots: tuple[SlotView, ...]

    def free(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s.state == SeedState.DORMANT]

    def held_blueprints(self) -> set[str]:
        return {s.blueprint for s in self.slots if s.blueprint is not None and s.holds}


SeedView = Mapping[str, LayerView]
