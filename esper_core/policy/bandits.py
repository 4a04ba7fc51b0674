"""Multi-armed bandits over named arms: UCB1, Thompson sampling, epsilon-greedy and greedy, each
with a discounted variant.

Rewards here have no fixed range (the selector's unit is the gain in the task's metric per 1000 added
parameters), so every strategy takes a ``scale``: the reward spread that UCB's bonus and Thompson's
posterior width are measured in. With rewards in [0, 1] and ``scale=1`` UCB1 is exactly Auer et
al.'s index ``mean + sqrt(2 ln N / n)``.

Discounting (Garivier & Moulines' D-UCB, applied to every strategy): each new reward first
multiplies the statistics of *all* arms by ``discount``, so an arm's counts and sums weigh a reward
``k`` updates old by ``discount**k``. An arm that was best long ago but has not been confirmed since
loses its confidence, and the bandit re-explores it: that is what lets it follow a best arm that
switches.

A prior (the selector derives it from health signals) enters as ``weight`` pseudo-pulls at the prior
mean, so it steers the first choices and fades as real rewards arrive. Randomness comes only from
the generator passed in, never from a global RNG, so a checkpoint of that generator replays every
choice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

STRATEGIES = ("ucb1", "thompson", "epsilon_greedy", "greedy")
STALE = math.exp(-1.0)
"""Discounted only: an arm whose evidence has decayed below this share of one pull is re-tried like an
untried arm (a greedy choice would never look at it again, however much its rewards drifted).
``discount ** (1 / (1 - discount))`` tends to ``1/e``: an arm falls under it about one memory span
(``1 / (1 - discount)`` updates) after its last pull."""


@dataclass
class ArmStats:
    """(Discounted) sufficient statistics of one arm; ``pulls`` is the undiscounted count."""

    n: float = 0.0
    total: float = 0.0
    squares: float = 0.0
    pulls: int = 0

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n > 0 else 0.0

    @property
    def std(self) -> float:
        if self.n <= 1:
            return 0.0
        return math.sqrt(max(self.squares / self.n - self.mean ** 2, 0.0))

    def decay(self, factor: float) -> None:
        self.n *= factor
        self.total *= factor
        self.squares *= factor

    def add(self, reward: float) -> None:
        self.n += 1.0
        self.total += reward
        self.squares += reward * reward
        self.pulls += 1

    def to_json(self) -> list[float]:
        return [self.n, self.total, self.squares, self.pulls]

    @classmethod
    def from_json(cls, data: Sequence[float]) -> ArmStats:
        n, total, squares, pulls = data
        return cls(float(n), float(total), float(squares), int(pulls))


_EMPTY = ArmStats()


@dataclass(frozen=True)
class Prior:
    """``weight`` pseudo-pulls of reward ``mean``."""

    mean: float
    weight: float


@dataclass(frozen=True)
class Pick:
    """A choice and the numbers behind it (they go into the decision event)."""

    arm: str
    strategy: str
    index: float  # the value the strategy maximised (UCB index, Thompson sample, mean)
    mean: float  # posterior mean including the prior
    explored: bool  # epsilon-greedy's random move, or an arm without any information


class Bandit:
    """One bandit; arms are created on first sight (the recipe's blueprints decide which exist)."""

    def __init__(self, strategy: str, rng: np.random.Generator, discount: float = 1.0,
                 exploration: float = 1.0, epsilon: float = 0.1) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
        if not 0.0 < discount <= 1.0:
            raise ValueError(f"discount must be in (0, 1], not {discount}")
        self.strategy = strategy
        self.rng = rng
        self.discount = discount
        self.exploration = exploration
        self.epsilon = epsilon
        self.arms: dict[str, ArmStats] = {}

    def stats(self, arm: str) -> ArmStats:
        return self.arms.setdefault(arm, ArmStats())

    def update(self, arm: str, reward: float) -> None:
        """Record one reward (discounting every arm first when ``discount < 1``)."""
        if self.discount < 1.0:
            for stats in self.arms.values():
                stats.decay(self.discount)
        self.stats(arm).add(reward)

    def select(self, candidates: Sequence[str], scale: float = 1.0,
               priors: Mapping[str, Prior] | None = None) -> Pick:
        """The arm to pull among ``candidates`` (their order breaks ties)."""
        if not candidates:
            raise ValueError("no candidate arms")
        priors = priors or {}
        arms, empty = self.arms, _EMPTY
        counts: dict[str, tuple[float, float]] = {}  # arm -> (effective pulls, mean), prior folded in
        retry = None  # every arm once before any comparison (Thompson's posterior covers unknown arms),
        for a in candidates:  # and, when discounting, again once its evidence has gone stale
            stats, prior = arms.get(a, empty), priors.get(a)
            n, total = stats.n, stats.total
            if prior is not None:
                n, total = n + prior.weight, total + prior.mean * prior.weight
            counts[a] = (n, total / n if n > 0 else 0.0)
            if retry is None and ((n <= 0 and self.strategy != "thompson")
                                  or (self.discount < 1.0 and stats.pulls > 0 and stats.n < STALE)):
                retry = a
        if self.strategy == "epsilon_greedy" and self.rng.random() < self.epsilon:
            arm = candidates[int(self.rng.integers(len(candidates)))]
            return Pick(arm, self.strategy, counts[arm][1], counts[arm][1], True)
        if retry is not None:
            return Pick(retry, self.strategy, math.inf, counts[retry][1], True)
        if self.strategy == "ucb1":
            width = self.exploration * scale * math.sqrt(2.0 * math.log(max(sum(n for n, _ in counts.values()), 1.0)))
            values = {a: m + width / math.sqrt(n) for a, (n, m) in counts.items()}
        elif self.strategy == "thompson":
            # Gaussian posterior (one pseudo-pull at 0 keeps an unknown arm's spread finite).
            width = self.exploration * scale
            noise = self.rng.standard_normal(len(counts)).tolist()
            values = {a: n * m / (n + 1.0) + z * width / math.sqrt(n + 1.0) for z, (a, (n, m)) in zip(noise, counts.items())}
        else:
            values = {a: m for a, (n, m) in counts.items()}
        arm = max(candidates, key=values.__getitem__)
        return Pick(arm, self.strategy, float(values[arm]), counts[arm][1], False)

    def state_dict(self) -> dict:
        return {"arms": {a: s.to_json() for a, s in self.arms.items()}, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.arms = {a: ArmStats.from_json(v) for a, v in state["arms"].items()}
        self.rng.bit_generator.state = state["rng"]
