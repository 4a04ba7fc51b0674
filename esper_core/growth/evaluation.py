"""What an evaluation says about a model: the task's metric, and what verdicts need beyond it.

The growth controller judges seeds counterfactually: the same evaluation with a seed on and with it
muted. It only needs to know which number to compare and which way is better; per-sample scores,
when the evaluation provides them, let the verdict tell a real difference from noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Evaluation:
    """One evaluation pass over held-out data.

    ``metric`` is the task's headline figure (accuracy, RMSE, perplexity, ...), named ``name``, with
    ``higher_is_better`` giving its direction; ``loss`` the mean task loss (the verdicts' guard against
    blow-ups); ``scores`` optional per-sample scores, higher is better, in a fixed sample order (the
    paired evidence verdicts use); ``metrics`` every figure worth reporting.
    """

    metric: float
    higher_is_better: bool
    name: str = "metric"
    loss: float | None = None
    scores: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def better(self) -> float:
        """The metric oriented so that larger is better."""
        return self.metric if self.higher_is_better else -self.metric


Evaluate = Callable[[nn.Module], Evaluation]
"""A function that evaluates the model on the same held-out samples every time it is called."""
