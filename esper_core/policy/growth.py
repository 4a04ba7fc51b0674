"""The first growth policy: when (plateau or period inside the growth window), where (gradient
merit), what (the least-tried allowed blueprint), and how much (seed and parameter budgets).

It decides only; the trainer executes through the SeedManager. Every decision carries a reason
string that goes into the event log verbatim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from esper_core.recipe.schema import PolicyConfig
from esper_core.seeds.manager import SeedManager, SlotRef


@dataclass(frozen=True)
class GrowthDecision:
    slot: SlotRef
    blueprint: str
    reason: str
    merit: float


@dataclass
class PlateauTracker:
    """Counts evaluations without an improvement of at least ``min_delta`` in validation loss."""

    patience: int
    min_delta: float
    best: float = float("inf")
    stale: int = 0

    def update(self, val_loss: float) -> None:
        if val_loss < self.best - self.min_delta:
            self.best, self.stale = val_loss, 0
        else:
            self.stale += 1

    @property
    def plateaued(self) -> bool:
        return self.stale >= self.patience

    def reset(self) -> None:
        self.stale = 0


@dataclass
class GrowthPolicy:
    config: PolicyConfig
    max_steps: int
    blueprints_for: Callable[[str], list[str]]  # host kind -> allowed blueprint names, in preference order
    params_of: Callable[[str, str], int]  # (blueprint, layer) -> parameters the seed would add
    plateau: PlateauTracker = field(init=False)
    last_growth_step: int = field(default=-1, init=False)
    tries: dict[tuple[str, str], int] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.plateau = PlateauTracker(self.config.plateau_patience, self.config.plateau_min_delta)

    def in_window(self, step: int) -> bool:
        start, end = self.config.growth_window
        return start * self.max_steps <= step < end * self.max_steps

    def observe_validation(self, val_loss: float) -> None:
        self.plateau.update(val_loss)

    def _triggered(self, step: int) -> str | None:
        if not self.in_window(step):
            return None
        if self.config.trigger == "periodic":
            if self.last_growth_step < 0 or step - self.last_growth_step >= self.config.period_steps:
                return f"periodic trigger (every {self.config.period_steps} steps)"
            return None
        if self.plateau.plateaued:
            return (f"validation plateau: no improvement of {self.config.plateau_min_delta:g} in "
                    f"{self.plateau.stale} evaluations (best {self.plateau.best:.4f})")
        return None

    def decide(self, step: int, manager: SeedManager, merit: dict[str, float]) -> GrowthDecision | None:
        """At most one germination per call; ``None`` when nothing should grow now."""
        why = self._triggered(step)
        if why is None or manager.occupied() >= self.config.max_seeds:
            return None
        ranked = sorted(((merit.get(name, 0.0), name) for name in manager.layers), reverse=True)
        best = ranked[0][0] if ranked else 0.0
        for rank, (score, name) in enumerate(ranked, start=1):
            if best > 0 and score < self.config.merit_ratio * best:
                break
            index = manager.free_slot(name)
            if index is None:
                continue
            choice = self._choose_blueprint(name, manager)
            if choice is None:
                continue
            self.last_growth_step = step
            self.plateau.reset()
            self.tries[(name, choice)] = self.tries.get((name, choice), 0) + 1
            reason = (f"{why}; gradient merit {score:.3g} (rank {rank} of {len(ranked)}, "
                      f"best {best:.3g}); {choice} is the least-tried blueprint allowed here")
            return GrowthDecision(SlotRef(name, index), choice, reason, score)
        return None

    def _choose_blueprint(self, layer: str, manager: SeedManager) -> str | None:
        room = self.config.max_added_params - manager.added_params()
        allowed = [b for b in self.blueprints_for(manager.layers[layer].spec.kind) if self.params_of(b, layer) <= room]
        if not allowed:
            return None
        return min(allowed, key=lambda b: self.tries.get((layer, b), 0))

    def penalise(self, layer: str, blueprint: str | None, weight: int = 10) -> None:
        """Make a (layer, blueprint) pair that caused a rollback the last choice for a while."""
        if blueprint is not None:
            self.tries[(layer, blueprint)] = self.tries.get((layer, blueprint), 0) + weight

    def state_dict(self) -> dict:
        return {"best": self.plateau.best, "stale": self.plateau.stale, "last_growth_step": self.last_growth_step,
                "tries": [[layer, bp, n] for (layer, bp), n in self.tries.items()]}

    def load_state_dict(self, state: dict) -> None:
        self.plateau.best, self.plateau.stale = state["best"], state["stale"]
        self.last_growth_step = state["last_growth_step"]
        self.tries = {(layer, bp): n for layer, bp, n in state["tries"]}
