"""SeedOrchestrator strategies: given a layer the policy wants to grow, what exactly to do there.

The growth policy decides *when* and ranks layers (*where*); a strategy turns one layer into a plan
(which slots, which blueprints, which seed makes room) using the selector's choices. All four share
one rule except ENSEMBLE: a layer runs one experiment at a time, so the counterfactual verdict of a
seed is not confounded by a sibling that arrived in the same layer while it was being judged.

- ``replace``: a layer with a free slot grows as usual; a full layer whose live seeds have had
  ``replace_after`` steps gets its weakest one (smallest measured counterfactual metric gain) culled,
  and the selector's new choice takes that slot as soon as its embargo ends.
- ``diversify``: the selector chooses among blueprints the layer does not hold yet (all of them,
  once it holds every allowed one), so a layer's seeds differ.
- ``specialize``: once an arm of the layer's kind has a fossilized seed, the best such arm (highest
  mean reward) is replicated into the layers of that kind that do not hold it; before that, the
  selector explores.
- ``ensemble``: ``ensemble_size`` seeds germinate in one layer at once (one selector choice each,
  within the budgets) and blend in together as a sum of residual branches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from esper_core.policy.bandits import ArmStats
from esper_core.policy.selector import Candidate, Choice
from esper_core.seeds.lifecycle import SeedState
from esper_core.seeds.manager import SlotRef
from esper_core.seeds.view import SeedView


@dataclass(frozen=True)
class Germination:
    index: int
    candidate: Candidate
    explanation: str
    arms: dict[str, dict[str, float]]


@dataclass(frozen=True)
class Eviction:
    """A live seed REPLACE culls; its measured gain goes into the event and to its arm."""

    index: int
    gain: float


@dataclass
class Plan:
    germinate: list[Germination] = field(default_factory=list)
    evict: list[Eviction] = field(default_factory=list)
    reserve: list[Germination] = field(default_factory=list)  # germinate once the slot reopens
    note: str = ""


class Planner(Protocol):
    """What a strategy may ask of the growth policy."""

    step: int
    seeds: SeedView

    def busy(self, layer: str) -> bool: ...

    def candidates(self, layer: str, spent: Sequence[Candidate] = (), freed: Sequence[SlotRef] = ()) -> list[Candidate]: ...

    def choose(self, candidates: Sequence[Candidate]) -> Choice | None: ...

    def champion(self, kind: str) -> tuple[str, ArmStats] | None: ...

    def arm_table(self, candidates: Sequence[Candidate]) -> dict[str, dict[str, float]]: ...

    def measure(self, ref: SlotRef) -> float: ...


class Strategy(Protocol):
    name: str

    def plan(self, planner: Planner, layer: str) -> Plan | None: ...

    def to_measure(self, seeds: SeedView, step: int) -> list[SlotRef]:
        """Live seeds whose counterfactual gain the plan may need (measured before it is made)."""
        ...


def _germination(index: int, choice: Choice) -> Germination:
    return Germination(index, choice.candidate, choice.explanation, choice.arms)


class _MeasuresNothing:
    def to_measure(self, seeds: SeedView, step: int) -> list[SlotRef]:
        return []


class Replace:
    name = "replace"

    def __init__(self, after: int) -> None:
        self.after = after

    def _old_enough(self, seeds: SeedView, layer: str, step: int) -> list[int]:
        """Slots of a full layer whose seeds have lived ``after`` steps and may make room."""
        slots = seeds[layer].slots
        if seeds[layer].free() or any(s.state in (SeedState.GERMINATED, SeedState.TRAINING) for s in slots):
            return []
        return [i for i, s in enumerate(slots) if s.state in (SeedState.BLENDING, SeedState.PROBATION)
                and s.germinated_at is not None and step - s.germinated_at >= self.after]

    def to_measure(self, seeds: SeedView, step: int) -> list[SlotRef]:
        return [SlotRef(layer, i) for layer in seeds for i in self._old_enough(seeds, layer, step)]

    def plan(self, planner: Planner, layer: str) -> Plan | None:
        free = planner.seeds[layer].free()
        if free:
            if planner.busy(layer):
                return None
            choice = planner.choose(planner.candidates(layer))
            return Plan([_germination(free[0], choice)]) if choice else None
        slots = planner.seeds[layer].slots
        old_enough = self._old_enough(planner.seeds, layer, planner.step)
        if not old_enough:
            return None
        gains = {i: planner.measure(SlotRef(layer, i)) for i in old_enough}
        weakest = min(old_enough, key=lambda i: (gains[i], i))
        choice = planner.choose(planner.candidates(layer, freed=[SlotRef(layer, weakest)]))
        if choice is None:
            return None
        note = (f"replace: the layer is full; its weakest live seed ({slots[weakest].blueprint} in slot {weakest}, "
                f"metric gain {gains[weakest]:.3g} of {len(old_enough)} measured) makes room")
        return Plan(evict=[Eviction(weakest, gains[weakest])], reserve=[_germination(weakest, choice)], note=note)


class Diversify(_MeasuresNothing):
    name = "diversify"

    def plan(self, planner: Planner, layer: str) -> Plan | None:
        free = planner.seeds[layer].free()
        if not free or planner.busy(layer):
            return None
        candidates = planner.candidates(layer)
        held = planner.seeds[layer].held_blueprints()
        fresh = [c for c in candidates if c.blueprint not in held]
        choice = planner.choose(fresh or candidates)
        if choice is None:
            return None
        if not held:
            note = ""
        elif fresh:
            note = f"diversify: the layer already holds {', '.join(sorted(held))}"
        else:
            note = "diversify: the layer already holds every allowed blueprint"
        return Plan([Germination(free[0], choice.candidate, choice.explanation, planner.arm_table(candidates))],
                    note=note)


class Specialize(_MeasuresNothing):
    name = "specialize"

    def plan(self, planner: Planner, layer: str) -> Plan | None:
        free = planner.seeds[layer].free()
        if not free or planner.busy(layer):
            return None
        kind = planner.seeds[layer].kind
        candidates = planner.candidates(layer)
        best = planner.champion(kind)
        if best is None:
            choice = planner.choose(candidates)
            return Plan([_germination(free[0], choice)], note="specialize: no fossilized arm yet") if choice else None
        blueprint, stats = best
        if blueprint in planner.seeds[layer].held_blueprints():
            return None
        matching = [c for c in candidates if c.blueprint == blueprint]
        if not matching:
            return None
        explanation = (f"specialize replicated {blueprint}, the best {kind} arm with a fossilized seed "
                       f"(mean reward {stats.mean:.3g} ± {stats.std:.2g} over {stats.pulls} pulls)")
        return Plan([Germination(free[0], matching[0], explanation, planner.arm_table(candidates))])


class Ensemble(_MeasuresNothing):
    name = "ensemble"

    def __init__(self, size: int) -> None:
        self.size = size

    def plan(self, planner: Planner, layer: str) -> Plan | None:
        free = planner.seeds[layer].free()
        if not free or planner.busy(layer):
            return None
        chosen: list[Germination] = []
        for index in free[:self.size]:
            choice = planner.choose(planner.candidates(layer, spent=[g.candidate for g in chosen]))
            if choice is None:
                break
            chosen.append(_germination(index, choice))
        if not chosen:
            return None
        return Plan(chosen, note=f"ensemble: {len(chosen)} seeds germinate together in this layer")


def build_strategy(name: str, ensemble_size: int, replace_after: int) -> Strategy:
    if name == "replace":
        return Replace(replace_after)
    if name == "specialize":
        return Specialize()
    if name == "ensemble":
        return Ensemble(ensemble_size)
    return Diversify()
