"""Early stopping (``trainer.early_stopping``): stop when the validation metric stops improving.

Patience counts validations in a row whose metric did not beat the best so far by ``min_delta``.
By default a validation before the policy's growth window has closed does not count: a run that may
still grow is not stopped for a plateau that growth is there to break (the policy grows *on*
plateaus), so patience starts when the window closes. A run that cannot grow
(``policy.max_seeds: 0``) counts every validation.

The state (best value, its step, the count) is part of a checkpoint, so a resumed run stops at the
same step as the uninterrupted one. It is not part of the governor's snapshots: a rollback returns to
the state of the last validation, whose count is already the one to keep.
"""

from __future__ import annotations

import math
from typing import Any

from esper_core.errors import RECIPE_FIELD, ConfigError, Problem
from esper_core.recipe.schema import METRICS_OF_KIND, EarlyStoppingConfig, PolicyConfig
from esper_core.training.tasks import HIGHER_IS_BETTER


def growth_ends(policy: PolicyConfig, max_steps: int) -> float:
    """The step at which the growth window closes (0 when nothing can grow)."""
    return policy.growth_window[1] * max_steps if policy.max_seeds > 0 else 0.0


class EarlyStopping:
    """``observe`` each validation's figures; it says when to stop. Inert without a config.
    ``growing_until`` is the step before which the run may still grow (see :func:`growth_ends`)."""

    def __init__(self, config: EarlyStoppingConfig | None, task_kind: str, task_metric: str,
                 growing_until: float = 0.0) -> None:
        self.config = config
        self.growing_until = growing_until
        self.metric = (config.metric if config is not None and config.metric else task_metric)
        if config is not None and self.metric not in METRICS_OF_KIND[task_kind]:
            raise ConfigError(Problem(RECIPE_FIELD, f"'{self.metric}' is not reported by task kind '{task_kind}' "
                                      f"(choose from {', '.join(sorted(METRICS_OF_KIND[task_kind]))})",
                                      field="trainer.early_stopping.metric"))
        self.higher_is_better = HIGHER_IS_BETTER[self.metric]
        self.best: float | None = None
        self.best_step: int | None = None
        self.wait = 0

    def observe(self, step: int, metrics: dict[str, float]) -> bool:
        """Fold one validation in; returns whether the run should stop now."""
        if self.config is None:
            return False
        value = metrics[self.metric]
        oriented = value if self.higher_is_better else -value
        if math.isfinite(value) and (self.best is None or oriented > self._oriented_best() + self.config.min_delta):
            self.best, self.best_step, self.wait = value, step, 0
            return False
        if step >= self.growing_until or self.config.during_growth:
            self.wait += 1
        return self.wait >= self.config.patience

    def _oriented_best(self) -> float:
        assert self.best is not None
        return self.best if self.higher_is_better else -self.best

    def event(self, step: int) -> dict[str, Any]:
        """The chained ``early_stop`` event (also the summary's ``early_stop``)."""
        assert self.config is not None
        return {"event": "early_stop", "step": step, "metric": self.metric, "best": self.best,
                "best_step": self.best_step, "patience": self.config.patience, "min_delta": self.config.min_delta}

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.wait = state["best"], state["best_step"], int(state["wait"])
