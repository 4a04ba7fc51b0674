"""SeedSelector: which blueprint to grow, learnt across the run (and across runs) with a bandit.

Arms are ``blueprint@kind`` (a blueprint on a kind of host layer: ``linear`` or ``conv2d``). The
reward of an arm is what its seeds measurably bought: the counterfactual gain in the task's metric
at the verdict (the same numbers the fossilize/cull decision used) per 1000 added parameters, minus a
penalty when the seed was culled; a seed that caused a rollback scores minus the rollback penalty.
Before an arm has rewards, the layer's health supplies a prior: the residual functional gradient
``r`` is the first-order loss decrease a branch following ``-eta * v`` could buy (``eta * r``), so
``eta * r`` per 1000 parameters of the candidate is an optimistic guess of the arm's reward on that
layer, worth ``selector.prior_weight`` pulls.

Constraints are applied before the bandit sees a candidate: the blueprint must grow on the layer's
kind, fit the remaining parameter and FLOP budgets and the latency limit. What was excluded, and
why, is part of the choice's explanation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from esper_core.policy.arm_store import ArmStore
from esper_core.policy.bandits import ArmStats, Bandit, Pick, Prior
from esper_core.recipe.schema import SelectorConfig

REWARD_UNIT = "gain in the task's validation metric per 1000 added parameters"


def arm_key(blueprint: str, kind: str) -> str:
    return f"{blueprint}@{kind}"


@dataclass(frozen=True)
class Candidate:
    """One blueprint that could grow on one layer, with what it would cost."""

    blueprint: str
    layer: str
    kind: str
    params: int
    flops: int  # forward FLOPs per sample
    latency_ms: float | None = None
    prior: float | None = None  # reward guess from the layer's health

    @cached_property
    def arm(self) -> str:
        return arm_key(self.blueprint, self.kind)


@dataclass(frozen=True)
class Choice:
    """A pick with the arm statistics it was made from (copied at decision time); the sentence and
    the table for the event are formatted only when read, off the decision's own clock."""

    candidate: Candidate
    pick: Pick
    stats: dict[str, tuple[float, float, int, float]]  # arm -> (mean, std, pulls, weight) of each candidate arm
    strategy_words: str

    @property
    def arms(self) -> dict[str, dict[str, float]]:
        return {a: {"mean": round(m, 6), "std": round(s, 6), "pulls": n, "weight": round(w, 4)}
                for a, (m, s, n, w) in self.stats.items()}

    @cached_property
    def explanation(self) -> str:
        mean, std, pulls, _ = self.stats[self.pick.arm]
        name, prior = self.strategy_words, self.candidate.prior
        if self.pick.strategy == "epsilon_greedy" and self.pick.explored and pulls:
            return f"{name} explored at random and took an arm with mean reward {mean:.3g} over {pulls} pulls"
        if pulls == 0:
            told = f" (prior {prior:.3g} from the layer's residual functional gradient)" if prior is not None else ""
            return f"{name} chose an untried arm{told}"
        sampled = f" (sampled {self.pick.index:.3g})" if self.pick.strategy == "thompson" else ""
        return f"{name} chose the arm with mean reward {mean:.3g} ± {std:.2g} over {pulls} pulls{sampled}"


