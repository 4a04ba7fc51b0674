"""The best model so far (``checkpoint.keep_best``): what ``final/`` holds when the run ends.

At every validation whose task metric beats the best so far, the model's weights and its seed
topology are copied to the CPU: growth changes the model's structure, so the best model may have
seeds the last step's model has culled (or lack seeds it grew later), and ``final/`` must be
rebuildable from its own topology (``load_run``, ``esper export``). The copy is part of checkpoints
(a resumed run ends with the same ``final/``) but not of the governor's snapshots: a rollback
returns to the last validation, which the best copy already took into account.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from esper_core.growth.evaluation import Evaluation
from esper_core.growth.state import State, cpu_copy
from esper_core.seeds.manager import SeedManager


@dataclass
class Best:
    """One kept model: its step, validation figures, weights (CPU) and seed topology."""

    step: int
    metrics: dict[str, float]
    model: dict[str, torch.Tensor]
    topology: dict[str, Any]


class BestModel:
    """Keeps :class:`Best` when ``enabled``; inert (and stateless) otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.best: Best | None = None
        self._oriented: float | None = None

    def observe(self, step: int, evaluation: Evaluation, model: nn.Module, manager: SeedManager) -> bool:
        """Keep the model if ``evaluation`` beats the best so far (ties keep the earlier one);
        returns whether it did."""
        oriented = evaluation.better()
        if not self.enabled or not math.isfinite(oriented):
            return False
        if self._oriented is not None and oriented <= self._oriented:
            return False
        self._oriented = oriented
        self.best = Best(step, dict(evaluation.metrics), cpu_copy(dict(model.state_dict())), manager.topology())
        return True

    def state_dict(self) -> State:
        if self.best is None:
            return {}
        return {"step": self.best.step, "metrics": self.best.metrics, "oriented": self._oriented,
                "model": self.best.model, "topology": self.best.topology}

    def load_state_dict(self, state: State) -> None:
        if not self.enabled or not state:
            return
        self.best = Best(int(state["step"]), dict(state["metrics"]), dict(state["model"]), state["topology"])
        self._oriented = float(state["oriented"])
