"""The governor: notices a loss that has gone bad and decides to roll back.

It only judges the losses the trainer already reads (every ``log_every`` steps) plus a flag that
accumulates non-finite losses on the device between reads, so it adds no host-device sync of its
own. A spike is a logged loss above ``mean + zscore * std`` of the recent window: growth perturbs
the loss a little by design, so the threshold is statistical rather than a fixed ratio.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from esper_core.errors import EsperError
from esper_core.recipe.schema import GovernorConfig


class GovernorStop(EsperError):
    """Too many rollbacks: the run cannot make progress and stops."""

    exit_code = 5


class Governor:
    def __init__(self, config: GovernorConfig, device: torch.device) -> None:
        self.config = config
        self.history: deque[float] = deque(maxlen=config.window)
        self.rollbacks = 0
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    def watch(self, loss: torch.Tensor) -> None:
        """Called every step: remember (on the device) whether any loss was NaN/Inf."""
        self._nonfinite |= ~torch.isfinite(loss.detach())

    def judge(self, loss_value: float) -> str | None:
        """At a log point: the reason to roll back, or ``None`` if training is healthy."""
        if not self.config.enabled:
            return None
        if bool(self._nonfinite) or not math.isfinite(loss_value):
            return f"non-finite loss ({loss_value}) since the last check"
        reason = None
        if len(self.history) >= max(3, self.config.window // 2):
            mean = sum(self.history) / len(self.history)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
            limit = mean + self.config.zscore * max(std, 1e-8)
            if loss_value > limit:
                reason = f"loss spike: {loss_value:.4g} > mean {mean:.4g} + {self.config.zscore:g} x std {std:.3g}"
        if reason is None:
            self.history.append(loss_value)
        return reason

    def rolled_back(self) -> None:
        """Count a rollback; past the limit the run stops."""
        self.rollbacks += 1
        self._nonfinite.zero_()
        self.history.clear()
        if self.rollbacks > self.config.max_rollbacks:
            raise GovernorStop(f"governor: {self.rollbacks} rollbacks (limit {self.config.max_rollbacks}); "
                               "training cannot recover, stopping")

    def state_dict(self) -> dict:
        return {"history": list(self.history), "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state["history"], maxlen=self.config.window)
        self.rollbacks = state["rollbacks"]
