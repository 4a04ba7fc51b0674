"""How fast seeds learn: at their own rate while the run still improves, no faster than the host once
it has stopped (``seeds.lr_schedule: adaptive``, the default).

Why: how fast new units learn decides much of what growth buys, in opposite directions depending on
whether the run still improves. Measured with ``benchmarks/growth.py`` (MLP host, exploration seeds
30-39, 2026-12-01): on ``mnist1d``, whose validation accuracy rises to the last step, seeds at twice
the host's rate gained 1.1 points and passed a 4x wider static MLP; on ``teacher``, whose validation
accuracy peaks near step 1,300 and then falls (it overfits), the same doubling cost 1.2 points, while
seeds that followed the host's decaying rate gained 0.6. New capacity that learns fast on a run that
has begun to overfit only overfits faster.

So the switch is the validation trend. While the task's validation metric still rises (its
least-squares slope over the last ``policy.trend_window`` evaluations, the window of the policy's
loss trends), the seed group learns at its own rate (``trainer.lr x seeds.lr_scale`` in ``esper
train``, on ``seeds.lr_schedule``'s window). From the first validation at which that slope is no
longer positive, seeds learn at most at the host's learning rate for the rest of the run (the host
group's as ``after_step`` finds it; in ``esper train`` that of the step just taken). A trend rather
than "no new best for N evaluations": an mnist1d run (seed 30) went two evaluations without a new
best at step 1,600 while still improving by a point every 300 steps; its five-evaluation trend turned
only at step 2,300, teacher's at 1,300. The switch is one-way and taken at a validation (a function
of the run's state: resumed and distributed runs take it at the same step), recorded as a
``seed_lr`` event, and saved in checkpoints.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from esper_core.policy.signals import slope_per_1k


@dataclass
class SeedRate:
    """The switch and what it needs: the recent validation scores (lower is better), the step it
    switched at, and the host's learning rate last seen."""

    adaptive: bool
    window: int
    scores: deque[tuple[int, float]] = field(init=False)
    switched_step: int | None = None
    host_lr: float | None = None

    def __post_init__(self) -> None:
        self.scores = deque(maxlen=self.window)  # the last `window` validations

    @property
    def switched(self) -> bool:
        return self.switched_step is not None

    def observe_validation(self, step: int, score: float, metric: str) -> dict[str, Any] | None:
        """A validation's score (the task's metric, oriented so that lower is better); returns the
        ``seed_lr`` event when this one makes the switch."""
        if not self.adaptive or self.switched or not math.isfinite(score):
            return None
        self.scores.append((step, score))
        if len(self.scores) < self.window:
            return None
        slope = slope_per_1k(self.scores) or 0.0  # 0: every validation at one step
        if slope < 0:  # the score (lower is better) still falls: the metric still improves
            return None
        self.switched_step = step
        return {"event": "seed_lr", "step": step, "rate": "host", "metric_trend_per_1k": round(-slope, 6),
                "reason": f"validation {metric} stopped improving (trend {-slope:+.4g} per 1000 steps over the last "
                          f"{self.window} evaluations): from now on seeds learn at most at the host's learning rate"}

    def observe_host(self, lr: float) -> None:
        """The host group's learning rate as ``after_step`` finds it."""
        self.host_lr = lr

    def rate(self, own: float) -> float:
        """The seed group's learning rate, given the rate it would have on its own."""
        if self.switched and self.host_lr is not None:
            return min(own, self.host_lr)
        return own

    def state_dict(self) -> dict[str, Any]:
        return {"scores": [list(p) for p in self.scores], "switched_step": self.switched_step,
                "host_lr": self.host_lr}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """``None`` (a checkpoint from before this existed) starts the watch afresh."""
        state = state or {}
        self.scores = deque(((int(s), float(v)) for s, v in state.get("scores", [])), maxlen=self.window)
        switched = state.get("switched_step")
        self.switched_step = None if switched is None else int(switched)
        host = state.get("host_lr")
        self.host_lr = None if host is None else float(host)
