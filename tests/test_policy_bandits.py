"""The bandits against reward distributions whose best arm is known.

- Stationary Bernoulli arms: every strategy's regret stays within its textbook bound (Auer et al.'s
  UCB1 bound ``sum 8 ln T / gap + (1 + pi^2 / 3) sum gap`` for UCB1 and Thompson sampling; the
  ``epsilon * T * mean gap`` exploration cost for epsilon-greedy; a constant for greedy on
  well-separated Gaussian arms), and it grows sublinearly: the second half costs less than the first.
- A best arm that switches half-way: every discounted variant ends up pulling the new best arm,
  and does so at least as often as its undiscounted form (which, for greedy, epsilon-greedy and
  Thompson, keeps pulling the arm that used to be best).
- A checkpointed bandit (statistics and generator) continues with exactly the same choices.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
import pytest

from esper_core.policy.bandits import STRATEGIES, Bandit, Prior

Means = Callable[[int], list[float]]


def _play(strategy: str, means: Means, steps: int, seed: int, *, discount: float = 1.0, scale: float = 1.0,
          bernoulli: bool = True, noise: float = 0.1, epsilon: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(arm pulled, regret paid) per step."""
    env = np.random.default_rng(1000 + seed)
    bandit = Bandit(strategy, np.random.default_rng(seed), discount, epsilon=epsilon)
    arms = [str(i) for i in range(len(means(0)))]
    pulled, regret = np.zeros(steps, dtype=int), np.zeros(steps)
    for t in range(steps):
        m = means(t)
        i = int(bandit.select(arms, scale).arm)
        reward = float(env.random() < m[i]) if bernoulli else m[i] + noise * float(env.standard_normal())
        bandit.update(str(i), reward)
        pulled[t], regret[t] = i, max(m) - m[i]
    return pulled, regret


BERNOULLI = [0.9, 0.8, 0.5, 0.3]
T = 2000


def _ucb_bound(means: list[float], steps: int) -> float:
    gaps = [max(means) - m for m in means]
    return sum(8 * math.log(steps) / g for g in gaps if g > 0) + (1 + math.pi ** 2 / 3) * sum(gaps)


@pytest.mark.parametrize("strategy", ["ucb1", "thompson"])
def test_ucb1_and_thompson_regret_is_within_the_ucb1_bound(strategy: str) -> None:
    runs = [_play(strategy, lambda t: BERNOULLI, T, seed)[1] for seed in range(4)]
    totals = [r.sum() for r in runs]
    assert max(totals) <= _ucb_bound(BERNOULLI, T), totals
    assert all(r[T // 2:].sum() < r[:T // 2].sum() for r in runs), "regret must grow sublinearly"


def test_epsilon_greedy_pays_only_its_exploration() -> None:
    epsilon = 0.05
    gaps = [max(BERNOULLI) - m for m in BERNOULLI]
    bound = epsilon * T * sum(gaps) / len(gaps) * 1.5 + 20  # exploration cost, with slack for noise and start
    totals = [_play("epsilon_greedy", lambda t: BERNOULLI, T, seed, epsilon=epsilon)[1].sum() for seed in range(4)]
    assert max(totals) <= bound, (totals, bound)


def test_greedy_regret_is_bounded_on_well_separated_arms() -> None:
    means = [0.2, 0.9, 0.5]
    for seed in range(4):
        pulled, regret = _play("greedy", lambda t: means, T, seed, bernoulli=False)
        assert regret.sum() <= sum(max(means) - m for m in means) + 1e-9  # one pull of each, then the best
        assert (pulled[len(means):] == 1).all()


SWITCH = 2000


def _switching(t: int) -> list[float]:
    return [0.8, 0.3, 0.5] if t < SWITCH else [0.0, 0.7, 0.5]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_discounted_variants_track_a_best_arm_that_switches(strategy: str) -> None:
    def late_share(discount: float) -> float:
        shares = []
        for seed in range(4):
            pulled, _ = _play(strategy, _switching, SWITCH + 600, seed, discount=discount, scale=0.3, bernoulli=False)
            shares.append(float((pulled[SWITCH + 300:] == 1).mean()))
        return sum(shares) / len(shares)

    discounted, plain = late_share(0.98), late_share(1.0)
    assert discounted >= 0.8, discounted
    assert discounted >= plain, (discounted, plain)
    if strategy != "ucb1":  # UCB1's bonus lets it recover slowly; the others stay on the old best arm
        assert plain < 0.5, plain


def test_prior_steers_the_first_choice_and_fades() -> None:
    bandit = Bandit("greedy", np.random.default_rng(0))
    priors = {"a": Prior(0.1, 1.0), "b": Prior(0.9, 1.0)}
    assert bandit.select(["a", "b"], 1.0, priors).arm == "b"
    for _ in range(5):
        bandit.update("b", 0.0)
        bandit.update("a", 0.5)
    assert bandit.select(["a", "b"], 1.0, priors).arm == "a"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_restored_bandit_makes_the_same_choices(strategy: str) -> None:
    env = np.random.default_rng(7)
    first = Bandit(strategy, np.random.default_rng(3), 0.9, epsilon=0.3)
    arms = ["x", "y", "z"]
    for _ in range(20):
        first.update(first.select(arms).arm, float(env.random()))
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint holds
    second = Bandit(strategy, np.random.default_rng(99), 0.9, epsilon=0.3)
    second.load_state_dict(state)
    for _ in range(30):
        a, b = first.select(arms), second.select(arms)
        assert a == b
        reward = float(env.random())
        first.update(a.arm, reward)
        second.update(b.arm, reward)
