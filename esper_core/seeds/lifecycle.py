"""The seed lifecycle: one enum and one transition table for the whole project.

A seed's state is stored as an integer buffer on its Kasmina layer, so the enum values are part of
the checkpoint format and must never be renumbered.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum


class SeedState(IntEnum):
    DORMANT = 0  # empty slot
    GERMINATED = 1  # slot reserved, kernel requested; contributes nothing yet
    TRAINING = 2  # incubation: learns from the task loss, forward value unchanged, host isolated
    BLENDING = 3  # alpha ramps 0 -> 1
    PROBATION = 4  # full weight; waiting for the counterfactual verdict
    FOSSILIZED = 5  # kept permanently
    CULLED = 6  # removed; slot embargoed
    ROLLED_BACK = 7  # removed by the governor after an anomaly; slot embargoed

    @property
    def live(self) -> bool:
        """A live seed occupies its slot and may still change the model."""
        return self in _LIVE

    @property
    def contributes(self) -> bool:
        """Whether the seed's module runs in the forward pass."""
        return self in _IN_FORWARD


_LIVE = frozenset({SeedState.GERMINATED, SeedState.TRAINING, SeedState.BLENDING, SeedState.PROBATION})
_IN_FORWARD = frozenset({SeedState.TRAINING, SeedState.BLENDING, SeedState.PROBATION, SeedState.FOSSILIZED})
_ADDING = frozenset({SeedState.BLENDING, SeedState.PROBATION, SeedState.FOSSILIZED})


def any_adding(counts: Mapping[str, object]) -> bool:
    """Whether seed counts by state name (a summary's ``seeds``) hold a seed whose output the model adds
    to its host's: blending, in probation or fossilized. An incubating seed runs in the forward pass but
    adds exactly zero, so a run ending with one alone has no growth for "every seed muted" to measure."""
    return any(counts.get(state.name.lower()) for state in _ADDING)

TRANSITIONS: dict[SeedState, frozenset[SeedState]] = {
    SeedState.DORMANT: frozenset({SeedState.GERMINATED}),
    SeedState.GERMINATED: frozenset({SeedState.TRAINING, SeedState.CULLED, SeedState.ROLLED_BACK}),
    SeedState.TRAINING: frozenset({SeedState.BLENDING, SeedState.CULLED, SeedState.ROLLED_BACK}),
    SeedState.BLENDING: frozenset({SeedState.PROBATION, SeedState.CULLED, SeedState.ROLLED_BACK}),
    SeedState.PROBATION: frozenset({SeedState.FOSSILIZED, SeedState.CULLED, SeedState.ROLLED_BACK}),
    SeedState.FOSSILIZED: frozenset(),
    SeedState.CULLED: frozenset({SeedState.DORMANT}),
    SeedState.ROLLED_BACK: frozenset({SeedState.DORMANT}),
}


class IllegalTransition(RuntimeError):
    """A lifecycle transition outside :data:`TRANSITIONS`: always a bug in the caller."""


def check_transition(current: SeedState, target: SeedState) -> None:
    """Raise :class:`IllegalTransition` unless ``current -> target`` is in the table."""
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(f"illegal seed transition {current.name} -> {target.name}")