class SeedSelector:
    """See the module docstring. ``seed`` seeds the private generator (Thompson, epsilon)."""

    def __init__(self, config: SelectorConfig, seed: int) -> None:
        self.config = config
        self.bandit = Bandit(config.strategy, np.random.default_rng(np.random.SeedSequence([seed, 0x5E1EC7])),
                             config.discount, config.exploration, config.epsilon)
        self.rewards: list[float] = []  # the recent rewards (for the spread)
        self.run_stats: dict[str, ArmStats] = {}  # undiscounted statistics of this run only (to share)
        self._spread: float | None = None  # cached standard deviation of ``rewards``
        self._words = {"ucb1": "ucb", "epsilon_greedy": f"epsilon-greedy (epsilon {config.epsilon:g})"}.get(
            config.strategy, config.strategy)

    # --- choosing ----------------------------------------------------------------------------------

    def choose(self, candidates: Sequence[Candidate]) -> Choice | None:
        """The bandit's pick among ``candidates`` (already within every constraint)."""
        if not candidates:
            return None
        best: dict[str, Candidate] = {}
        for c in candidates:  # one candidate per arm: the order given is the preference order
            best.setdefault(c.arm, c)
        weight = self.config.prior_weight
        priors = {a: Prior(c.prior, weight) for a, c in best.items() if c.prior is not None} if weight > 0 else {}
        pick = self.bandit.select(list(best), self.scale(priors.values()), priors)
        chosen = best[pick.arm]
        if weight <= 0 and chosen.prior is not None:
            chosen = replace(chosen, prior=None)  # an ignored prior is not reported as a reason
        arms = self.bandit.arms
        stats = {a: (s.mean, s.std, s.pulls, s.n) if (s := arms.get(a)) else (0.0, 0.0, 0, 0.0) for a in best}
        return Choice(chosen, pick, stats, self._words)

    def scale(self, priors: Iterable[Prior] = ()) -> float:
        """The reward spread the bandit's exploration is measured in: the standard deviation of the
        recent rewards, else the largest magnitude of a reward or prior seen, else 1."""
        if self._spread is None:
            spread = 0.0
            if len(self.rewards) >= 2:
                mean = sum(self.rewards) / len(self.rewards)
                spread = math.sqrt(sum((r - mean) ** 2 for r in self.rewards) / len(self.rewards))
            self._spread = spread
        if self._spread > 0:
            return self._spread
        magnitudes = [abs(p.mean) for p in priors] + [abs(r) for r in self.rewards]
        return max(magnitudes, default=0.0) or 1.0

    def describe(self, arm: str) -> dict[str, float]:
        stats = self.bandit.arms.get(arm) or ArmStats()
        return {"mean": round(stats.mean, 6), "std": round(stats.std, 6), "pulls": stats.pulls,
                "weight": round(stats.n, 4)}

    # --- learning ----------------------------------------------------------------------------------

    def reward(self, blueprint: str, kind: str, metric_gain: float, params: int, kept: bool) -> float:
        """Credit a verdict (or a replacement's measurement) to its arm; returns the reward."""
        gain = metric_gain - (0.0 if kept else self.config.cull_penalty)
        return self._learn(arm_key(blueprint, kind), gain * 1000.0 / max(params, 1))

    def rollback(self, blueprint: str, kind: str, params: int) -> float:
        """Charge an arm whose seed (of ``params`` parameters) caused a rollback."""
        return self._learn(arm_key(blueprint, kind), -self.config.rollback_penalty * 1000.0 / max(params, 1))

    def _learn(self, arm: str, value: float) -> float:
        if math.isfinite(value):
            self.bandit.update(arm, value)
            self.rewards = (self.rewards + [value])[-64:]
            self._spread = None
            self.run_stats.setdefault(arm, ArmStats()).add(value)
        return value

    # --- sharing across runs -----------------------------------------------------------------------

    def warm_start(self, store: ArmStore) -> int:
        """Seed the arm statistics with those earlier runs stored; returns the pulls taken over."""
        taken = 0
        for arm, stats in store.load().items():
            mine = self.bandit.stats(arm)
            mine.n, mine.total, mine.squares = mine.n + stats.n, mine.total + stats.total, mine.squares + stats.squares
            mine.pulls += stats.pulls
            taken += stats.pulls
        return taken

    def share(self, store: ArmStore) -> None:
        """Add this run's rewards to the store (undiscounted: each run discounts in its own time)."""
        if self.run_stats:
            store.merge(self.run_stats)

    # --- checkpoints -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"bandit": self.bandit.state_dict(), "rewards": list(self.rewards),
                "run_stats": {a: s.to_json() for a, s in self.run_stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.bandit.load_state_dict(state["bandit"])
        self.rewards = [float(r) for r in state["rewards"]]
        self._spread = None
        self.run_stats = {a: ArmStats.from_json(v) for a, v in state["run_stats"].items()}
